"""The built-in probe-set sources: one loader per name that `probes.load_probe` accepts.

Each source is a function that lists its images (path, label, class index) and builds the set
with `probe_set._build`; `_REGISTRY` maps the names `probes.load_probe` accepts to them.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import importlib.resources
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError, OfflineError, ProbeError
from .probe_set import ProbeItem, ProbeSet, _build

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
