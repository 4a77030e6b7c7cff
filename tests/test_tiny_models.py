"""The tiny offline checkpoints load and run through the real BLIP / diffusers code paths."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _images_of_different_sizes() -> list[Image.Image]:
    noise = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    return [Image.fromarray(noise), Image.new("RGB", (30, 200), "blue"), Image.new("RGB", (50, 50), "white")]


def test_tiny_blip_captions_images(tiny_blip_dir):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    # local_files_only: prove the folder is self-contained (no hub look-ups at all).
    processor = BlipProcessor.from_pretrained(tiny_blip_dir, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir, local_files_only=True).eval()

    inputs = processor(images=_images_of_different_sizes(), return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 64, 64)  # resized to the model's image_size
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8)
    captions = processor.batch_decode(out, skip_special_tokens=True)

    assert out.shape[0] == 3 and out.shape[1] <= 1 + 8
    # Captions start with BLIP's "[DEC]" bos token, which decoding must strip.
    assert processor.tokenizer.bos_token == "[DEC]"
    assert (out[:, 0] == model.config.text_config.bos_token_id).all()
    assert isinstance(captions, list) and all(isinstance(c, str) for c in captions)
    assert not any("[DEC]" in c or "[SEP]" in c for c in captions)
    # Random weights, but the caption must still depend on the image (see tiny_models).
    assert len(set(captions)) > 1, captions


def test_tiny_stable_diffusion_is_seeded(tiny_sd_dir):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)

    prompts = ["One realistic image of a dog", "One realistic image of a cat"]

    def generate(*seeds: int) -> list[np.ndarray]:
        images = pipe(
            prompts,
            num_inference_steps=2,
            height=64,
            width=64,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        ).images
        assert len(images) == 2
        assert all(isinstance(im, Image.Image) and im.size == (64, 64) and im.mode == "RGB" for im in images)
        return [np.asarray(im) for im in images]

    first, again, other = generate(0, 1), generate(0, 1), generate(2, 3)
    for a, b, c in zip(first, again, other):
        assert a.std() > 0  # not a blank (e.g. NaN-turned-black) image
        np.testing.assert_array_equal(a, b)  # same seed -> identical pixels
        assert not np.array_equal(a, c)  # different seed -> different pixels
