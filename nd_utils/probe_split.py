"""Seeded splits of a probe set into disjoint parts (label / pool / calibrate / test).

A label is judged fairly only on images it was not chosen on. The label-quality stage (08)
splits its probe set once, by a seeded permutation, into:

- `select`: the images both methods choose their labels on (CLIP-Dissect's probe, DnD's D_top);
- `pool`: the offline image pool that `retrieve` draws "synthetic" concept images from (DnD's
  candidates and CoSy's concept images), so those never repeat a judged image;
- `calibrate`: the images the simulation's sigmoid is fitted on;
- `test`: the held-out images every metric is computed on.

A part is a `ProbeSet` whose activations and image features are rows of the whole set's caches
(`ProbeSet.parent`), so splitting costs no extra pass over the images. It is asked for in a
probe spec: `{name: imagenet-sample-1k, split: {part: test, seed: 0}}` (default fractions
`DEFAULT_FRACTIONS`).

Example:
    >>> parts = split_ids(10, {"select": 0.5, "test": 0.5}, seed=0)
    >>> sorted(len(v) for v in parts.values()), sorted(parts["select"] + parts["test"]) == list(range(10))
    ([5, 5], True)
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from .errors import ConfigError
from .probe_set import ProbeSet

DEFAULT_FRACTIONS = {"select": 0.4, "pool": 0.2, "calibrate": 0.1, "test": 0.3}
PART_ORDER = ("select", "pool", "calibrate", "test")


def split_ids(n: int, fractions: "dict[str, float]", seed: int = 0) -> dict[str, list[int]]:
    """Disjoint sorted id lists covering `range(n)`, one per part, sized by `fractions`.

    The permutation comes from `numpy.random.default_rng(seed)`; parts take consecutive runs
    of it in a fixed order (`PART_ORDER`, then other names sorted), sized by the rounded cumulative fractions, so they add up to `n`
    exactly and do not depend on the order the fractions are written in.
    """
    if not fractions:
        raise ConfigError("a split needs at least one part, e.g. {select: 0.5, test: 0.5}")
    bad = {k: v for k, v in fractions.items() if not (isinstance(v, (int, float)) and 0 < v <= 1)}
    total = sum(float(v) for v in fractions.values()) if not bad else 0
    if bad or abs(total - 1) > 1e-6:
        raise ConfigError(f"split fractions must be numbers in (0, 1] adding up to 1, got "
                          f"{dict(fractions)}: e.g. {DEFAULT_FRACTIONS}")
    # a fixed part order (the standard parts first, others by name): configs are hashed as
    # sorted JSON, so the order the fractions are written in must not change a part's images
    names = sorted(fractions, key=lambda k: (PART_ORDER.index(k) if k in PART_ORDER
                                             else len(PART_ORDER), k))
    order = np.random.default_rng(int(seed)).permutation(n)
    bounds = np.round(np.cumsum([0.0] + [float(fractions[k]) for k in names]) * n).astype(int)
    bounds[-1] = n
    return {part: sorted(int(i) for i in order[a:b])
            for part, a, b in zip(names, bounds[:-1], bounds[1:])}


def normalise_split(spec: dict) -> dict:
    """`{part, fractions, seed}` with defaults filled in; a clear error for a bad spec."""
    if not isinstance(spec, dict) or "part" not in spec:
        raise ConfigError(f"a probe split must be a mapping with a 'part', e.g. "
                          f"{{part: test, seed: 0}}; got {spec!r}")
    unknown = sorted(set(spec) - {"part", "fractions", "seed"})
    if unknown:
        raise ConfigError(f"probe split: unknown key(s) {unknown}; allowed: part, fractions, seed")
    fractions = dict(spec.get("fractions") or DEFAULT_FRACTIONS)
    if spec["part"] not in fractions:
        raise ConfigError(f"probe split: part {spec['part']!r} is not one of {list(fractions)}")
    return {"part": spec["part"], "fractions": fractions, "seed": int(spec.get("seed", 0))}


def split_part(probe: ProbeSet, spec: dict) -> ProbeSet:
    """The part `spec["part"]` of `probe` (see the module docstring); ids are saved in params.

    Example:
        >>> from nd_utils.probes import load_probe
        >>> test = split_part(load_probe("offline-sample"), {"part": "test"})
        >>> test.name, test.root.name
        ('offline-sample/test', 'offline-sample')
    """
    spec = normalise_split(spec)
    ids = split_ids(len(probe), spec["fractions"], spec["seed"])[spec["part"]]
    if not ids:
        raise ConfigError(f"probe split: part {spec['part']!r} of {probe.name!r} is empty "
                          f"({len(probe)} images, fractions {spec['fractions']}): use a larger "
                          f"probe set or a larger fraction")
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return probe.take(ids, f"{probe.name}/{spec['part']}",
                      {"split": {**spec, "n_ids": len(ids), "ids_sha256": digest}})


def split_table(probe: ProbeSet, fractions: "dict[str, float] | None" = None, seed: int = 0
                ) -> pd.DataFrame:
    """One row per image of `probe`: `id, part, sha256, label, path` (the record of a split)."""
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    part_of = {i: part for part, ids in split_ids(len(probe), fractions, seed).items()
               for i in ids}
    return pd.DataFrame({"id": range(len(probe)), "part": [part_of[i] for i in range(len(probe))],
                         "sha256": [it.sha256 for it in probe.items],
                         "label": [it.label for it in probe.items],
                         "path": [it.path for it in probe.items]})
