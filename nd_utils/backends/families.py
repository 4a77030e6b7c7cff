"""The backend families a config names, each with its own settings section.

A section (`captioner:`, `llm:`, `synthesis:`, `vlm:`, `target:`) has the keys its schema lists
and may have more: a backend's own settings. The schema lets them in (`extra="allow"`), the
config check rejects those the chosen backend's loader does not take (`Registry.parameters`), its
`*_from_config` passes them to it (`Family.extra_settings`), and the stages that read
`<section>.name` put them into their keys (`stage_cache.stage_params`), only when present.

The config layer knows only the sections (`config_values.BACKEND_SECTIONS`); the registries
are joined to them here, in the layer of the backends.

Example:
    >>> FAMILIES["llm"].registry.kind
    'language model'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..registry import Registry
from .captioners import CAPTIONER_SUPPLIED, CAPTIONERS
from .language_models import LANGUAGE_MODELS
from .synthesizers import SYNTHESIZERS
from .targets import TARGETS
from .vlm import VLMS


@dataclass(frozen=True)
class Family:
    section: str        # the config section
    registry: Registry  # the family's registry
    supplied: tuple     # loader arguments its *_from_config supplies itself: never a setting

    def parameters(self, name: str) -> "tuple[set[str], bool]":
        """(the settings backend `name`'s loader takes, whether it takes **kwargs)."""
        return self.registry.parameters(name, exclude=self.supplied)

    def settings(self, name: str, section: Mapping) -> dict:
        """The keys of `section` that backend `name`'s loader takes (see Registry.settings)."""
        return self.registry.settings(name, section, exclude=self.supplied)

    def extra_settings(self, section: Any) -> dict:
        """The extra (non-schema) keys of a parsed section that its backend takes: {} without
        any, so a backend configured by schema keys alone gets exactly what it got before."""
        extra = section.model_extra or {}
        return self.settings(section.name, extra) if extra else {}


FAMILIES: "dict[str, Family]" = {f.section: f for f in (
    Family("captioner", CAPTIONERS, CAPTIONER_SUPPLIED),
    Family("llm", LANGUAGE_MODELS, ("name", "device", "model", "max_new_tokens", "require_key")),
    Family("synthesis", SYNTHESIZERS,
           ("name", "device", "model", "steps", "scheduler", "guidance_scale", "height", "width",
            "batch_size", "cfg", "pool", "pool_features", "vlm")),
    Family("vlm", VLMS, ("name", "device", "dtype")),
    Family("target", TARGETS, ("name", "device", "seed")),
)}


class LazyParameters(Mapping):
    """{backend name: Family.parameters(name)} of one family, read on first lookup of a name,
    so checking a config imports a family's module only when its section has extra keys.
    Any name its registry would load can be looked up (`open_clip:<model>:<tag>`, a torchvision
    `<arch>:<weights>`); iterating lists the registry's names."""

    def __init__(self, family: Family):
        self.family, self._found = family, {}

    def __getitem__(self, name: str):
        if name not in self._found:
            self._found[name] = self.family.parameters(name)
        return self._found[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.family.registry_object().names())

    def __len__(self) -> int:
        return len(self.family.registry_object().names())

    def __repr__(self) -> str:
        return f"LazyParameters({self.family.section})"
