"""Content keys, manifests and atomic publication of stage outputs."""
import json

import pytest

from nd_utils.errors import DamagedArtifactError, MissingArtifactError
from nd_utils.store import ArtifactStore, sha256_file


def test_key_depends_on_every_input():
    k = ArtifactStore.key("s", 1, {"a": 1}, {"up": "x"}, {"probe": "f"})
    assert k == ArtifactStore.key("s", 1, {"a": 1}, {"up": "x"}, {"probe": "f"})
    others = [ArtifactStore.key("t", 1, {"a": 1}, {"up": "x"}, {"probe": "f"}),
              ArtifactStore.key("s", 2, {"a": 1}, {"up": "x"}, {"probe": "f"}),
              ArtifactStore.key("s", 1, {"a": 2}, {"up": "x"}, {"probe": "f"}),
              ArtifactStore.key("s", 1, {"a": 1}, {"up": "y"}, {"probe": "f"}),
              ArtifactStore.key("s", 1, {"a": 1}, {"up": "x"}, {"probe": "g"})]
    assert len({k, *others}) == 6
    # dict order does not matter
    assert ArtifactStore.key("s", 1, {"a": 1, "b": 2}) == ArtifactStore.key("s", 1, {"b": 2, "a": 1})


def test_writer_publishes_with_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("st", "k1", version=3, params={"p": 1}) as tmp:
        (tmp / "x.txt").write_text("hello")
    art = store.open("st", "k1")
    assert art.manifest["stage_version"] == 3 and art.manifest["params"] == {"p": 1}
    assert art.manifest["files"]["x.txt"]["sha256"] == sha256_file(art.path / "x.txt")
    assert "torch" in art.manifest["packages"]
    art.verify()
    (art.path / "x.txt").write_text("tampered")
    with pytest.raises(DamagedArtifactError, match="x.txt .*--force"):
        art.verify()


def test_crash_leaves_nothing_readable(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("st", "k2") as tmp:
            (tmp / "half.bin").write_bytes(b"123")
            raise RuntimeError("killed")
    assert not store.exists("st", "k2")
    assert not store.path("st", "k2").exists()
    with pytest.raises(MissingArtifactError, match="01_activation_caching.ipynb"):
        store.open("st", "k2", produced_by="notebooks/01_activation_caching.ipynb")
    # the staging folder is kept for resumption, and is reused
    with store.writer("st", "k2") as tmp:
        assert (tmp / "half.bin").read_bytes() == b"123"
    assert json.loads((store.path("st", "k2") / "manifest.json").read_text())["key"] == "k2"


def test_atomic_write_replaces_whole_file(tmp_path):
    from nd_utils.store import atomic_write_text
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in p.parent.iterdir()] == ["f.txt"]
