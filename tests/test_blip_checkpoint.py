"""`captioner.checkpoint` as a weights file (.pth/.pt/.bin/.safetensors), e.g. BLIP capfilt-large.

The tiny random BLIP of `tiny_models.build_tiny_blip` stands in for the real one: its state
dict, perturbed and saved as files in either naming, goes through `BlipCaptioner`.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nd_utils.backends import captioners
from nd_utils.backends.captioners import (
    BlipCaptioner,
    CheckpointError,
    CheckpointNotFoundError,
    file_sha256,
    load_blip_weights,
)
from nd_utils.errors import NdUtilsError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base_sd(tiny_blip_dir) -> dict:
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturbed(sd: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        noise = torch.randn(v.shape, generator=gen) * (v.float().std() + 0.05) if v.numel() > 1 else 0.1
        out[k] = (v + noise).to(v.dtype)
    # Tied in the model: the file holds one value for both names, as a real checkpoint does.
    out["text_decoder.cls.predictions.decoder.weight"] = out[
        "text_decoder.bert.embeddings.word_embeddings.weight"]
    out["text_decoder.cls.predictions.decoder.bias"] = out["text_decoder.cls.predictions.bias"]
    return out


def _images() -> list[Image.Image]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [Image.fromarray(noise), Image.new("RGB", (64, 64), "blue"), Image.new("RGB", (40, 70), "white")]


def _weights(cap: BlipCaptioner) -> dict:
    return cap.model.state_dict()


# Test-side inverse of the renaming: transformers names -> original Salesforce BLIP names.
_TO_ORIGINAL = (
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
     r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
)


def _to_original(key: str) -> str:
    for pattern, repl in _TO_ORIGINAL:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    assert not key.startswith("vision_model."), f"test table lacks {key}"
    return key  # text_decoder.* is named alike


def test_pth_file_loads_into_the_model_and_keys_the_cache_by_hash(tiny_blip_dir, base_sd, tmp_path):
    one, two = tmp_path / "one.pth", tmp_path / "two.pth"
    torch.save({"model": _perturbed(base_sd, 1), "epoch": 3}, one)
    torch.save({"model": _perturbed(base_sd, 2)}, two)

    folder = BlipCaptioner(model=str(tiny_blip_dir), max_new_tokens=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a complete file: nothing to report
        cap = BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(one), max_new_tokens=6)
    expected = _perturbed(base_sd, 1)
    got = _weights(cap)
    assert all(torch.equal(got[k], expected[k]) for k in base_sd)
    assert not torch.equal(got["vision_model.encoder.layers.0.self_attn.qkv.weight"],
                           base_sd["vision_model.encoder.layers.0.self_attn.qkv.weight"])
    assert cap.checkpoint_report["naming"] == "transformers"
    assert cap.checkpoint_report["missing"] == cap.checkpoint_report["unexpected"] == []
    assert cap.caption(_images()) != folder.caption(_images())

    digest = hashlib.sha256(one.read_bytes()).hexdigest()
    assert cap.checkpoint_sha256 == digest and digest in cap.backend_id
    assert str(one) not in cap.backend_id  # content, not location, keys the caption cache
    other = BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(two), max_new_tokens=6)
    assert other.backend_id != cap.backend_id != folder.backend_id
    # The same bytes elsewhere: the same captions cache key.
    copy = tmp_path / "moved" / "capfilt.pth"
    copy.parent.mkdir()
    shutil.copyfile(one, copy)
    assert BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(copy),
                         max_new_tokens=6).backend_id == cap.backend_id


def test_file_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    digest = file_sha256(path, chunk_size=64)
    assert digest == hashlib.sha256(b"x" * 1000).hexdigest()
    monkeypatch.setattr(captioners.hashlib, "sha256", lambda: pytest.fail("rehashed"))
    assert file_sha256(path) == digest
    monkeypatch.undo()
    path.write_bytes(b"y" * 1001)  # new size: hashed again
    assert file_sha256(path) == hashlib.sha256(b"y" * 1001).hexdigest()


def test_original_blip_naming_loads_identical_weights(tiny_blip_dir, base_sd, tmp_path):
    perturbed = _perturbed(base_sd, 3)
    original = {_to_original(k): v for k, v in perturbed.items()}
    assert "visual_encoder.blocks.0.attn.qkv.weight" in original
    original["text_decoder.bert.embeddings.position_ids"] = torch.arange(64)[None]  # old BERT buffer
    path = tmp_path / "model_large_caption.pth"
    torch.save({"model": original}, path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cap = BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(path), max_new_tokens=6)
    got = _weights(cap)
    assert set(got) == set(perturbed)
    assert all(torch.equal(got[k], perturbed[k]) for k in perturbed)
    assert cap.checkpoint_report["naming"] == "original BLIP"


def test_architecture_folder_without_weights_takes_the_file(tiny_blip_dir, base_sd, tmp_path):
    # captioner.model may hold only config + processor files (no model weights to download).
    arch = tmp_path / "blip-arch"
    shutil.copytree(tiny_blip_dir, arch, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    path = tmp_path / "w.pth"
    torch.save({"model": _perturbed(base_sd, 6)}, path)
    cap = BlipCaptioner(model=str(arch), checkpoint=str(path), max_new_tokens=6)
    expected = _perturbed(base_sd, 6)
    assert all(torch.equal(_weights(cap)[k], expected[k]) for k in expected)


def test_safetensors_and_raw_state_dict(tiny_blip_dir, base_sd, tmp_path):
    from safetensors.torch import save_file

    perturbed = _perturbed(base_sd, 4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.clone().contiguous() for k, v in perturbed.items()}, str(path))
    cap = BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(path), max_new_tokens=6)
    assert all(torch.equal(_weights(cap)[k], perturbed[k]) for k in perturbed)
    assert file_sha256(path) in cap.backend_id


def test_missing_and_unexpected_keys_are_reported(tiny_blip_dir, base_sd, tmp_path):
    from transformers import BlipForConditionalGeneration

    sd = _perturbed(base_sd, 5)
    dropped = ["vision_model.post_layernorm.weight", "vision_model.encoder.layers.1.mlp.fc1.bias",
               "text_decoder.bert.encoder.layer.0.output.dense.weight"]
    for k in dropped:
        del sd[k]
    del sd["text_decoder.cls.predictions.decoder.weight"]  # tied: filled by the word embeddings
    sd["text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
    path = tmp_path / "partial.pt"
    torch.save(sd, path)  # a raw state dict, no wrapper

    with pytest.warns(UserWarning, match=r"3 of the model's \d+ tensors are missing") as rec:
        cap = BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(path), max_new_tokens=6)
    message = str(rec[0].message)
    assert str(path) in message and all(k in message for k in dropped)
    assert "1 of its tensors have no place" in message and "text_encoder.pooler" in message
    assert sorted(cap.checkpoint_report["missing"]) == sorted(dropped)
    got = _weights(cap)
    # Missing keys keep captioner.model's values; the rest come from the file.
    assert torch.equal(got["vision_model.post_layernorm.weight"], base_sd["vision_model.post_layernorm.weight"])
    assert torch.equal(got["text_decoder.cls.predictions.decoder.weight"],
                       sd["text_decoder.bert.embeddings.word_embeddings.weight"])

    # Shapes of another architecture: an error naming captioner.model, not a silent half-load.
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir)
    wrong = dict(base_sd, **{"vision_model.embeddings.position_embedding": torch.zeros(1, 577, 32)})
    with pytest.raises(CheckpointError, match="captioner.model"):
        load_blip_weights(model, wrong, source="big.pth")


def test_unrelated_keys_raise(tiny_blip_dir, tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}}, path)
    with pytest.raises(NdUtilsError, match="neither") as err:
        BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(path))
    assert str(path) in str(err.value) and "conv1.weight" in str(err.value)

    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(CheckpointError, match="no state dict"):
        BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(empty))


def test_unsafe_pickle_is_refused(tiny_blip_dir, tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        BlipCaptioner(model=str(tiny_blip_dir), checkpoint=str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name", ["capfilt-large.pth", "missing/dir/blip", "./blip_large"])
def test_missing_checkpoint_path_is_a_clear_error(tiny_blip_dir, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no such file") as err:
        BlipCaptioner(model=str(tiny_blip_dir), checkpoint=name)
    assert name in str(err.value) and "offline" not in str(err.value).lower()
    assert isinstance(err.value, FileNotFoundError)
