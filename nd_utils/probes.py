"""Probe sets: ordered, content-identified image collections that neurons are dissected on.

A probe set is a list of images with optional labels. Each image is hashed and
fully decoded once at load time, so unreadable files are reported and dropped
*before* ids (positions) are assigned, and the set's fingerprint depends on
image bytes and labels only, never on where the folder lives.

Registered sets (``list_probes()``) and their parameters:
  folder(path, labels_csv=None, recursive=True)  images under path; labels = sub-folder or CSV
  imagenet-val(path)      wnid sub-folders, or flat files + LOC_val_solution.csv / labels.csv
  broden(path)            index.csv ('image' column) + images/
  cifar100(root="~/.cache/nd_utils/cifar100", train=False)   downloads; in-memory items
  offline-sample()        photos shipped in scikit-image, scikit-learn and foolbox wheels
  imagenet-sample-1k(path=None, download=True)   one photo per ImageNet class, pinned by sha256
                          (a local copy, else downloaded once; see nd_utils.imagenet_sample)

>>> ps = load_probe("offline-sample")
>>> ps.load_image(0).mode, ps.labels[0]
('RGB', 'astronaut')
>>> both = load_probes([{"name": "folder", "path": "/data/a"}, {"name": "folder", "path": "/data/b"}])
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import importlib.resources
import importlib.util
import inspect
import io
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import ConfigError, OfflineError, ProbeError, UnknownNameError, unknown_name
from .notices import record_notice

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard
lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
# Natural photographs and textures in skimage/data; synthetic patterns (chessboard, logo, phantom,
# colour wheel, horse silhouette) and near-duplicates (motorcycle_right) are left out on purpose.
SKIMAGE_PHOTOS = {
    "astronaut.png": "astronaut", "camera.png": "cameraman", "coffee.png": "cup of coffee",
    "chelsea.png": "cat", "rocket.jpg": "rocket", "motorcycle_left.png": "motorcycle",
    "brick.png": "brick wall", "grass.png": "grass", "gravel.png": "gravel", "coins.png": "coins",
    "moon.png": "moon surface", "page.png": "text page", "text.png": "handwritten equations",
    "hubble_deep_field.jpg": "galaxies", "retina.jpg": "retina", "ihc.png": "stained tissue",
}
SKLEARN_PHOTOS = {"china.jpg": "temple", "flower.jpg": "flower"}
# MNIST / Fashion-MNIST digits in foolbox/data are 28x28 grey glyphs, not photos: excluded.
FOOLBOX_PATTERN = re.compile(r"(imagenet|cifar10|cifar100)_\d+_(\d+)\.(?:jpg|png)")
_WNID = re.compile(r"n\d{8}")
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


def _require_dir(path, kind: str, hint: str) -> Path:
    if path is None:
        raise ConfigError(f"probe set {kind!r} needs path=<directory>. {hint}")
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ProbeError(f"probe set {kind!r}: {root} {what}. {hint}")
    return root


def _scan_images(root: Path, recursive: bool = True) -> list[str]:
    """Relative posix paths of image files under `root`, sorted for determinism."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden entries are editor/OS debris (.ipynb_checkpoints, macOS ._ files), never probes
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _no_images(root: Path, recursive: bool) -> ProbeError:
    how = "recursively " if recursive else ""
    return ProbeError(f"no images found {how}under {root} (searched extensions: "
                      f"{', '.join(IMAGE_EXTENSIONS)}, case-insensitive).")


def _read_labels_csv(csv_path: Path) -> dict[str, tuple[str | None, int | None]]:
    """Map relative file -> (label, class_index) from a CSV with `file` and `label`/`class_name`."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
            cols = rows[0].keys() if rows else []
    except OSError as e:
        raise ProbeError(f"cannot read labels CSV {csv_path}: {e}") from e
    label_col = next((c for c in ("label", "class_name") if c in cols), None)
    if "file" not in cols or label_col is None:
        raise ProbeError(f"labels CSV {csv_path} needs a 'file' column and a 'label' or 'class_name' "
                         f"column; found {list(cols)}.")
    has_idx = "class_index" in cols
    return {Path(r["file"]).as_posix(): (r[label_col] or None,
                                         int(r["class_index"]) if has_idx and r["class_index"] else None)
            for r in rows}


def _imagenet_categories() -> list[str]:
    from torchvision.models import ResNet50_Weights  # metadata only, no download
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _load_folder(path=None, labels_csv=None, recursive: bool = True) -> ProbeSet:
    hint = "Pass path= pointing at a directory of images, e.g. load_probe('folder', path='~/probe_images')."
    root = _require_dir(path, "folder", hint)
    files = _scan_images(root, recursive)
    if not files:
        raise _no_images(root, recursive)
    table = None
    if labels_csv is not None:
        csv_path = Path(labels_csv).expanduser()
        table = _read_labels_csv(csv_path if csv_path.is_absolute() or csv_path.exists() else root / csv_path)
    entries = []
    for rel in files:
        if table is not None:
            label, ci = table.get(rel, (None, None))
        else:
            parts = rel.split("/")
            label, ci = (parts[-2] if len(parts) > 1 else None), None
        entries.append((str(root / rel), label, ci))
    params = {"path": str(root), "labels_csv": None if labels_csv is None else str(labels_csv),
              "recursive": recursive}
    return _build("folder", params, entries)


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k wnids in class-index order, from the list timm ships.

    torchvision's weight metadata names the classes but not their wnids; timm (installed with
    open_clip) ships the wnid list as package data. Empty when timm is absent.

    >>> imagenet_wnids()[:2]
    ['n01440764', 'n01443537']
    """
    try:
        text = (importlib.resources.files("timm.data") / "_info" / "imagenet_synsets.txt"
                ).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return []
    wnids = text.split()
    return wnids if len(wnids) == 1000 and wnids == sorted(wnids) else []


def _wnid_index(root: Path, present: list[str]) -> dict[str, int]:
    """wnid -> class index: the sorted wnid list when all 1,000 are present, else a full list.

    A full list comes from the data set's own `LOC_synset_mapping.txt` (beside or above the
    folder) or from the wnid list shipped with timm.
    """
    if len(present) == 1000:
        return {w: i for i, w in enumerate(present)}
    for cand in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt"):
        if cand.is_file():
            wnids = [ln.split()[0] for ln in cand.read_text().splitlines() if ln.strip()]
            if len(wnids) == 1000:
                return {w: i for i, w in enumerate(wnids)}
    return {w: i for i, w in enumerate(imagenet_wnids())}


def _load_imagenet_val(path=None) -> ProbeSet:
    hint = ("Pass path= pointing at the ImageNet validation folder (1,000 wnid sub-folders such as "
            "n01440764/, or flat files with LOC_val_solution.csv or labels.csv).")
    root = _require_dir(path, "imagenet-val", hint)
    cats = _imagenet_categories()
    wnid_dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and _WNID.fullmatch(d.name))
    files = [f for f in _scan_images(root, recursive=bool(wnid_dirs))
             if not wnid_dirs or f.split("/")[0] in wnid_dirs]
    if not files:
        raise _no_images(root, bool(wnid_dirs))
    index = _wnid_index(root, wnid_dirs)
    labels: dict[str, tuple[str | None, int | None]] = {}
    if wnid_dirs:
        for f in files:
            w = f.split("/")[0]
            labels[f] = (cats[index[w]], index[w]) if w in index else (w, None)
    elif (root / "LOC_val_solution.csv").is_file():
        with open(root / "LOC_val_solution.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                w = r["PredictionString"].split()[0]
                labels[r["ImageId"]] = (cats[index[w]], index[w]) if w in index else (w, None)
        labels = {f: labels.get(Path(f).stem, (None, None)) for f in files}
    elif (root / "labels.csv").is_file():
        labels = _read_labels_csv(root / "labels.csv")
    if any(lab and ci is None and _WNID.fullmatch(lab) for lab, ci in labels.values()):
        warnings.warn("imagenet-val: some wnids are not ImageNet-1k classes (checked against all "
                      "1,000 wnid folders, LOC_synset_mapping.txt or timm's wnid list); their "
                      "labels are the raw wnids.", stacklevel=3)
    entries = [(str(root / f), *labels.get(f, (None, None))) for f in files]
    return _build("imagenet-val", {"path": str(root)}, entries)


def _load_broden(path=None) -> ProbeSet:
    hint = "Pass path= pointing at a Broden folder (e.g. broden1_224/) holding index.csv and images/."
    root = _require_dir(path, "broden", hint)
    index = root / "index.csv"
    if not index.is_file():
        raise ProbeError(f"probe set 'broden': expected {index} (a CSV with an 'image' column of paths "
                         f"under {root / 'images'}), but it is missing. {hint}")
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image" not in rows[0]:
        raise ProbeError(f"probe set 'broden': {index} has no 'image' column or no rows.")
    entries = [(str(root / "images" / r["image"]), None, None) for r in rows]
    return _build("broden", {"path": str(root)}, entries)


def _load_cifar100(root: str = "~/.cache/nd_utils/cifar100", train: bool = False) -> ProbeSet:
    import torchvision.datasets

    root_path = Path(root).expanduser()
    try:
        ds = torchvision.datasets.CIFAR100(str(root_path), train=train, download=True)
    except (OSError, RuntimeError, http.client.HTTPException) as e:
        raise OfflineError(f"could not download CIFAR-100 into {root_path} ({type(e).__name__}: {e}). "
                           "Offline alternatives: load_probe('offline-sample'), "
                           "load_probe('imagenet-sample-1k'), or load_probe('folder', path=...).") from e
    items, arrays = [], {}
    for arr, target in zip(ds.data, ds.targets):
        sha = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
        arrays[sha] = arr
        items.append(ProbeItem("", ds.classes[target], "cifar100", sha))
    return ProbeSet("cifar100", items, [], {"root": str(root_path), "train": train}, arrays)


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it (importing is slow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _load_offline_sample() -> ProbeSet:
    entries, missing = [], []
    for package, sub, table in (("skimage", "data", SKIMAGE_PHOTOS),
                                ("sklearn", "datasets/images", SKLEARN_PHOTOS), ("foolbox", "data", None)):
        base = _package_dir(package)
        if base is None:
            missing.append(package)
            continue
        folder = base / sub
        if table is not None:
            entries += [(str(folder / f), lab, None) for f, lab in table.items() if (folder / f).is_file()]
            continue
        cats = _imagenet_categories()
        for f in sorted(os.listdir(folder)) if folder.is_dir() else []:
            m = FOOLBOX_PATTERN.fullmatch(f)
            if m:
                kind, idx = m.group(1), int(m.group(2))
                names = {"imagenet": cats, "cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}[kind]
                entries.append((str(folder / f), names[idx], idx if kind == "imagenet" else None))
    pip_names = {"skimage": "scikit-image", "sklearn": "scikit-learn", "foolbox": "foolbox"}
    if not entries:
        raise ProbeError("probe set 'offline-sample' found no images: it uses photos shipped inside "
                         "packages; run `pip install scikit-image scikit-learn foolbox`.")
    if missing:
        warnings.warn(f"offline-sample: {', '.join(pip_names[p] for p in missing)} not installed; "
                      "its photos are left out.", stacklevel=3)
    return _build("offline-sample", {}, entries)


def _load_imagenet_sample_1k(path=None, download: bool = True) -> ProbeSet:
    from .imagenet_sample import locate_imagenet_sample, sample_class_index, sample_pins
    root = locate_imagenet_sample(path, download=download)
    cats, index = _imagenet_categories(), sample_class_index()
    entries = []
    for name in sample_pins():
        ci = index[name.split("_", 1)[0]]
        entries.append((str(root / name), cats[ci], ci))
    return _build("imagenet-sample-1k", {"path": None if path is None else str(root),
                                         "download": download}, entries)


_REGISTRY: dict[str, Callable[..., ProbeSet]] = {
    "folder": _load_folder, "imagenet-val": _load_imagenet_val, "broden": _load_broden,
    "cifar100": _load_cifar100, "offline-sample": _load_offline_sample,
    "imagenet-sample-1k": _load_imagenet_sample_1k,
}


def probe_set_names(specs) -> str:
    """The names of the probe specs of a config key, as one string ("a + b").

    >>> probe_set_names([{"name": "imagenet-sample-1k"}, {"name": "folder", "path": "x"}])
    'imagenet-sample-1k + folder'
    """
    return " + ".join(str(spec["name"]) for spec in specs or [])


def list_probes() -> list[str]:
    """Names accepted by load_probe.

    >>> list_probes()[:2]
    ['folder', 'imagenet-val']
    """
    return list(_REGISTRY)


def load_probe(name: str, **params) -> ProbeSet:
    """Load the registered probe set `name` with its parameters.

    >>> load_probe("folder", path="/data/imgs", recursive=False)
    """
    if name not in _REGISTRY:
        raise unknown_name("probe set", name, list_probes(), "See nd_utils.probes.list_probes().")
    accepted = list(inspect.signature(_REGISTRY[name]).parameters)
    for key in params:
        if key not in accepted:
            if not accepted:
                raise UnknownNameError(f"probe set {name!r} takes no parameters; got {key!r}.")
            raise unknown_name(f"parameter of probe set {name!r}:", key, accepted,
                               f"Probe set {name!r} accepts: {', '.join(accepted)}.")
    return _REGISTRY[name](**params)


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
