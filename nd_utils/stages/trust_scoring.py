"""What the trust scores are computed from: settings, the split, the simulator and CoSy's images.

`label_trust` (stage 02's and 06's trust step) builds on these; `trust_metrics` holds the
arithmetic. See `label_trust` for what the scores mean.

Example:
    >>> [len(p) for p in trust_split(10, 0.5, seed=0)]
    [5, 5]
    >>> TrustSettings().key_params()["trust.null_concepts"]
    1000
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .. import label_metrics as lm
from .. import trust_metrics as tm
from .activations import cache_activations, load_activations
from .image_features import cfg_for_root
from ..config import Config
from ..context import run_context
from ..errors import ConfigError
from .image_features import load_image_features
from ..probe_split import split_ids
from ..probe_set import ProbeSet


@dataclass(frozen=True)
class TrustSettings:
    """`trust:` of the config (defaults where a saved config has no such section)."""

    heldout: float = 0.5       # fraction of the probe set held out
    null_concepts: int = 1000  # random concepts behind each permutation p-value
    alpha: float = 0.05        # trusted: Benjamini-Hochberg q below this (decides no cache)
    cosy: bool = True          # compute cosy_auc (images of every distinct label)
    cosy_images: int = 10      # images per label for cosy_auc

    @classmethod
    def from_config(cls, cfg: Config) -> "TrustSettings":
        given = run_context(cfg).settings.trust  # the schema forbids unknown keys
        s = cls(**given.model_dump(exclude_unset=True)) if given is not None else cls()
        if not 0 < s.heldout < 1:
            raise ConfigError(f"trust.heldout: got {s.heldout}; expected a fraction strictly "
                              f"between 0 and 1, e.g. 0.5")
        return s

    def key_params(self) -> dict:
        """What decides the cached scores (not `alpha`)."""
        return {f"trust.{k}": getattr(self, k) for k in ("heldout", "null_concepts", "cosy",
                                                          "cosy_images")}


def trust_split(n: int, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """(select ids, held-out ids) of a probe set of `n` images: a seeded permutation
    (`probe_split.split_ids`), so the same seed and fraction give the same parts everywhere.
    >>> [len(p) for p in trust_split(10, 0.5, 0)]
    [5, 5]
    """
    parts = split_ids(n, {"select": 1 - heldout, "test": heldout}, seed)
    return parts["select"], parts["test"]


def null_concept_ids(n_concepts: int, n_null: int, seed: int) -> torch.Tensor:
    """The random concepts of the permutation test: `min(n_null, M)` distinct indices, seeded."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_concepts, generator=g)[:min(n_null, n_concepts)]


def fit_simulator(probe: ProbeSet, ids: list[int], feats: torch.Tensor, vlm_loader) -> dict:
    """(a, b) of the simulator, fitted on the class labels of images `ids` (as stage 08, on its
    calibrate part); `{"a": 1, "b": 0, "fitted": False}` when fewer than two classes there."""
    labels = [probe.labels[i] for i in ids]
    have = [j for j, lab in enumerate(labels) if lab]
    concepts = sorted({labels[j] for j in have})
    if len(concepts) < 2:
        return {"a": 1.0, "b": 0.0, "fitted": False, "n_images": len(have),
                "n_concepts": len(concepts)}
    text = vlm_loader().encode_texts(concepts).float().cpu()
    cos = (feats[[ids[j] for j in have]].float() @ text.T).numpy()
    a, b = lm.fit_simulator_on_classes(cos, [labels[j] for j in have], concepts)
    return {"a": a, "b": b, "fitted": True, "n_images": len(have), "n_concepts": len(concepts)}


class LazyModel:
    """A model loaded on first call (the VLM is needed only for class names and prompts)."""

    def __init__(self, load, model=None):
        self._load, self._model = load, model

    def __call__(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    @property
    def loaded(self):
        """The model if loaded already, else None (callees then load their own if needed)."""
        return self._model


def score_labels(feats_h: torch.Tensor, acts_h: torch.Tensor, label_text: torch.Tensor,
                 null_text: torch.Tensor, calibration: dict,
                 per_label: "dict[str, torch.Tensor]", labels: list[str]
                 ) -> dict[str, torch.Tensor]:
    """heldout_r, heldout_p and cosy_auc `[K]` of K labels on H held-out images.

    feats_h `[H, D]`, acts_h `[H, K]`, label_text `[K, D]` (row k: `labels[k]`), null_text
    `[R, D]`, per_label {label: `[Q, K]` activations on its images} (`CosySource`; cosy_auc
    is NaN for a label without images).
    """
    a, b = calibration["a"], calibration["b"]
    r = tm.heldout_correlations(feats_h, label_text, acts_h, a, b)
    p = tm.permutation_p(r, tm.null_correlations(feats_h, null_text, acts_h, a, b))
    return {"heldout_r": r, "heldout_p": p, "cosy_auc": cosy_by_label(acts_h, per_label, labels)}


class CosySource:
    """Activations of one layer on the images of each label, from the configured image source."""

    def __init__(self, cfg: Config, layer: str, settings: TrustSettings, vlm: LazyModel,
                 exclude_sha256: "set[str]", target=None):
        self.cfg, self.layer, self.s, self.vlm, self.target = cfg, layer, settings, vlm, target
        self.exclude = exclude_sha256
        s = run_context(cfg).settings
        self.prompt, self.source = s.quality.cosy_prompt, s.synthesis.name
        self.retrieve = self.source == "retrieve"

    def identity(self) -> dict:
        """What decides the images: for `retrieve`, the pool's content and the exclusions."""
        if not self.retrieve:
            return {"source": self.source}
        from .synthesis import load_pool

        pool, _ = load_pool(self.cfg)
        return {"source": "retrieve", "pool": pool.fingerprint,
                "excluded": hashlib.sha256("\n".join(sorted(self.exclude)).encode()).hexdigest()}

    def activations(self, labels: list[str]) -> "dict[str, torch.Tensor]":
        """{label: `[Q, K]` activations of the layer on its images}."""
        wanted = sorted({lab for lab in labels if lab})
        if not wanted:
            return {}
        return self._retrieved(wanted) if self.retrieve else self._synthesised(wanted)

    def _retrieved(self, wanted: list[str]) -> "dict[str, torch.Tensor]":
        from .synthesis import cache_pool_features, pool_config

        pool, _, pcfg = pool_config(self.cfg)
        cache_pool_features(self.cfg, vlm=self.vlm(), pool=pool, pcfg=pcfg)
        cache_activations(cfg_for_root(pcfg, pool), target=self.target, probe=pool.root,
                          progress=False)
        keep = torch.tensor([it.sha256 not in self.exclude for it in pool.items])
        if not keep.any():
            return {}
        feats = load_image_features(pcfg, pool)[keep].float()
        acts = load_activations(pcfg, self.layer, probe=pool, target=self.target).activations[keep]
        text = self.vlm().encode_texts([self.prompt.format(concept=c) for c in wanted]
                                       ).float().cpu()
        n = min(self.s.cosy_images, feats.shape[0])
        top = torch.topk(feats @ text.T, n, dim=0).indices.T                 # [labels, n]
        return {c: acts[top[j]] for j, c in enumerate(wanted)}

    def _synthesised(self, wanted: list[str]) -> "dict[str, torch.Tensor]":
        from ..backends.configured import load_target_from_config
        from .selection import label_image_activations

        target = self.target or load_target_from_config(self.cfg)
        per_label = label_image_activations(self.cfg, wanted, [self.layer], target, self.vlm(),
                                            self.prompt, self.s.cosy_images, progress=False)
        return {c: acts[self.layer] for c, acts in per_label.items()}


def cosy_by_label(acts_h: torch.Tensor, per_label: "dict[str, torch.Tensor]",
                  labels: list[str]) -> torch.Tensor:
    """cosy_auc `[K]`: neuron k's activations on the images of `labels[k]` against `acts_h`,
    one `cosy_auc` call per distinct label (labels may have different numbers of images)."""
    out = torch.full((len(labels),), float("nan"), dtype=torch.float64)
    for lab in set(labels):
        if lab in per_label and per_label[lab].shape[0]:
            ks = torch.tensor([k for k, x in enumerate(labels) if x == lab])
            out[ks] = tm.cosy_auc(acts_h[:, ks], per_label[lab][:, ks])
    return out


def load_configured_vlm(cfg: Config):
    from ..backends.configured import load_vlm_from_config

    return load_vlm_from_config(cfg)
