"""Tests of nd_utils.probes on real files: shipped photos, temporary folders, the shared 1k sample."""
from __future__ import annotations

import csv
import os
import shutil
import urllib.error
import warnings

import numpy as np
import pytest
from PIL import Image

from nd_utils import probe_sources
from nd_utils.errors import ConfigError, OfflineError, ProbeError, UnknownNameError
from nd_utils.probe_set import ProbeSet, union
from nd_utils.probes import list_probes, load_probe, load_probes


def _save(path, color, fmt=None, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(color))
    arr = np.clip(rng.normal(color, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, fmt)
    return path


@pytest.fixture
def pets(tmp_path):
    """cat/ and dog/ with 2 good images each, a random-bytes bad.jpg and a truncated JPEG."""
    root = tmp_path / "pets"
    _save(root / "cat" / "a.png", (200, 10, 10))
    _save(root / "cat" / "b.JPG", (10, 200, 10), "JPEG")
    _save(root / "dog" / "c.jpeg", (10, 10, 200), "JPEG")
    _save(root / "dog" / "d.png", (120, 120, 10))
    (root / "cat" / "bad.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    full = _save(tmp_path / "full.jpg", (50, 60, 70), "JPEG", size=(64, 64)).read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(full[: len(full) // 2])
    (root / "notes.txt").write_text("not an image")
    return root


def _load_quiet(name, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_probe(name, **params)


def test_list_probes():
    assert list_probes() == ["folder", "imagenet-val", "broden", "cifar100",
                             "offline-sample", "imagenet-sample-1k"]


def test_offline_sample():
    ps = load_probe("offline-sample")
    assert len(ps) >= 50 and not ps.skipped
    by_file = {os.path.basename(it.path): it for it in ps.items}
    assert by_file["imagenet_00_243.jpg"].label == "bull mastiff"
    assert by_file["imagenet_00_243.jpg"].class_index == 243
    assert by_file["chelsea.png"].label == "cat"
    assert by_file["cifar100_00_49.png"].label == "mountain"
    assert by_file["cifar10_00_3.png"].label == "cat"
    assert not any(name.startswith(("mnist", "fashionMNIST")) for name in by_file)
    assert all(lab for lab in ps.labels)
    for i in range(len(ps)):
        im = ps.load_image(i)
        assert im.mode == "RGB" and im.width > 0 and im.height > 0
    assert load_probe("offline-sample").fingerprint == ps.fingerprint
    d = ps.describe()
    assert d["n_images"] == len(ps) and d["n_labelled"] == len(ps) and d["fingerprint"] == ps.fingerprint


def test_offline_sample_without_packages(monkeypatch):
    monkeypatch.setattr(probe_sources, "_package_dir", lambda name: None)
    with pytest.raises(ProbeError, match="pip install"):
        load_probe("offline-sample")


def test_folder_skips_bad_images(pets):
    with pytest.warns(UserWarning, match="2 unreadable"):
        ps = load_probe("folder", path=str(pets))
    assert sorted(os.path.basename(p) for p, _ in ps.skipped) == ["bad.jpg", "cut.jpg"]
    assert all(reason for _, reason in ps.skipped)
    rel = [os.path.relpath(it.path, pets) for it in ps.items]
    assert rel == ["cat/a.png", "cat/b.JPG", "dog/c.jpeg", "dog/d.png"]
    assert ps.labels == ["cat", "cat", "dog", "dog"]
    assert all(it.source == "folder" for it in ps.items)
    assert [ps.load_image(i).mode for i in range(len(ps))] == ["RGB"] * 4
    assert ps.describe()["n_skipped"] == 2
    sub = ps.subset(2)
    assert sub.name == "folder[:2]" and len(sub) == 2 and sub.items == ps.items[:2]


def test_folder_labels_csv_and_modes(tmp_path):
    root = tmp_path / "flat"
    _save(root / "x.png", (1, 2, 3))
    Image.new("L", (8, 8), 77).save(root / "grey.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(root / "clear.png")
    Image.new("P", (8, 8), 3).save(root / "pal.gif")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "class_name"], ["x.png", "thing"], ["grey.png", "grey"]])
    ps = load_probe("folder", path=root, labels_csv=tmp_path / "labels.csv")
    assert ps.labels == [None, "grey", None, "thing"]  # clear.png, grey.png, pal.gif, x.png
    ims = [ps.load_image(i) for i in range(len(ps))]
    assert all(im.mode == "RGB" for im in ims)
    assert ims[0].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert load_probe("folder", path=root).labels == [None] * 4  # flat folder: no labels


def test_fingerprint_follows_content_not_path(pets, tmp_path):
    before = _load_quiet("folder", path=pets).fingerprint
    moved = tmp_path / "elsewhere" / "pets_moved"
    shutil.move(str(pets), moved)
    assert _load_quiet("folder", path=moved).fingerprint == before
    _save(moved / "dog" / "d.png", (0, 250, 250))
    assert _load_quiet("folder", path=moved).fingerprint != before


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ProbeError, match="nope.*does not exist"):
        load_probe("folder", path=missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ProbeError, match=r"empty.*\.jpg.*\.tiff"):
        load_probe("folder", path=tmp_path / "empty")
    with pytest.raises(UnknownNameError, match="path, labels_csv, recursive"):
        load_probes([{"name": "folder", "pth": str(tmp_path)}])
    with pytest.raises(UnknownNameError, match="offline-sample"):
        load_probe("offline-smaple")
    with pytest.raises(ConfigError, match="path="):
        load_probe("folder")
    with pytest.raises(UnknownNameError, match="no parameters"):
        load_probe("offline-sample", path="/x")


def test_all_bad_images_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning), pytest.raises(ProbeError, match="none of the 1 images"):
        load_probe("folder", path=tmp_path)


def test_union_of_folders(tmp_path):
    _save(tmp_path / "a" / "red" / "1.png", (250, 0, 0))
    _save(tmp_path / "a" / "red" / "2.png", (240, 0, 0))
    _save(tmp_path / "b" / "blue" / "1.png", (0, 0, 250))
    a, b = load_probe("folder", path=tmp_path / "a"), load_probe("folder", path=tmp_path / "b")
    u = load_probes([{"name": "folder", "path": str(tmp_path / "a")},
                     {"name": "folder", "path": str(tmp_path / "b")}])
    assert isinstance(u, ProbeSet) and u.name == "folder+folder"
    assert len(u) == len(a) + len(b) == 3
    assert u.items == a.items + b.items and u.labels == ["red", "red", "blue"]
    assert union(a, b).fingerprint == u.fingerprint != union(b, a).fingerprint
    assert [p["path"] for p in u.describe()["params"]["parts"]] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_broden_layout(tmp_path):
    root = tmp_path / "broden1_224"
    _save(root / "images" / "ade20k" / "z.jpg", (9, 9, 9), "JPEG")
    _save(root / "images" / "pascal" / "a.jpg", (99, 9, 9), "JPEG")
    (root / "index.csv").write_text("image,split,ih,iw\nade20k/z.jpg,train,16,24\npascal/a.jpg,train,16,24\n")
    ps = load_probe("broden", path=root)
    assert [os.path.basename(it.path) for it in ps.items] == ["z.jpg", "a.jpg"]  # index order, not sorted
    assert ps.labels == [None, None]
    (root / "index.csv").unlink()
    with pytest.raises(ProbeError, match="index.csv"):
        load_probe("broden", path=root)


def test_imagenet_val_wnid_folders(tmp_path, monkeypatch):
    root = tmp_path / "val"
    _save(root / "n01443537" / "ILSVRC2012_val_2.JPEG", (200, 120, 0), "JPEG")
    _save(root / "n01440764" / "ILSVRC2012_val_1.JPEG", (20, 120, 0), "JPEG")
    # a full 1,000-wnid list fixes the class indices even though only 2 folders exist
    fake = ["n01440764", "n01443537"] + [f"n9{i:07d}" for i in range(998)]
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{w} desc\n" for w in fake))
    ps = load_probe("imagenet-val", path=root)
    assert ps.labels == ["tench", "goldfish"]
    assert [it.class_index for it in ps.items] == [0, 1]
    (tmp_path / "LOC_synset_mapping.txt").unlink()
    # no list beside the data (a user's copy of a few classes): timm's wnid list gives the
    # indices, with no development folder (ND_SHARED_DIR) anywhere to be found
    monkeypatch.setenv("ND_SHARED_DIR", str(tmp_path / "absent"))
    _save(root / "n15075141" / "ILSVRC2012_val_3.JPEG", (9, 9, 9), "JPEG")  # the last class
    ps = load_probe("imagenet-val", path=root)
    assert ps.labels == ["tench", "goldfish", "toilet tissue"]
    assert [it.class_index for it in ps.items] == [0, 1, 999]
    # a wnid outside ImageNet-1k keeps its raw wnid, with a warning; so do all without timm
    _save(root / "n99999999" / "x.JPEG", (9, 9, 9), "JPEG")
    with pytest.warns(UserWarning, match="raw wnids"):
        assert load_probe("imagenet-val", path=root).labels[-1] == "n99999999"
    monkeypatch.setattr(probe_sources, "imagenet_wnids", lambda: [])
    with pytest.warns(UserWarning, match="raw wnids"):
        assert load_probe("imagenet-val", path=root).labels[:2] == ["n01440764", "n01443537"]


def test_cifar100_offline(monkeypatch, tmp_path):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", no_network)
    with pytest.raises(OfflineError, match="offline-sample") as err:
        load_probe("cifar100", root=str(tmp_path))
    assert "imagenet-sample-1k" in str(err.value) and "folder" in str(err.value)


def test_imagenet_sample_1k():
    from nd_utils.imagenet_sample import local_copy_dir
    if not local_copy_dir().is_dir():
        pytest.skip(f"no local copy of the ImageNet sample at {local_copy_dir()} (set "
                    f"ND_SHARED_DIR to the folder holding data/imagenet-sample-images)")
    ps = load_probe("imagenet-sample-1k", download=False)
    assert len(ps) == 1000 and not ps.skipped
    first = ps.items[0]
    assert first.class_index == 0 and first.label == "tench"
    assert first.path.endswith("/n01440764_tench.JPEG")
    assert sorted(it.class_index for it in ps.items) == list(range(1000))
    assert ps.items[949].label == "strawberry" and ps.items[949].path.endswith("n07745940_strawberry.JPEG")
    assert ps.load_image(999).mode == "RGB"


def test_imagenet_sample_1k_missing(tmp_path):
    with pytest.raises(ProbeError, match="not a folder.*1,000 JPEGs"):
        load_probe("imagenet-sample-1k", path=tmp_path / "missing")
