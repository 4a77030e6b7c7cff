"""Content-addressed artifact store: one folder per stage output, written atomically.

Layout under the store root (the config's `data_dir`):

    artifacts/<stage>/<key>/             a finished output: its files + manifest.json
    artifacts/<stage>/.staging-<key>/    work in progress (resumable, never read as an output)

The key is `sha256(stage, stage version, the config fields the stage reads, extra content
inputs, upstream keys)`. A folder becomes visible under its key only by `os.replace` of the
complete staging folder, so a crash leaves nothing readable under the key.

Example:
    >>> store = ArtifactStore("/tmp/nd-store")                         # doctest: +SKIP
    >>> key = store.key("01_activation_caching", 1, {"target.name": "x"})  # doctest: +SKIP
    >>> with store.writer("01_activation_caching", key, params={}) as tmp:  # doctest: +SKIP
    ...     (tmp / "a.txt").write_text("hi")
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import MissingArtifactError

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_file(path: "str | Path", chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: "str | Path", data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename (no torn files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: "str | Path", text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict, path: "str | Path") -> Path:
    """Save a dict of tensors as safetensors through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def package_versions() -> dict:
    """Versions of the packages that decide numerical results, for manifests."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("nd_utils", "torch", "torchvision", "numpy", "safetensors", "pillow",
                 "efficientnet-lite-pytorch", "open_clip_torch", "transformers", "diffusers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


class Artifact:
    """A finished stage output: its folder and manifest."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest = json.loads((path / MANIFEST).read_text())

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            raise MissingArtifactError(f"{p} is listed nowhere in artifact {self.path}")
        return p

    def verify(self) -> None:
        """Re-hash every file and compare with the manifest (raises on mismatch)."""
        for rel, info in self.manifest["files"].items():
            if sha256_file(self.path / rel) != info["sha256"]:
                raise MissingArtifactError(
                    f"{self.path / rel} does not match its manifest checksum: the artifact is "
                    f"damaged; delete {self.path} and rerun its notebook"
                )

    def __repr__(self) -> str:
        return f"Artifact({self.path})"


class ArtifactStore:
    """Stage outputs under `<root>/artifacts/<stage>/<key>/` with a manifest each."""

    def __init__(self, root: "str | Path"):
        self.root = Path(root).expanduser().resolve()

    @staticmethod
    def key(stage: str, version: int, params: Mapping, upstream: "Mapping[str, str] | None" = None,
            inputs: "Mapping | None" = None) -> str:
        """Content key of a stage output (16 hex chars of a sha256)."""
        blob = canonical_json({
            "stage": stage, "version": int(version), "params": dict(params),
            "inputs": dict(inputs or {}), "upstream": dict(upstream or {}),
        })
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def path(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / key

    def staging_path(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / f".staging-{key}"

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def open(self, stage: str, key: str, produced_by: str = "") -> Artifact:
        """Open a finished output, or raise MissingArtifactError naming its notebook."""
        if not self.exists(stage, key):
            who = produced_by or f"the notebook of stage {stage}"
            raise MissingArtifactError(
                f"no output of stage {stage!r} with key {key} in {self.root}: run {who} first "
                f"(e.g. python -m nd_utils run CONFIG --stages {stage[:2]}) with the same config"
            )
        return Artifact(self.path(stage, key))

    def find(self, stage: str) -> list[Artifact]:
        """All finished outputs of a stage, newest first."""
        base = self.root / "artifacts" / stage
        found = [Artifact(p) for p in base.glob("*") if (p / MANIFEST).is_file()]
        return sorted(found, key=lambda a: a.manifest.get("finished", 0), reverse=True)

    @contextlib.contextmanager
    def writer(self, stage: str, key: str, *, version: int = 0, params: "Mapping | None" = None,
               upstream: "Mapping | None" = None, inputs: "Mapping | None" = None,
               extra: "Mapping | None" = None, resume: bool = True) -> Iterator[Path]:
        """Yield a staging folder; on normal exit write the manifest and publish it atomically.

        With `resume=True` an existing staging folder (left by an interrupted run) is handed
        back as it is, so the caller can skip finished chunks; otherwise it is emptied first.
        An exception leaves the staging folder in place and publishes nothing.
        """
        final = self.path(stage, key)
        staging = self.staging_path(stage, key)
        if staging.exists() and not resume:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        started = time.time()
        yield staging
        files = {}
        for p in sorted(staging.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(staging).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {
            "stage": stage, "stage_version": int(version), "key": key,
            "params": dict(params or {}), "inputs": dict(inputs or {}),
            "upstream": dict(upstream or {}), "files": files,
            "packages": package_versions(), "platform": platform.platform(),
            "argv": sys.argv[:1], "started": started, "finished": time.time(),
            "seconds": round(time.time() - started, 3),
        }
        manifest.update(dict(extra or {}))
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, default=str))
        if final.exists():
            # Another process finished the same key first; identical content by construction.
            shutil.rmtree(staging)
            return
        os.replace(staging, final)
        _fsync_dir(final.parent)

    def remove(self, stage: str, key: str) -> None:
        """Delete a finished output and its staging folder (used by --force)."""
        for p in (self.path(stage, key), self.staging_path(stage, key)):
            if p.exists():
                shutil.rmtree(p)
