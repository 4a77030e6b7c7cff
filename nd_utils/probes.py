"""Probe sets by name: the registry of sources, and loading sets from config specs.

A probe set is a list of images with optional labels (`probe_set.ProbeSet`); the sources
that read them live in `probe_sources`.

Registered sets (``list_probes()``) and their parameters:
  folder(path, labels_csv=None, recursive=True)  images under path; labels = sub-folder or CSV
  imagenet-val(path)      wnid sub-folders, or flat files + LOC_val_solution.csv / labels.csv
  broden(path)            index.csv ('image' column) + images/
  cifar100(root="~/.cache/nd_utils/cifar100", train=False)   downloads; in-memory items
  offline-sample()        photos shipped in scikit-image, scikit-learn and foolbox wheels
  imagenet-sample-1k(path=None, download=True)   one photo per ImageNet class, pinned by sha256
                          (a local copy, else downloaded once; see nd_utils.imagenet_sample)

>>> ps = load_probe("offline-sample")
>>> ps.load_image(0).mode, ps.labels[0]
('RGB', 'astronaut')
>>> both = load_probes([{"name": "folder", "path": "/data/a"}, {"name": "folder", "path": "/data/b"}])
"""
from __future__ import annotations

import inspect

from .errors import ConfigError, UnknownNameError, unknown_name
from .probe_set import ProbeSet, union
from .probe_split import split_part
from .probe_sources import _REGISTRY


def probe_set_names(specs) -> str:
    """The names of the probe specs of a config key, as one string ("a + b").

    >>> probe_set_names([{"name": "imagenet-sample-1k"}, {"name": "folder", "path": "x"}])
    'imagenet-sample-1k + folder'
    """
    return " + ".join(str(spec["name"]) for spec in specs or [])


def list_probes() -> list[str]:
    """Names accepted by load_probe.

    >>> list_probes()[:2]
    ['folder', 'imagenet-val']
    """
    return list(_REGISTRY)


def load_probe(name: str, **params) -> ProbeSet:
    """Load the registered probe set `name` with its parameters.

    >>> load_probe("folder", path="/data/imgs", recursive=False)
    """
    if name not in _REGISTRY:
        raise unknown_name("probe set", name, list_probes(), "See nd_utils.probes.list_probes().")
    accepted = list(inspect.signature(_REGISTRY[name]).parameters)
    for key in params:
        if key not in accepted:
            if not accepted:
                raise UnknownNameError(f"probe set {name!r} takes no parameters; got {key!r}.")
            raise unknown_name(f"parameter of probe set {name!r}:", key, accepted,
                               f"Probe set {name!r} accepts: {', '.join(accepted)}.")
    return _REGISTRY[name](**params)


def load_probes(specs: list[dict]) -> ProbeSet:
    """Load one probe set per spec dict ({"name": ..., **params}); several specs are unioned.

    >>> load_probes([{"name": "imagenet-val", "path": "/x"}, {"name": "broden", "path": "/y"}])
    """
    if not specs:
        raise ConfigError("load_probes() needs at least one spec such as {'name': 'offline-sample'}.")
    sets = []
    for spec in specs:
        if "name" not in spec:
            raise ConfigError(f"probe spec {spec!r} has no 'name'; choose one of {', '.join(list_probes())}.")
        params = {k: v for k, v in spec.items() if k not in ("name", "split")}
        sets.append(load_probe(spec["name"], **params))
    split = [s.get("split") for s in specs if s.get("split") is not None]
    if split and len(specs) > 1:
        raise ConfigError("a probe set with 'split' must be listed alone (a split of a union is "
                          "not supported): keep one entry in the list")
    if split:
        return split_part(sets[0], split[0])
    return sets[0] if len(sets) == 1 else union(*sets)
