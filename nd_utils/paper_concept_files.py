"""The paper's concept files, pinned by sha256: a local copy, the cache, else a download.

Looked up in order: `local_dir=` (strict), `$ND_CONCEPT_DIR`, the cache (`cache_dir=`,
`$ND_CONCEPT_CACHE` or ~/.cache/nd_utils/concept_sets), then the CLIP-Dissect repository.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.request import urlopen

from .concept_text import MAX_FILE_BYTES, _read_capped
from .errors import NdUtilsError, OfflineError
from .store import atomic_write_bytes

BASE_URL = "https://raw.githubusercontent.com/Trustworthy-ML-Lab/CLIP-dissect/main/data/"
# sha256 of the exact file bytes (computed from the reference copies), and the concept count.
PAPER_SETS = {
    "20k": ("4ed6e5336d7760d281f7e72df31827da880c861363e820d8c65666b0f10d9ac0", 20000),
    "10k": ("d6b3e04f1ac30be6525d41474166c0bff28486ecd8c48dcb0ab9c7c9cc05ed86", 9894),
    "3k": ("425845cf228cf91200e25cbf0361cc078502ce1cc2f9d4558b29abe78096afe1", 3000),
    "broden_labels_clean": ("603036d4b138c66455e1285bd915f6cdcdf4728df7a5563843d1f89c9babe64b", 1197),
    "imagenet_labels": ("8b243a5b56f530010b42d64d8ef33c2660224447aded823f4d9de2cb1902a70e", 1000),
}
OFFLINE_SETS = ("imagenet_classes", "cifar100_classes", "words-3k", "words-10k", "words-20k")
_MAX_DOWNLOAD = MAX_FILE_BYTES


def default_cache_dir() -> Path:
    """`$ND_CONCEPT_CACHE`, else ~/.cache/nd_utils/concept_sets."""
    env = os.environ.get("ND_CONCEPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nd_utils" / "concept_sets"


def _download(url: str) -> bytes:
    with urlopen(url, timeout=30) as resp:  # module-level name so tests can monkeypatch it
        data = resp.read(_MAX_DOWNLOAD + 1)
    if len(data) > _MAX_DOWNLOAD:
        raise NdUtilsError(f"{url} is larger than {_MAX_DOWNLOAD} bytes: not a concept list")
    return data


def _fetch_paper_file(name: str, cache_dir, local_dir, allow_download: bool) -> tuple[bytes, str]:
    """Bytes of a paper file and where they came from; every copy is checked against its pin."""
    pin, fname = PAPER_SETS[name][0], f"{name}.txt"

    def checked(path: Path) -> bytes:
        data = _read_capped(path, f"concept file for {name!r}")
        got = hashlib.sha256(data).hexdigest()
        if got != pin:
            raise NdUtilsError(f"{path} has sha256 {got}, expected {pin} for concept set {name!r}: "
                               f"it is not the CLIP-Dissect file; replace or delete it")
        return data

    if local_dir is not None:
        path = Path(local_dir).expanduser() / fname
        if not path.is_file():
            raise NdUtilsError(f"local_dir={str(local_dir)!r} holds no {fname} (concept set {name!r})")
        return checked(path), str(path)
    env_dir = os.environ.get("ND_CONCEPT_DIR")
    if env_dir and (Path(env_dir).expanduser() / fname).is_file():
        path = Path(env_dir).expanduser() / fname
        return checked(path), str(path)
    cached = Path(cache_dir).expanduser() / fname if cache_dir else default_cache_dir() / fname
    if cached.is_file():
        data = _read_capped(cached, f"cached concept file for {name!r}")
        if hashlib.sha256(data).hexdigest() == pin:
            return data, str(cached)
        if not allow_download:
            checked(cached)  # raises, naming the damaged cache file
    url = BASE_URL + fname
    if not allow_download:
        raise OfflineError(_offline_message(name, url, cached, "allow_download=False"))
    try:
        data = _download(url)
    except OSError as e:  # URLError, HTTPError, timeouts, DNS failures
        raise OfflineError(_offline_message(name, url, cached, f"{type(e).__name__}: {e}")) from None
    got = hashlib.sha256(data).hexdigest()
    if got != pin:
        raise NdUtilsError(f"downloaded {url} has sha256 {got}, expected {pin}: the upstream file "
                           f"changed or the download is damaged; nothing was cached")
    atomic_write_bytes(cached, data)
    return data, url


def _offline_message(name: str, url: str, cached: Path, why: str) -> str:
    same = " (words-20k is the identical word list)" if name == "20k" else ""
    return (f"could not download concept set {name!r} from {url} ({why}){same}. Offline "
            f"alternatives: {', '.join(OFFLINE_SETS)} (any words-<N>), or the path of a text file "
            f"with one concept a line. To use the paper file without network, save {url} "
            f"(sha256 {PAPER_SETS[name][0]}) as {cached}, or set ND_CONCEPT_DIR / pass "
            f"local_dir= to a folder holding {name}.txt, or pass the file's path instead of the name.")
