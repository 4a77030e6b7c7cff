"""Exceptions raised by nd_utils: each message names the problem and the fix."""
from __future__ import annotations

import difflib
from typing import Iterable


class NdUtilsError(Exception):
    """Base class of every error nd_utils raises on purpose."""


class ConfigError(NdUtilsError, KeyError):
    """A configuration key or value is invalid."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownNameError(NdUtilsError, KeyError):
    """A registry, layer or function name does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingArtifactError(NdUtilsError, FileNotFoundError):
    """A stage input is not in the artifact store yet."""


class DamagedArtifactError(NdUtilsError, RuntimeError):
    """A finished stage output no longer matches its manifest (edited, truncated, half-written).

    `path` is the artifact folder, `stage` its stage; the message names the rebuild command.
    """

    def __init__(self, message: str, path=None, stage: "str | None" = None):
        super().__init__(message)
        self.path, self.stage = path, stage


class StoreNotWritableError(NdUtilsError, PermissionError):
    """The artifact store (data_dir) cannot be written."""


class OfflineError(NdUtilsError, RuntimeError):
    """A download from a hub was attempted without network access."""


class ProbeError(NdUtilsError, ValueError):
    """A probe set is missing, empty or unreadable."""


class ProbeUnavailableError(ProbeError, OfflineError):
    """A probe set's files are neither here nor downloadable now (offline, a full disk): a
    ProbeError, so the stages that fall back on a missing probe set do so, and an OfflineError."""


def closest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Return up to `n` entries of `choices` closest to `name` (difflib ratio).

    >>> closest("layr4", ["layer1", "layer4", "fc"])
    ['layer4', 'layer1']
    """
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not found:  # substring matches help with long dotted names
        found = [c for c in choices if name in c or c in name][:n]
    return found


def unknown_name(kind: str, name: str, choices: Iterable[str], hint: str = "") -> UnknownNameError:
    """Build an UnknownNameError listing the closest valid names."""
    choices = list(choices)
    near = closest(name, choices)
    msg = f"unknown {kind} {name!r}."
    if near:
        msg += f" Closest valid names: {', '.join(near)}."
    if len(choices) <= 30:
        msg += f" Valid names: {', '.join(choices)}."
    else:
        msg += f" ({len(choices)} valid names in all.)"
    if hint:
        msg += " " + hint
    return UnknownNameError(msg)


class DiskFullError(NdUtilsError, OSError):
    """No space was left where a run writes; the message names the folder and the fix
    (`run_faults.disk_full_message`)."""
