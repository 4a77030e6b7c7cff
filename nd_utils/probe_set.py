"""The ProbeSet type: an ordered, content-identified image collection, built from image files.

Each image is hashed and fully decoded once when a set is built (`_build`), so unreadable files
are reported and dropped *before* ids (positions) are assigned, and the set's fingerprint depends
on image bytes and labels only, never on where the folder lives. `union` concatenates sets.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import ProbeError
from .notices import record_notice

_SCAN_CACHE: dict[tuple[str, int, int], tuple[str, str | None]] = {}
_RACY_NS = 2_000_000_000  # files modified this recently are not memoised (mtime granularity is coarse)


@dataclass(frozen=True)
class ProbeItem:
    """One probe image; `path` is "" for in-memory sources such as cifar100."""

    path: str
    label: str | None
    source: str
    sha256: str
    class_index: int | None = None


@dataclass(repr=False)
class ProbeSet:
    """An ordered probe set; ids are positions in `items`.

    >>> ps = load_probe("folder", path="/data/imgs")
    >>> len(ps), ps.fingerprint[:8], ps.load_image(0).size
    """

    name: str
    items: list[ProbeItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # sha256 -> HxWx3 uint8, in-memory items
    # A part of a split probe set (`probe_split`): its activations and image features are rows
    # `parent_ids` of the parent's caches, so a split never recomputes them.
    parent: "ProbeSet | None" = field(default=None, repr=False, compare=False)
    parent_ids: "tuple[int, ...] | None" = None

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ProbeSet({self.name!r}, n_images={len(self)}, n_skipped={len(self.skipped)})"

    def load_image(self, i: int) -> Image.Image:
        """Return image `i` decoded and converted to RGB.

        >>> load_probe("offline-sample").load_image(3).mode
        'RGB'
        """
        item = self.items[i]
        if not item.path:
            return Image.fromarray(self.arrays[item.sha256]).convert("RGB")
        with Image.open(item.path) as im:
            im.load()
            return _to_rgb(im)

    @property
    def labels(self) -> list[str | None]:
        """Labels in id order (None where unknown)."""
        return [it.label for it in self.items]

    @property
    def fingerprint(self) -> str:
        """sha256 over (image sha256, label) of every item, in order; independent of paths."""
        h = hashlib.sha256()
        for it in self.items:
            # a tab/newline framing keeps ("ab", "c") distinct from ("a", "bc"); None != "None"
            h.update(f"{it.sha256}\t{'' if it.label is None else '=' + it.label}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        """Summary for manifests: name, counts, fingerprint and load parameters."""
        return {"name": self.name, "n_images": len(self), "n_skipped": len(self.skipped),
                "n_labelled": sum(lab is not None for lab in self.labels),
                "fingerprint": self.fingerprint, "params": dict(self.params)}

    def subset(self, n: int) -> ProbeSet:
        """First `n` items, for quick tests and demos.

        >>> load_probe("offline-sample").subset(5).name
        'offline-sample[:5]'
        """
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if self.parent is not None:  # stays a view of the whole set's caches
            return self.take(list(range(min(n, len(self)))), f"{self.name}[:{n}]", {"subset": n})
        items = self.items[:n]
        keep = {it.sha256 for it in items if not it.path}
        return ProbeSet(f"{self.name}[:{n}]", items, list(self.skipped), {**self.params, "subset": n},
                        {k: v for k, v in self.arrays.items() if k in keep})

    def take(self, ids: "list[int]", name: str, params: "dict | None" = None) -> ProbeSet:
        """The items `ids` (in that order) as a probe set whose caches are views of this one's.

        >>> load_probe("offline-sample").take([2, 0], "two").labels
        ['cup of coffee', 'astronaut']
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.items)]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside 0..{len(self.items) - 1}")
        items = [self.items[i] for i in ids]
        keep = {it.sha256 for it in items if not it.path}
        root = self.parent if self.parent is not None else self
        root_ids = tuple(self.parent_ids[i] for i in ids) if self.parent is not None else tuple(ids)
        return ProbeSet(name, items, [], {**self.params, **(params or {})},
                        {k: v for k, v in self.arrays.items() if k in keep}, root, root_ids)

    @property
    def root(self) -> ProbeSet:
        """The probe set whose caches this one reads (itself unless it is a split part)."""
        return self.parent if self.parent is not None else self


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # convert("RGB") clips 16-bit/float data to 255, which turns most pixels white
        a = np.asarray(im, dtype=np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12) * 255
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        # dropping alpha exposes arbitrary colours under transparent pixels; composite on white instead
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _check(path: str) -> tuple[str, str | None]:
    """(sha256, None) for a decodable image, ("", reason) or (sha256, reason) otherwise; memoised."""
    try:
        st = os.stat(path)
    except OSError as e:
        return "", f"cannot read file: {e.strerror or e}"
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _SCAN_CACHE:
        return _SCAN_CACHE[key]
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return "", f"cannot read file: {e.strerror or e}"
    sha = hashlib.sha256(data).hexdigest()
    reason = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    # PIL.UnidentifiedImageError and "image file is truncated" both arrive as OSError
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), not the file
        reason = f"{type(e).__name__}: {re.sub(r' ?<_io.BytesIO object at 0x[0-9a-f]+>', '', str(e))}"
    # like git's "racy" index: a file rewritten within the mtime granularity could keep its key
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        _SCAN_CACHE[key] = (sha, reason)
    return sha, reason


def _build(name: str, params: dict, entries: list[tuple[str, str | None, int | None]]) -> ProbeSet:
    """Hash and decode every (path, label, class_index), drop bad ones, then assign ids."""
    paths = [p for p, _, _ in entries]
    if len(paths) > 200:
        # decoding and hashing release the GIL, so threads use every core
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = list(tqdm(pool.map(_check, paths), total=len(paths), desc=f"scanning {name}"))
    else:
        results = [_check(p) for p in paths]
    items, skipped = [], []
    for (path, label, ci), (sha, reason) in zip(entries, results):
        if reason is None:
            items.append(ProbeItem(path, label, name, sha, ci))
        else:
            skipped.append((path, reason))
    if skipped:
        first = ", ".join(p for p, _ in skipped[:3])
        warnings.warn(f"probe set {name!r}: {len(skipped)} unreadable image(s) left out "
                      f"(first: {first}); see ProbeSet.skipped for reasons.", stacklevel=4)

        record_notice("probe_skipped", f"probe set {name!r}: {len(skipped)} of {len(entries)} "
                      f"image(s) unreadable and left out (first: {skipped[0][0]}: "
                      f"{skipped[0][1]})", probe=name, skipped=[list(x) for x in skipped])
    if not items:
        raise ProbeError(f"probe set {name!r}: none of the {len(entries)} images could be read "
                         f"(first problem: {skipped[0][0]}: {skipped[0][1]})." if skipped
                         else f"probe set {name!r} is empty.")
    return ProbeSet(name, items, skipped, params)


def union(*sets: ProbeSet) -> ProbeSet:
    """Concatenate probe sets in order (nothing de-duplicated); ids run on across the parts.

    >>> union(load_probe("offline-sample"), load_probe("folder", path="/x")).name
    'offline-sample+folder'
    """
    if not sets:
        raise ProbeError("union() needs at least one probe set.")
    return ProbeSet("+".join(s.name for s in sets), [it for s in sets for it in s.items],
                    [sk for s in sets for sk in s.skipped],
                    {"parts": [{"name": s.name, **s.params} for s in sets]},
                    {k: v for s in sets for k, v in s.arrays.items()})
