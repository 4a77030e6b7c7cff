"""One registry type for every named family: the backends (targets, VLMs, captioners, language
models, synthesizers), the executors and the methods (similarity functions, scorings). Names map
to what was registered (a backend's loader, a method's function), and `list_*` is derived from it.

An entry is an exact name (`conse`) or a prefix family (`open_clip`, for names
`open_clip:<model>:<pretrained>`), whose loader gets the rest of the name; a family may list
examples and a catalogue of names it accepts. `load(name, **kwargs)` calls a backend's loader;
`get(name)` returns what was registered, uncalled (a method). Users add their own with
`register_*`.

`parameters(name)` reads the keyword parameters of the loader that builds `name` (a prefix
family's or the fallback's for the names they claim) and `settings(name, section)` picks the keys
of a config section it takes: how each backend family receives its own settings.

Example:
    >>> CAPTIONERS = Registry("captioner")
    >>> @CAPTIONERS.register("constant")
    ... class Constant:
    ...     def __init__(self, device="cpu"):
    ...         self.device = device
    >>> CAPTIONERS.names()
    ['constant']
    >>> CAPTIONERS.load("constant", device="cpu").device
    'cpu'
    >>> CAPTIONERS.get("constant") is Constant, "constant" in CAPTIONERS
    (True, True)
    >>> CAPTIONERS.settings("constant", {"name": "constant", "device": "cpu", "size": 3},
    ...                     exclude=("name",))
    {'device': 'cpu'}
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from .errors import unknown_name


@dataclass
class _Entry:
    loader: Callable
    prefix: bool = False
    examples: tuple = ()
    catalogue: "Callable[[], Iterable[str]] | None" = None


@dataclass
class Registry:
    """Named loaders of one family; `load(name, **kwargs)` builds one, `get(name)` returns it."""

    kind: str
    hint: str = ""
    entries: dict = field(default_factory=dict)
    fallback: "Callable | None" = None   # loader for names no entry claims (e.g. torchvision)
    fallback_names: "Callable[[], Iterable[str]] | None" = None
    sort: bool = True   # names() sorts the exact names; False keeps the order of registration

    def register(self, name: str, loader: "Callable | None" = None, *, prefix: bool = False,
                 examples: Iterable[str] = (), catalogue=None):
        """Add `loader` under `name` (usable as a decorator); `prefix` claims `name:<rest>`.

        Re-registering a name replaces it, so a user can swap a built-in backend.
        """
        if ":" in name:
            raise ValueError(f"{self.kind} name {name!r}: a registered name has no ':' (a prefix "
                             f"family is registered as its prefix, with prefix=True)")

        def add(fn: Callable) -> Callable:
            self.entries[name] = _Entry(fn, prefix, tuple(examples), catalogue)
            return fn
        return add(loader) if loader is not None else add

    def names(self) -> list[str]:
        """Exact names, then each family's examples and catalogue, then the fallback's names."""
        out = [n for n, e in self.entries.items() if not e.prefix]
        out = sorted(out) if self.sort else out
        for n, e in sorted(self.entries.items()):
            if e.prefix:
                out += list(e.examples) + list(e.catalogue() if e.catalogue else [])
        if self.fallback_names:
            out += [n for n in self.fallback_names() if n not in out]
        return out

    def __contains__(self, name) -> bool:
        """True for an exact registered name (not a prefix family's or the fallback's names)."""
        try:
            entry = self.entries.get(name)
        except TypeError:  # unhashable: not a name
            return False
        return entry is not None and not entry.prefix

    def get(self, name: str) -> Callable:
        """What was registered under the exact name `name`, uncalled (UnknownNameError listing
        the valid names otherwise): a method family's function, or a backend's loader."""
        if name in self:
            return self.entries[name].loader
        raise unknown_name(self.kind, str(name), self.names(), hint=self.hint)

    def load(self, name: str, **kwargs):
        entry = self.entries.get(name)
        if entry is not None and not entry.prefix:
            return entry.loader(**kwargs)
        head, sep, rest = str(name).partition(":")
        entry = self.entries.get(head)
        if entry is not None and entry.prefix and sep:
            return entry.loader(rest, **kwargs)
        if self.fallback is not None:
            return self.fallback(name, **kwargs)
        raise unknown_name(self.kind, name, self.names(), hint=self.hint)

    def loader(self, name: str) -> "tuple[Callable, int] | None":
        """The loader `load(name)` calls and how many positional arguments it is given before the
        keywords (0 for an exact name; 1, the rest of the name or the name, for a prefix family
        or the fallback); None when nothing claims `name`."""
        entry = self.entries.get(name) if isinstance(name, str) else None
        if entry is not None and not entry.prefix:
            return entry.loader, 0
        head, sep, _ = str(name).partition(":")
        entry = self.entries.get(head)
        if entry is not None and entry.prefix and sep:
            return entry.loader, 1
        if self.fallback is not None:
            return self.fallback, 1
        return None

    def parameters(self, name: str, exclude: Iterable[str] = ()) -> "tuple[set[str], bool]":
        """(the keyword parameters of `name`'s loader, whether it takes **kwargs).

        The positional argument a prefix family or the fallback receives, parameters whose name
        starts with `_` and the names in `exclude` (what the caller supplies itself) are not
        among them. A name nothing claims, or a loader without a readable signature, takes any.

        >>> reg = Registry("thing")
        >>> _ = reg.register("fam", lambda rest, device="cpu", size=1: rest, prefix=True)
        >>> reg.parameters("fam:x", exclude=("device",))
        ({'size'}, False)
        """
        found = self.loader(name)
        if found is None:
            return set(), True
        loader, skip = found
        try:
            params = list(inspect.signature(loader).parameters.values())
        except (TypeError, ValueError):  # no signature to read: it takes what it is given
            return set(), True
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        skipped = {p.name for p in positional[:skip]}
        named = {p.name for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and p.name not in skipped and not p.name.startswith("_")}
        return named - set(exclude), any(p.kind == p.VAR_KEYWORD for p in params)

    def settings(self, name: str, section: Mapping, exclude: Iterable[str] = ()) -> dict:
        """The keys of `section` (a config section, or part of one) that `name`'s loader takes:
        those it names as parameters, or all of them when it takes **kwargs; the names in
        `exclude` never."""
        exclude = set(exclude)
        accepted, takes_any = self.parameters(name, exclude)
        return {k: v for k, v in section.items()
                if k not in exclude and (takes_any or k in accepted)}
