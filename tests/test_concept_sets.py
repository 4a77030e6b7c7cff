"""Concept sets: line parsing, pinned paper files, downloads (mocked), offline sets, cleaning."""
from __future__ import annotations

import hashlib
import io
import os
import urllib.error
from pathlib import Path

import pytest

import nd_utils
from nd_utils import concept_text, paper_concept_files
from nd_utils.concept_sets import ConceptSet, list_concept_sets, load_concept_set
from nd_utils.concept_text import parse_concept_text
from nd_utils.errors import NdUtilsError, OfflineError, UnknownNameError


def _shared_sets() -> Path:
    base = os.environ.get("ND_SHARED_DIR")
    shared = Path(base) if base else Path(nd_utils.__file__).resolve().parents[2] / "shared"
    return shared / "data" / "reference" / "concept_sets"


REF = _shared_sets()
needs_ref = pytest.mark.skipif(not (REF / "20k.txt").is_file(),
                               reason=f"shared reference concept sets absent: {REF} (set ND_SHARED_DIR)")


pytestmark = pytest.mark.usefixtures("isolated_concepts")  # tests/conftest.py


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"])
def test_parse_line_endings(sep):
    text = sep.join(["dog", "", "  cat  ", "\t", "hot dog ", "", "bird"]) + sep
    assert parse_concept_text(text) == ["dog", "cat", "hot dog", "bird"]


def test_parse_mixed_endings_positions():
    text = "\ufeffa\r\nb\rc\n\r\n\rd  \n e f\r\n\n"
    got = parse_concept_text(text)
    assert got == ["a", "b", "c", "d", "e f"]
    assert got.index("d") == 3  # the three blank lines before "d" shift nothing
    assert parse_concept_text("") == [] and parse_concept_text("\r\n\n\r") == []


def test_parse_other_unicode_breaks_are_not_line_ends():
    assert parse_concept_text("a\x0cb\u2028c\nd") == ["a\x0cb\u2028c", "d"]


def test_file_report_counts_blank_lines(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_bytes(b"dog\r\n\r\ncat\r\n  \r\nbird")
    cs = load_concept_set(str(p))
    assert list(cs) == ["dog", "cat", "bird"] and cs[2] == "bird"
    assert cs.report["n_raw_lines"] == 5 and cs.report["n_blank"] == 2
    assert cs.report["blank_lines"] == [2, 4]
    assert cs.name == "mine" and cs.source == str(p.resolve())
    assert cs.sha256 == hashlib.sha256(b"dog\ncat\nbird").hexdigest()


# ---------------------------------------------------------------- paper files
@needs_ref
@pytest.mark.parametrize("name", list(paper_concept_files.PAPER_SETS))
def test_pins_match_reference_copies(name):
    pin = paper_concept_files.PAPER_SETS[name][0]
    assert hashlib.sha256((REF / f"{name}.txt").read_bytes()).hexdigest() == pin


@needs_ref
@pytest.mark.parametrize("name,size", [("20k", 20000), ("10k", 9894), ("3k", 3000),
                                       ("broden_labels_clean", 1197), ("imagenet_labels", 1000)])
def test_load_paper_sets_locally(name, size, monkeypatch):
    cs = load_concept_set(name, local_dir=REF, dedupe=False)
    assert len(cs) == size == paper_concept_files.PAPER_SETS[name][1]
    assert cs.report["file_sha256"] == paper_concept_files.PAPER_SETS[name][0]
    monkeypatch.setenv("ND_CONCEPT_DIR", str(REF))
    assert load_concept_set(name, dedupe=False).concepts == cs.concepts


@needs_ref
def test_paper_set_details():
    broden = load_concept_set("broden_labels_clean", local_dir=REF)  # dedupe on by default
    assert len(broden) == 1153 and len(broden.report["duplicates"]) == 44
    assert "shed" in broden.report["duplicates"] and broden.concepts.count("shed") == 1
    labels = load_concept_set("imagenet_labels", local_dir=REF)  # index-aligned: no dedupe
    assert labels[0] == "tench, Tinca tinca" and labels.report["options"]["dedupe"] is False
    ten, twenty = load_concept_set("10k", local_dir=REF), load_concept_set("20k", local_dir=REF)
    kept = set(ten)
    assert kept < set(twenty[:10000])  # 10k = 20k[:10000] minus 106 words, order kept
    assert [w for w in twenty[:10000] if w in kept] == list(ten)


@needs_ref
def test_bare_cr_file():
    p = REF / "le_imagenet_labels_clean.txt"
    assert b"\n" not in p.read_bytes()
    assert len(parse_concept_text(p.read_text())) == 1000
    raw = load_concept_set(str(p), dedupe=False)
    assert len(raw) == 1000 and raw.report["n_blank"] == 0
    cs = load_concept_set(str(p))
    assert len(cs) == 998 and sorted(cs.report["duplicates"]) == ["missile", "sunglasses"]


def test_local_dir_wrong_hash_and_missing(tmp_path):
    (tmp_path / "3k.txt").write_text("a\nb\n")
    with pytest.raises(NdUtilsError, match="expected 4258"):
        load_concept_set("3k", local_dir=tmp_path)
    with pytest.raises(NdUtilsError, match="holds no 10k.txt"):
        load_concept_set("10k", local_dir=tmp_path)


# ---------------------------------------------------------------- downloads (mocked)
class _Resp(io.BytesIO):
    pass


def _pin(monkeypatch, data: bytes):
    monkeypatch.setitem(paper_concept_files.PAPER_SETS, "3k", (hashlib.sha256(data).hexdigest(), 3))


def test_download_offline(monkeypatch, tmp_path):
    def fail(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(paper_concept_files, "urlopen", fail)
    with pytest.raises(OfflineError) as err:
        load_concept_set("20k", cache_dir=tmp_path / "c")
    msg = str(err.value)
    for alt in ("words-20k", "imagenet_classes", "cifar100_classes", "ND_CONCEPT_DIR", "local_dir"):
        assert alt in msg
    assert str(tmp_path / "c" / "20k.txt") in msg and paper_concept_files.PAPER_SETS["20k"][0] in msg
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    with pytest.raises(OfflineError, match="allow_download=False"):
        load_concept_set("20k", cache_dir=tmp_path / "c", allow_download=False)


def test_download_caches_after_hash_check(monkeypatch, tmp_path):
    data = b"red\ngreen\n\nblue\n"
    _pin(monkeypatch, data)
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        return _Resp(data)
    monkeypatch.setattr(paper_concept_files, "urlopen", serve)
    cs = load_concept_set("3k", cache_dir=tmp_path)
    assert list(cs) == ["red", "green", "blue"] and cs.source == paper_concept_files.BASE_URL + "3k.txt"
    assert urls == [paper_concept_files.BASE_URL + "3k.txt"]
    assert (tmp_path / "3k.txt").read_bytes() == data
    again = load_concept_set("3k", cache_dir=tmp_path, allow_download=False)  # from the cache
    assert again.concepts == cs.concepts and len(urls) == 1 and again.source == str(tmp_path / "3k.txt")


def test_download_wrong_bytes_caches_nothing(monkeypatch, tmp_path):
    _pin(monkeypatch, b"red\ngreen\n")
    monkeypatch.setattr(paper_concept_files, "urlopen",
                        lambda url, timeout=None: _Resp(b"<html>moved</html>"))
    with pytest.raises(NdUtilsError, match="nothing was cached"):
        load_concept_set("3k", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c" / "3k.txt").exists()


def test_damaged_cache_is_replaced(monkeypatch, tmp_path):
    data = b"red\ngreen\n"
    _pin(monkeypatch, data)
    (tmp_path / "3k.txt").write_bytes(b"tampered\n")
    with pytest.raises(NdUtilsError, match="replace or delete"):
        load_concept_set("3k", cache_dir=tmp_path, allow_download=False)
    monkeypatch.setattr(paper_concept_files, "urlopen", lambda url, timeout=None: _Resp(data))
    assert list(load_concept_set("3k", cache_dir=tmp_path)) == ["red", "green"]
    assert (tmp_path / "3k.txt").read_bytes() == data


# ---------------------------------------------------------------- offline sets
def test_imagenet_classes_index_order():
    cs = load_concept_set("imagenet_classes")
    assert len(cs) == 1000 and cs[0] == "tench" and cs[1] == "goldfish"
    assert cs[134] == "crane bird" and cs[517] == "crane"  # torchvision names are already unique
    assert cs.report["options"]["dedupe"] is False and cs.report["index_aligned"]


def test_cifar100_classes():
    cs = load_concept_set("cifar100_classes")
    assert len(cs) == 100 and cs[1] == "aquarium fish"
    if (REF / "le_cifar100_labels_clean.txt").is_file():
        assert list(cs) == parse_concept_text((REF / "le_cifar100_labels_clean.txt").read_text())


@pytest.mark.parametrize("name,n", [("words-3k", 3000), ("words-10k", 10000), ("words-250", 250)])
def test_words_sizes(name, n):
    cs = load_concept_set(name)
    assert len(cs) == n and cs[:3] == ("the", "of", "and") and not cs.report["duplicates"]


@needs_ref
def test_words_match_paper_20k():
    twenty = load_concept_set("20k", local_dir=REF)
    assert load_concept_set("words-10k").concepts == twenty[:10000]
    words20 = load_concept_set("words-20k")
    assert words20.concepts == twenty.concepts and words20.sha256 == twenty.sha256


def test_words_errors():
    with pytest.raises(NdUtilsError, match="holds only"):
        load_concept_set("words-1000k")
    with pytest.raises(NdUtilsError, match="at least 1"):
        load_concept_set("words-0")


# ---------------------------------------------------------------- cleaning and errors
def test_dedupe_keeps_first_and_reports(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("dog\ncat\ndog\nDog\ncat\n")
    cs = load_concept_set(str(p))
    assert list(cs) == ["dog", "cat", "Dog"] and cs.report["duplicates"] == ["dog", "cat"]
    assert not cs.report["index_aligned"]
    assert list(load_concept_set(str(p), dedupe=False)) == ["dog", "cat", "dog", "Dog", "cat"]


def test_stopwords_and_profanity(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("The\ndog\nof\nfire\nShit\ncan\nfuck\ncock\nhot dog\n")
    assert len(load_concept_set(str(p))) == 9  # defaults drop nothing
    cs = load_concept_set(str(p), drop_stopwords=True, drop_profanity=True)
    assert list(cs) == ["dog", "fire", "can", "cock", "hot dog"]
    assert cs.report["stopwords_dropped"] == ["The", "of"]
    assert cs.report["profanity_dropped"] == ["Shit", "fuck"]
    words = load_concept_set("words-10k", drop_profanity=True)
    assert "fuck" not in words and "the" in words and len(words) < 10000


def test_empty_files(tmp_path):
    for content in (b"", b"\n \r\n\t\r"):
        p = tmp_path / "empty.txt"
        p.write_bytes(content)
        with pytest.raises(NdUtilsError, match=f"{p.name}.*empty"):
            load_concept_set(str(p))
    p.write_text("the\nof\n")
    with pytest.raises(NdUtilsError, match="empty after cleaning"):
        load_concept_set(str(p), drop_stopwords=True)
    p.write_bytes(b"caf\xe9\n")
    with pytest.raises(NdUtilsError, match="not UTF-8"):
        load_concept_set(str(p))


def test_empty_after_cleaning_names_the_file(tmp_path):
    p = tmp_path / "only_stopwords.txt"
    p.write_text("the\nof\nthe\nShit\nShit\n")
    with pytest.raises(NdUtilsError) as err:
        load_concept_set(str(p), drop_stopwords=True, drop_profanity=True)
    msg = str(err.value)
    assert str(p.resolve()) in msg and "empty after cleaning" in msg and "clip_dissect.clean" in msg
    assert "5 concept(s) were all dropped (3 stop-words, 2 profanities;" in msg


# ---------------------------------------------------------------- size limits
def test_long_concept_names_file_line_length_and_fix(tmp_path):
    p = tmp_path / "long.txt"
    p.write_bytes(b"dog\r\n\r\ncat\r" + b"x" * 300 + b"\nbird\n" + b"y" * 257 + b"\n")
    with pytest.raises(NdUtilsError) as err:
        load_concept_set(str(p))
    msg = str(err.value)
    assert str(p.resolve()) in msg and "line 4:" in msg       # the blank line 2 is counted
    assert "300 characters" in msg and "limit 256" in msg and "(2 lines are too long)" in msg
    assert "one concept a line" in msg and "max_concept_chars=" in msg
    cs = load_concept_set(str(p), max_concept_chars=300)      # the documented way round it
    assert list(cs)[2] == "x" * 300 and len(cs) == 5
    ok = tmp_path / "ok.txt"
    ok.write_text("a" * concept_text.MAX_CONCEPT_CHARS + "\n")    # the limit itself is allowed
    assert len(load_concept_set(str(ok))[0]) == 256


def test_megabyte_single_line_fails_fast(tmp_path):
    """A 5 MB line (under the file limit): an error naming line 1, before any encoding."""
    p = tmp_path / "one_line.txt"
    p.write_bytes(b"word " * (1 << 20))
    with pytest.raises(NdUtilsError, match=r"one_line.txt, line 1: a concept of 5,242,87\d "
                                           r"characters"):
        load_concept_set(str(p))


def test_huge_file_refused_reading_at_most_the_limit(tmp_path, monkeypatch):
    import tracemalloc
    p = tmp_path / "huge.txt"
    with open(p, "wb") as fh:                                   # sparse: 1 GiB of NUL bytes
        fh.truncate(1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(NdUtilsError) as err:
            load_concept_set(str(p))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * concept_text.MAX_FILE_BYTES                   # never the whole gigabyte
    msg = str(err.value)
    assert str(p) in msg and "1,073,741,824 bytes" in msg and f"{concept_text.MAX_FILE_BYTES:,}" in msg
    assert "line 1 alone holds a concept of at least 8,388,608 characters" in msg
    # many short lines: the size alone is the reason given
    many = tmp_path / "many.txt"
    many.write_bytes(b"word\n" * (concept_text.MAX_FILE_BYTES // 5 + 1))
    with pytest.raises(NdUtilsError, match=r"many.txt has 8,388,610 bytes.*probably not a list"):
        load_concept_set(str(many))
    # the 10 MB line that once exhausted memory while encoding: named by its line
    big = tmp_path / "big.txt"
    big.write_text("dog\n" + "x" * 10_000_000 + "\ncat\n")
    with pytest.raises(NdUtilsError, match=r"big.txt has 10,000,009 bytes.*line 2 alone holds"):
        load_concept_set(str(big))
    # a paper-set name in ND_CONCEPT_DIR is size-checked before its hash is computed
    with open(tmp_path / "3k.txt", "wb") as fh:
        fh.truncate(concept_text.MAX_FILE_BYTES + 1)
    monkeypatch.setenv("ND_CONCEPT_DIR", str(tmp_path))
    with pytest.raises(NdUtilsError, match="3k.txt has 8,388,609 bytes"):
        load_concept_set("3k")


def test_shipped_sets_are_within_the_limits():
    for name in ("imagenet_classes", "cifar100_classes", "words-20k"):
        assert max(map(len, load_concept_set(name))) <= concept_text.MAX_CONCEPT_CHARS // 2


@needs_ref
def test_reference_sets_are_within_the_limits():
    for path in sorted(REF.glob("*.txt")):
        assert path.stat().st_size < concept_text.MAX_FILE_BYTES // 50, path
        assert max(map(len, parse_concept_text(path.read_text("utf-8")))) <= 121, path


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(UnknownNameError, match="20k") as err:
        load_concept_set("20K")
    assert "path of a text file" in str(err.value)
    with pytest.raises(NdUtilsError, match="does not exist"):
        load_concept_set(str(tmp_path / "nope.txt"))


def test_list_and_dataclass():
    names = list_concept_sets()
    assert names[:5] == ["20k", "10k", "3k", "broden_labels_clean", "imagenet_labels"]
    assert {"imagenet_classes", "words-10k"} <= set(names)
    cs = ConceptSet("toy", ("a", "b"), "inline", "x", {"n": 1})
    assert len(cs) == 2 and list(cs) == ["a", "b"] and cs[-1] == "b" and hash(cs)
    with pytest.raises(AttributeError):
        cs.name = "other"
