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
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import DamagedArtifactError, MissingArtifactError, StoreNotWritableError
from .locks import ProcessLock, process_lock

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


def temp_path(path: Path) -> Path:
    # unique per process and call: concurrent writers of one file never share a temporary
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: "str | Path", data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename (no torn files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: "str | Path", text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict, path: "str | Path") -> Path:
    """Save a dict of tensors as safetensors through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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


def manifest_digest(manifest: Mapping) -> str:
    """sha256 of a manifest's canonical JSON without its own `digest` field.

    Stored in the manifest, so an edited manifest (a checksum, a parameter) is detected on open.
    """
    body = {k: v for k, v in json.loads(json.dumps(dict(manifest), default=str)).items()
            if k != "digest"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def rebuild_hint(stage: str) -> str:
    """The command that recomputes a stage's outputs (for error messages)."""
    number = stage[:2] if stage[:2].isdigit() else "NN"
    return (f"rebuild it with `python -m nd_utils run CONFIG --stages {number} --force` (CONFIG: "
            f"the profile or config.yaml of the run), or delete the folder and rerun stage "
            f"{number}")


# Folders verified by this process: path -> the (name, size, mtime, inode) signature of their
# files when the hashes matched. A later open re-hashes only when a file changed on disk.
_VERIFIED: dict = {}
_VERIFIED_GUARD = threading.Lock()


def _signature(folder: Path, names) -> tuple:
    sig = []
    for name in [MANIFEST, *sorted(names)]:
        st = (folder / name).stat()
        sig.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sig)


class Artifact:
    """A finished stage output: its folder and manifest.

    Opening reads the manifest; `verify()` checks it against its files. `ArtifactStore.open`
    verifies every artifact it hands out (sizes always, hashes once per process and file state).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingArtifactError(f"{self.path} holds no {MANIFEST}: it is not a finished "
                                       f"artifact") from None
        except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError, EIO
            raise self._damaged(f"its {MANIFEST} is unreadable ({type(exc).__name__}: {exc})",
                                stage=self.path.parent.name) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise self._damaged(f"its {MANIFEST} is not a manifest (no 'files' table)",
                                stage=self.path.parent.name)
        self.manifest = manifest

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage") or self.path.parent.name)

    def _damaged(self, problem: str, stage: "str | None" = None) -> DamagedArtifactError:
        stage = stage or self.stage
        return DamagedArtifactError(f"artifact {self.path} is damaged: {problem}; "
                                    f"{rebuild_hint(stage)}", path=self.path, stage=stage)

    def file(self, name: str) -> Path:
        p = self.path / name
        if name not in self.manifest["files"] and not p.exists():
            raise MissingArtifactError(f"artifact {self.path} has no file {name!r} (it holds "
                                       f"{', '.join(sorted(self.manifest['files'])) or 'none'})")
        if not p.exists():
            raise self._damaged(f"its file {name} is listed in the manifest but missing")
        return p

    def verify(self, *, hashes: bool = True, cache: bool = True) -> "Artifact":
        """Check the manifest's own digest, the folder name, and every file's size and sha256.

        Raises DamagedArtifactError naming the folder, the problem and the rebuild command.
        With `cache`, a folder whose files are unchanged since this process last verified it is
        not re-hashed. Returns self.
        """
        m = self.manifest
        if "digest" in m and manifest_digest(m) != m["digest"]:
            raise self._damaged(f"its {MANIFEST} was edited after it was written (its digest "
                                f"does not match)")
        if m.get("key") not in (None, self.path.name):
            raise self._damaged(f"its manifest names key {m.get('key')!r}, the folder "
                                f"{self.path.name!r}")
        files = m["files"]
        for rel, info in files.items():
            p = self.path / rel
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise self._damaged(f"its file {rel} is missing") from None
            if "bytes" in info and size != int(info["bytes"]):
                raise self._damaged(f"its file {rel} has {size} bytes, the manifest says "
                                    f"{info['bytes']} (truncated or rewritten)")
        if not hashes:
            return self
        sig = _signature(self.path, files)
        with _VERIFIED_GUARD:
            if cache and _VERIFIED.get(str(self.path)) == sig:
                return self
        for rel, info in files.items():
            if sha256_file(self.path / rel) != info["sha256"]:
                raise self._damaged(f"its file {rel} does not match the manifest's sha256 "
                                    f"(changed after it was written)")
        with _VERIFIED_GUARD:
            _VERIFIED[str(self.path)] = sig
        return self

    def __repr__(self) -> str:
        return f"Artifact({self.path})"


class ArtifactStore:
    """Stage outputs under `<root>/artifacts/<stage>/<key>/` with a manifest each.

    Safe with several writers (processes or threads) on one store: every key has a lock file
    (`.lock-<key>`), a key is written and published only under its lock, and the first complete
    writer wins; a later writer of the same key discards its copy and readers reuse the first.
    """

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

    def lock(self, stage: str, key: str) -> ProcessLock:
        """The inter-process lock of one key; hold it to write, resume or remove that key."""
        folder = self.root / "artifacts" / stage
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreNotWritableError(
                f"cannot write to the artifact store {self.root} ({exc.strerror or exc}): set "
                f"data_dir (or ND_DATA_DIR) to a writable folder, e.g. --set "
                f"data_dir=/tmp/nd-data") from None
        return process_lock(folder / f".lock-{key}")

    def exists(self, stage: str, key: str) -> bool:
        """True when the key is published (it may still fail verification on `open`)."""
        return (self.path(stage, key) / MANIFEST).is_file()

    def open(self, stage: str, key: str, produced_by: str = "", verify: bool = True) -> Artifact:
        """Open a finished, verified output, or raise naming the notebook that makes it.

        Missing: MissingArtifactError. Edited, truncated or incomplete: DamagedArtifactError
        with the folder and the rebuild command.
        """
        if not self.exists(stage, key):
            who = produced_by or f"the notebook of stage {stage}"
            raise MissingArtifactError(
                f"no output of stage {stage!r} with key {key} in {self.root}: run {who} first "
                f"(e.g. python -m nd_utils run CONFIG --stages {stage[:2]}) with the same config"
            )
        art = Artifact(self.path(stage, key))
        return art.verify() if verify else art

    def find(self, stage: str) -> list[Artifact]:
        """All finished outputs of a stage, newest first (unreadable manifests left out)."""
        base = self.root / "artifacts" / stage
        found = []
        for p in base.glob("*"):
            if not p.name.startswith(".") and (p / MANIFEST).is_file():
                with contextlib.suppress(DamagedArtifactError, MissingArtifactError):
                    found.append(Artifact(p))
        return sorted(found, key=lambda a: a.manifest.get("finished", 0), reverse=True)

    def file_hashes(self) -> dict[str, dict[str, str]]:
        """`{"stage/key": {file: sha256}}` of every finished output, from the manifests: two
        stores hold the same results when these are equal (executors, reruns)."""
        out = {}
        for stage in sorted(p.name for p in (self.root / "artifacts").glob("*") if p.is_dir()):
            for art in self.find(stage):
                out[f"{stage}/{art.key}"] = {f: v["sha256"]
                                             for f, v in art.manifest["files"].items()}
        return out

    @contextlib.contextmanager
    def writer(self, stage: str, key: str, *, version: int = 0, params: "Mapping | None" = None,
               upstream: "Mapping | None" = None, inputs: "Mapping | None" = None,
               extra: "Mapping | None" = None, resume: bool = True,
               log: "Callable[[str], None] | None" = None) -> Iterator[Path]:
        """Yield a staging folder; on normal exit write the manifest and publish it atomically.

        Holds the key's lock throughout. With `resume=True` an existing staging folder (left by
        an interrupted run) is handed back as it is, so the caller can skip finished chunks;
        otherwise it is emptied first. An exception leaves the staging folder in place and
        publishes nothing. When the key is already published (another writer finished first),
        the body gets a scratch folder that is thrown away: the published output is kept.
        """
        with self.lock(stage, key).acquire_context(
                wait_message=f"waiting for another process that is writing {stage}/{key}",
                log=log):
            final = self.path(stage, key)
            if self.exists(stage, key):
                scratch = Path(tempfile.mkdtemp(prefix=f".discard-{key}-", dir=final.parent))
                try:
                    yield scratch
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                return
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
                "writer": {"pid": os.getpid(), "host": platform.node()},
            }
            manifest.update(dict(extra or {}))
            manifest["digest"] = manifest_digest(manifest)
            atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, default=str))
            if final.exists():
                # a folder without a manifest: debris of an unsafe older writer, never readable
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(final.parent)

    def remove(self, stage: str, key: str) -> None:
        """Delete a finished output and its staging folder (used by --force), under the lock."""
        with self.lock(stage, key):
            for p in (self.path(stage, key), self.staging_path(stage, key)):
                if p.exists():
                    # rename first: a reader never sees a half-deleted folder under the key
                    trash = p.with_name(f".trash-{p.name}-{uuid.uuid4().hex[:8]}")
                    os.replace(p, trash)
                    shutil.rmtree(trash, ignore_errors=True)
            with _VERIFIED_GUARD:
                _VERIFIED.pop(str(self.path(stage, key)), None)
