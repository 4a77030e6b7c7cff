"""The public ImageNet sample (one photo per class), located or downloaded, every file verified.

`imagenet-sample-1k` is the 1,000 JPEGs of the public repository
`EliSchwartz/imagenet-sample-images` at commit `SAMPLE_COMMIT`, each pinned by its sha256
(`nd_utils/data/imagenet_sample_images.sha256`). `locate_imagenet_sample` looks, in order, at:

1. a configured folder (`path=`);
2. a local copy: `$ND_SHARED_DIR/data/imagenet-sample-images`, else `../shared/...` beside the
   repository;
3. the download cache (`$ND_IMAGENET_SAMPLE_CACHE`, else ~/.cache/nd_utils/imagenet-sample-images/
   <commit>), filled from `$ND_IMAGENET_SAMPLE_URL` (default: the upstream raw files at the pinned
   commit) when `download=True`.

A file whose bytes differ from its pin is refused, naming it; downloads are written through a
temporary file and a rename after their hash is checked, so nothing partial is kept, a second run
resumes where the first stopped, and two runs at once share the work under one lock.

Example:
    >>> len(sample_pins()), sample_class_index()["n01440764"]
    (1000, 0)
    >>> root = locate_imagenet_sample(download=False)          # doctest: +SKIP
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import importlib.resources
import os
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import urlopen

from tqdm.auto import tqdm

from .errors import ProbeError, ProbeUnavailableError
from .locks import process_lock
from .store import atomic_write_bytes, sha256_file

SAMPLE_COMMIT = "bc69043e2862758a1906c6a24a792bb28c6bb2ff"
UPSTREAM = "EliSchwartz/imagenet-sample-images"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{UPSTREAM}/{SAMPLE_COMMIT}/"
CONNECT_TIMEOUT_S = 10.0  # an unreachable host falls back after this, not after 1,000 tries
_MAX_FILE_BYTES = 8 << 20  # the largest pinned file is ~1 MB: anything far larger is not it


def sample_pins() -> dict[str, str]:
    """File name -> sha256 of the 1,000 pinned files, in wnid order.

    >>> next(iter(sample_pins().items()))
    ('n01440764_tench.JPEG', '98f7e89b26142f7bdb61f3a627dee89729b0bb07a29e9e7f3be9d394c00c6f01')
    """
    text = (importlib.resources.files("nd_utils") / "data" / "imagenet_sample_images.sha256"
            ).read_text(encoding="utf-8")
    pins = {}
    for line in text.splitlines():
        if line.strip():
            sha, name = line.split(None, 1)
            pins[name.strip()] = sha
    return pins


def sample_class_index() -> dict[str, int]:
    """wnid -> ImageNet-1k class index: the position of the wnid among the sorted 1,000."""
    return {w: i for i, w in enumerate(sorted(name.split("_", 1)[0] for name in sample_pins()))}


def local_copy_dir() -> Path:
    """Where a local copy of the sample is looked for (`$ND_SHARED_DIR`, else ../shared)."""
    shared = os.environ.get("ND_SHARED_DIR")
    base = Path(shared).expanduser() if shared else Path(__file__).resolve().parents[2] / "shared"
    return base / "data" / "imagenet-sample-images"


def default_cache_dir() -> Path:
    """`$ND_IMAGENET_SAMPLE_CACHE`, else ~/.cache/nd_utils/imagenet-sample-images/<commit>."""
    env = os.environ.get("ND_IMAGENET_SAMPLE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "nd_utils" / "imagenet-sample-images" / SAMPLE_COMMIT[:12]


def base_url() -> str:
    """`$ND_IMAGENET_SAMPLE_URL` (a mirror's folder URL), else the upstream raw files."""
    url = os.environ.get("ND_IMAGENET_SAMPLE_URL") or DEFAULT_BASE_URL
    return url if url.endswith("/") else url + "/"


def verify_folder(root: Path, pins: "dict[str, str] | None" = None) -> list[str]:
    """Names of the pinned files missing from `root`; raises ProbeError naming a file whose
    sha256 differs from its pin (a damaged or edited copy)."""
    pins = pins or sample_pins()
    missing = []
    for name, pin in pins.items():
        path = root / name
        if not path.is_file():
            missing.append(name)
            continue
        got = sha256_file(path)
        if got != pin:
            raise ProbeError(
                f"imagenet-sample-1k: {path} has sha256 {got}, but the pinned file {UPSTREAM}@"
                f"{SAMPLE_COMMIT[:8]}/{name} has {pin}. The copy is damaged or edited: delete "
                f"it (a download replaces it) or restore the original bytes.")
    return missing


def locate_imagenet_sample(path=None, *, download: bool = True, cache_dir=None,
                           progress: bool = True) -> Path:
    """The folder holding all 1,000 verified files of the sample (see the module docstring).

    Raises ProbeError for a configured folder that is incomplete or damaged, and
    ProbeUnavailableError (a ProbeError and an OfflineError) when no complete copy exists and
    the download is off or fails (the message says what to set); a failed download keeps the
    files it verified, so the next call resumes.
    """
    pins = sample_pins()
    if path is not None:
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise ProbeError(f"probe set 'imagenet-sample-1k': path={str(path)!r} is not a "
                             f"folder. Point it at a copy of {UPSTREAM} (its 1,000 JPEGs), or "
                             f"leave path unset to use the download cache.")
        missing = verify_folder(root, pins)
        if missing:
            raise ProbeError(f"probe set 'imagenet-sample-1k': {root} lacks {len(missing)} of the "
                             f"1,000 files (first: {missing[0]}). Complete it from {UPSTREAM} "
                             f"at commit {SAMPLE_COMMIT[:8]}, or leave path unset.")
        return root
    local = local_copy_dir()
    if local.is_dir() and not verify_folder(local, pins):
        return local
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    missing = verify_folder(cache, pins) if cache.is_dir() else list(pins)
    if not missing:
        return cache
    if not download:
        raise ProbeUnavailableError(_offline_message(cache, "the download is off"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProbeUnavailableError(_offline_message(
            cache, f"cannot create the cache folder: {exc}")) from None
    with process_lock(cache / ".download.lock"):
        missing = verify_folder(cache, pins)           # another run may have fetched them meanwhile
        _download_missing(cache, missing, pins, progress)
    return cache


def _offline_message(cache: Path, why: str) -> str:
    return (f"the ImageNet sample (imagenet-sample-1k, 1,000 photos, 110 MB) is not available: "
            f"{why}. Allow the download (network access to {base_url()}, or a mirror in "
            f"ND_IMAGENET_SAMPLE_URL), or place the 1,000 files of {UPSTREAM} at commit "
            f"{SAMPLE_COMMIT[:8]} in {cache} or in a folder passed as path=.")


def _download_missing(cache: Path, missing: list[str], pins: dict[str, str],
                      progress: bool) -> None:
    url0 = base_url()
    bar = tqdm(total=len(missing), desc="imagenet-sample-1k download", unit="file",
               disable=not progress or not missing)
    try:
        for name in missing:
            _fetch_one(url0 + quote(name), cache / name, pins[name])
            bar.update(1)
    finally:
        bar.close()


def _fetch_one(url: str, dest: Path, pin: str) -> None:
    """Download `url` to `dest` if its sha256 is `pin`; nothing is left behind otherwise."""
    try:
        with urlopen(url, timeout=CONNECT_TIMEOUT_S) as resp:
            declared = resp.headers.get("Content-Length")
            data = resp.read(_MAX_FILE_BYTES + 1)
        if declared and declared.isdigit() and len(data) < int(declared):
            raise http.client.IncompleteRead(data, int(declared) - len(data))
    except HTTPError as exc:
        raise ProbeUnavailableError(_offline_message(
            dest.parent, f"{url} answered HTTP {exc.code}")) from None
    except http.client.IncompleteRead as exc:
        raise ProbeError(f"imagenet-sample-1k: the download of {dest.name} from {url} was cut "
                         f"off after {len(exc.partial):,} bytes ({exc.expected:,} more were due). "
                         f"Nothing of it was kept; run again to resume.") from None
    except (URLError, OSError, http.client.HTTPException) as exc:  # DNS, refused, timeout, cut
        why = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        raise ProbeUnavailableError(_offline_message(
            dest.parent, f"{url} is unreachable ({why})")) from None
    got = hashlib.sha256(data).hexdigest()
    if got != pin:
        raise ProbeError(
            f"imagenet-sample-1k: the download of {dest.name} from {url} has sha256 {got} "
            f"({len(data):,} bytes), not the pinned {pin}: truncated, or not the file of "
            f"{UPSTREAM}@{SAMPLE_COMMIT[:8]} (a wrong ND_IMAGENET_SAMPLE_URL?). Nothing of "
            f"it was kept; run again to retry.")
    try:
        atomic_write_bytes(dest, data)  # temporary file + rename: removed when the write fails
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise ProbeUnavailableError(_offline_message(
            dest.parent, f"writing {dest.name} failed ({'the disk is full' if full else exc}); "
            f"the files verified so far are kept and a rerun resumes")) from None
