"""Concept sets: the word lists whose text embeddings describe neurons (CLIP-Dissect, DnD).

A concept set is an ordered tuple of strings. The index of a concept is its position in
`ConceptSet.concepts`, which is exactly the list that gets encoded: blank lines are dropped
*before* indexing, so a blank line never shifts later labels.

Names (see `list_concept_sets()`):
  20k, 10k, 3k, broden_labels_clean, imagenet_labels
      The paper's files, fetched from the CLIP-Dissect GitHub repository and checked against a
      pinned sha256. Looked up in order: `local_dir=` (strict), `$ND_CONCEPT_DIR`, the cache
      (`cache_dir=`, `$ND_CONCEPT_CACHE` or ~/.cache/nd_utils/concept_sets), then the network.
  imagenet_classes   the 1,000 torchvision ImageNet class names, class k at index k (offline).
  cifar100_classes   the 100 CIFAR-100 class names, '_' replaced by ' ' (offline).
  words-<N>, words-<N>k
      The N most frequent words of Norvig's unigram list shipped in `wordsegment` (offline).
      words-20k is identical, word for word, to the paper's 20k file; `10k` is NOT words-10k:
      it is 20k[:10000] with 106 adult/profane words removed (9,894 words).
  any other string   the path of a UTF-8 text file, one concept a line.

Limits: a file (or download) above `MAX_FILE_BYTES` (8 MiB) is refused before it is read, and
a concept longer than `MAX_CONCEPT_CHARS` (256 characters; `max_concept_chars=` raises it) is an
error naming the file and line: both catch files that are not one-concept-a-line lists.

Cleaning (all off except `dedupe`, so defaults reproduce the paper's lists): `dedupe` keeps the
first occurrence of each exact string; it defaults to False for index-aligned class lists
(imagenet_labels, imagenet_classes, cifar100_classes) so that class k stays at index k.
`drop_stopwords` / `drop_profanity` drop concepts equal (case-insensitively) to an entry of a
small built-in list; the profanity list is deliberately short and incomplete. Everything dropped
is listed in `ConceptSet.report`.

Example:
    >>> cs = load_concept_set("words-3k")
    >>> len(cs), cs[0]
    (3000, 'the')
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.request import urlopen

from .errors import NdUtilsError, OfflineError, unknown_name
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
INDEX_ALIGNED = {"imagenet_labels", "imagenet_classes", "cifar100_classes"}
OFFLINE_SETS = ("imagenet_classes", "cifar100_classes", "words-3k", "words-10k", "words-20k")
_WORDS_RE = re.compile(r"words-(\d+)(k?)")
# Size limits, far above any real concept list, so that a wrong file fails fast with a clear
# message instead of exhausting memory in the text encoder (a 10 MB "concept" once did).
MAX_FILE_BYTES = 8 << 20  # bytes per concept file or download; the largest paper file is 155 kB
MAX_CONCEPT_CHARS = 256   # characters per concept; the longest in the paper's sets has 121
_MAX_DOWNLOAD = MAX_FILE_BYTES

# Function words only (articles, pronouns, prepositions, conjunctions, auxiliaries, determiners):
# content words such as "fire" or "computer" (in some stop lists) and "can" (a CIFAR-100 class)
# are kept on purpose.
STOPWORDS = frozenset("""
a an the this that these those some any each every either neither both all no none such
i me my myself we us our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves one ones who whom whose which
what whatever whoever where when why how there here then than
and or but nor so yet if because as while although though unless until whether
of in on at by for with without within about above below over under into onto upon from to up
down out off through across along among around against before after during since toward towards
between beyond behind beside besides via per near
am is are was were be been being have has had having do does did doing done will would shall
should could may might must ought cannot
not no yes also very too just only even still again ever never more most less least much many
few other another own same else enough quite rather almost
s t d ll m re ve y don isn aren wasn weren doesn didn hasn haven hadn shouldn wouldn couldn
""".split())
# A small, incomplete list of common English profanities and explicit terms. Words with an
# ordinary visual meaning (e.g. "cock" = rooster, "ass" = donkey, "tit" = bird) are NOT listed.
PROFANITY = frozenset("""
fuck fucks fucked fucker fuckers fucking motherfucker shit shits shitty bullshit bitch bitches
cunt cunts dick dicks pussy asshole assholes arsehole bastard bastards slut sluts whore whores
wank wanker twat piss pissed pissing crap damn goddamn bollocks porn porno porns
pornography blowjob blowjobs handjob handjobs cumshot cumshots dildo dildos boobs tits
nigger niggers faggot faggots
""".split())


@dataclass(frozen=True)
class ConceptSet:
    """An ordered, cleaned list of concepts; `cs[k]` is the label encoded at row k.

    Example:
        >>> cs = ConceptSet("toy", ("dog", "cat"), "inline", _sha256_concepts(["dog", "cat"]), {})
        >>> list(cs), cs[1], len(cs)
        (['dog', 'cat'], 'cat', 2)
    """

    name: str
    concepts: tuple[str, ...]
    source: str  # URL, package or file path the list came from
    sha256: str  # sha256 of "\n".join(concepts) (UTF-8): identifies the content for cache keys
    report: dict = field(default_factory=dict, compare=False, hash=False)

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.concepts)

    def __getitem__(self, i):
        return self.concepts[i]

    def __repr__(self) -> str:
        return f"ConceptSet({self.name!r}, {len(self)} concepts, sha256={self.sha256[:12]})"


def _sha256_concepts(concepts) -> str:
    return hashlib.sha256("\n".join(concepts).encode("utf-8")).hexdigest()


def _split_numbered(text: str) -> tuple[list[str], list[int], list[int]]:
    """Concepts, their 1-based line numbers, and those of blank lines (\\n, \\r\\n, bare \\r)."""
    text = text.lstrip("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":  # a final line terminator is not an extra blank line
        lines.pop()
    stripped = [ln.strip() for ln in lines]
    numbers = [i + 1 for i, s in enumerate(stripped) if s]
    return [stripped[i - 1] for i in numbers], numbers, [i + 1 for i, s in enumerate(stripped) if not s]


def _split(text: str) -> tuple[list[str], list[int]]:
    """Concepts and the 1-based line numbers of blank lines (\\n, \\r\\n and bare \\r)."""
    concepts, _, blank = _split_numbered(text)
    return concepts, blank


def _check_lengths(concepts: list[str], numbers: list[int], where: str, max_chars: int) -> None:
    """Raise on the first concept longer than `max_chars`, naming `where`, its line and length."""
    too_long = [j for j, c in enumerate(concepts) if len(c) > max_chars]
    if not too_long:
        return
    j = too_long[0]
    more = f" ({len(too_long)} lines are too long)" if len(too_long) > 1 else ""
    raise NdUtilsError(
        f"concept file {where}, line {numbers[j]}: a concept of {len(concepts[j]):,} characters "
        f"(limit {max_chars}), starting {concepts[j][:40]!r}{more}. A concept set holds one "
        f"short concept a line (the longest in the paper's sets has 121 characters). Fix: check "
        f"that the file has one concept a line (line ends \\n, \\r\\n or \\r), shorten or delete "
        f"that line, or pass max_concept_chars= to load_concept_set to allow longer concepts")


def _first_long_line(head: "bytes | memoryview", max_chars: int, complete: bool):
    """(line number, characters) of the first line of `head` longer than `max_chars` once
    stripped, or None; a last line cut off by the end of `head` (`complete` False) is counted
    as far as it goes. Scans bytes: a line of at most max_chars bytes cannot be too long."""
    start = 3 if head[:3] == b"\xef\xbb\xbf" else 0
    ends = [m.start() for m in re.finditer(rb"\r\n|\r|\n", head)] + [len(head)]
    for number, end in enumerate(ends, 1):
        if end - start > max_chars:
            n = len(str(head[start:end], "utf-8", "replace").strip())
            if n > max_chars:
                return number, n, complete or end < len(head)
        start = end + (2 if head[end:end + 2] == b"\r\n" else 1)
    return None


def _read_capped(path: Path, what: str, max_chars: int = MAX_CONCEPT_CHARS) -> bytes:
    """The bytes of `path`; a file above MAX_FILE_BYTES is refused after reading at most that
    much (memory stays bounded), naming its first over-long line when the read part has one."""
    size = path.stat().st_size
    with open(path, "rb") as fh:  # at most one byte more than the limit: the file may grow
        data = fh.read(MAX_FILE_BYTES + 1)
    size = max(size, len(data))
    if size <= MAX_FILE_BYTES:
        return data
    msg = (f"{what} {path} has {size:,} bytes, more than the {MAX_FILE_BYTES:,} a concept list "
           f"may have (the largest paper set, 20k, has 155,418)")
    long_line = _first_long_line(memoryview(data)[:MAX_FILE_BYTES], max_chars, complete=False)
    if long_line:
        number, n, whole = long_line
        msg += (f", and line {number} alone holds a concept of {'' if whole else 'at least '}"
                f"{n:,} characters (limit {max_chars}). A concept set holds one short concept "
                f"a line. Fix: check that the file has one concept a line (line ends \\n, "
                f"\\r\\n or \\r), shorten or delete that line")
    else:
        msg += (": it is probably not a list of one concept a line. Fix: give the right file, "
                "or split off the concepts you need")
    raise NdUtilsError(msg)


def parse_concept_text(text: str) -> list[str]:
    """Split text into concepts: one a line, whitespace stripped, blank lines dropped.

    Only "\\n", "\\r\\n" and bare "\\r" end a line. The index of a concept is its position
    in the returned list (never in the raw line list), so blank lines shift nothing.

    Example:
        >>> parse_concept_text("dog\\r\\n\\r\\n  cat \\rbird\\n")
        ['dog', 'cat', 'bird']
    """
    return _split(text)[0]


def list_concept_sets() -> list[str]:
    """Names accepted by `load_concept_set` (words-<N> accepts any N; three examples shown).

    Example:
        >>> "20k" in list_concept_sets() and "imagenet_classes" in list_concept_sets()
        True
    """
    return list(PAPER_SETS) + list(OFFLINE_SETS)


def default_cache_dir() -> Path:
    """`$ND_CONCEPT_CACHE`, else ~/.cache/nd_utils/concept_sets."""
    env = os.environ.get("ND_CONCEPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nd_utils" / "concept_sets"


def _decode(data: bytes, where) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NdUtilsError(f"concept file {where} is not UTF-8 text ({e}); re-save it as UTF-8") from None


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


def _words(n: int) -> tuple[list[str], str]:
    spec = importlib.util.find_spec("wordsegment")
    if spec is None or not spec.origin:
        raise NdUtilsError("words-<N> concept sets need the 'wordsegment' package: pip install wordsegment")
    path = Path(spec.origin).parent / "unigrams.txt"
    words = []
    with open(path, encoding="utf-8") as fh:  # word<TAB>count, most frequent first
        for line in fh:
            if len(words) == n:
                break
            if line.strip():
                words.append(line.split("\t", 1)[0].strip())
    if len(words) < n:
        raise NdUtilsError(f"words-{n}: {path} holds only {len(words)} words; choose N <= {len(words)}")
    return words, f"{path} (Norvig unigram counts, wordsegment package)"


def _builtin(name: str):
    """(lines, source) of a package-provided set, or None if `name` is not one."""
    if name == "imagenet_classes":
        import torchvision
        from torchvision.models import ResNet50_Weights  # metadata only, no download
        cats = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        return cats, f"torchvision {torchvision.__version__} ResNet50_Weights.IMAGENET1K_V1.meta['categories']"
    if name == "cifar100_classes":
        from .probes import CIFAR100_CLASSES
        return [c.replace("_", " ") for c in CIFAR100_CLASSES], "nd_utils.probes.CIFAR100_CLASSES"
    m = _WORDS_RE.fullmatch(name)
    if m:
        n = int(m.group(1)) * (1000 if m.group(2) else 1)
        if n < 1:
            raise NdUtilsError(f"{name}: N must be at least 1")
        return _words(n)
    return None


def load_concept_set(name_or_path: str, *, dedupe: "bool | None" = None, drop_stopwords: bool = False,
                     drop_profanity: bool = False, cache_dir=None, allow_download: bool = True,
                     local_dir=None, max_concept_chars: int = MAX_CONCEPT_CHARS) -> ConceptSet:
    """Load a named concept set (see `list_concept_sets`) or a text file, then clean it.

    `dedupe=None` means True, except for the index-aligned class lists (imagenet_labels,
    imagenet_classes, cifar100_classes) where it means False so class k stays at index k.
    Paper files are read from `local_dir` / $ND_CONCEPT_DIR / the cache or downloaded, and
    always checked against their pinned sha256. Raises OfflineError when a needed download
    fails, UnknownNameError for an unknown name, NdUtilsError for empty or unreadable files, for
    files above MAX_FILE_BYTES (checked before reading), for a concept longer than
    `max_concept_chars` (naming its line) and for a set that cleaning leaves empty.

    Example:
        >>> cs = load_concept_set("imagenet_classes")
        >>> cs[0], len(cs), cs.report["duplicates"]
        ('tench', 1000, [])
    """
    name = str(name_or_path)
    file_sha, aligned = None, name in INDEX_ALIGNED
    if name in PAPER_SETS:
        data, source = _fetch_paper_file(name, cache_dir, local_dir, allow_download)
        file_sha = PAPER_SETS[name][0]
        lines, numbers, blank = _split_numbered(_decode(data, source))
        n_raw = len(lines) + len(blank)
    elif (found := _builtin(name)) is not None:
        raw, source = found
        numbers = [i + 1 for i, s in enumerate(raw) if s.strip()]
        lines = [raw[i - 1].strip() for i in numbers]
        n_raw, blank = len(raw), [i + 1 for i, s in enumerate(raw) if not s.strip()]
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            if os.sep in name or "/" in name or path.suffix:
                raise NdUtilsError(f"concept file {name!r} does not exist (or is not a file)")
            raise unknown_name("concept set", name, list_concept_sets(),
                               hint="Use words-<N> for the N most frequent English words, "
                                    "or give the path of a text file.")
        data = _read_capped(path, "concept file", int(max_concept_chars))
        file_sha, source = hashlib.sha256(data).hexdigest(), str(path.resolve())
        lines, numbers, blank = _split_numbered(_decode(data, path))
        n_raw = len(lines) + len(blank)
        name = path.stem
        if not lines:
            raise NdUtilsError(f"concept file {source} is empty or holds only blank lines: "
                               f"write one concept a line")
    _check_lengths(lines, numbers, source, int(max_concept_chars))
    if dedupe is None:
        dedupe = not aligned
    report = {"n_raw_lines": n_raw, "n_blank": len(blank), "blank_lines": blank[:100],
              "n_parsed": len(lines), "file_sha256": file_sha, "duplicates": [],
              "stopwords_dropped": [], "profanity_dropped": [],
              "options": {"dedupe": dedupe, "drop_stopwords": drop_stopwords,
                          "drop_profanity": drop_profanity}}
    kept, seen = [], set()
    for c in lines:
        low = c.lower()
        if dedupe and c in seen:
            report["duplicates"].append(c)
        elif drop_stopwords and low in STOPWORDS:
            report["stopwords_dropped"].append(c)
        elif drop_profanity and low in PROFANITY:
            report["profanity_dropped"].append(c)
        else:
            kept.append(c)
            seen.add(c)
    if not kept:
        dropped = ", ".join(f"{len(report[k])} {what}" for k, what in (
            ("duplicates", "duplicates"), ("stopwords_dropped", "stop-words"),
            ("profanity_dropped", "profanities")) if report[k])
        raise NdUtilsError(f"concept set {name!r} ({source}) is empty after cleaning: its "
                           f"{len(lines)} concept(s) were all dropped ({dropped}; options "
                           f"{report['options']}). Fix: add concepts to the file or turn that "
                           f"cleaning off (clip_dissect.clean)")
    report["n_concepts"] = len(kept)
    report["index_aligned"] = len(kept) == len(lines)  # True: position k is parsed line k
    return ConceptSet(name, tuple(kept), source, _sha256_concepts(kept), report)


# --- Ground truth of the final-layer evaluation: the paper's `imagenet_labels` lines -------------
# CLIP-Dissect's evaluation takes line k of imagenet_labels.txt (class k's name with its synonyms,
# e.g. "tench, Tinca tinca") as the ground truth of neuron k. Offline, the same 1,000 lines come
# from timm's ImageNet-1k metadata (installed with open-clip-torch): its WordNet lemmas equal the
# paper file's lines except the two "crane" classes, which the paper file disambiguates. After
# those two replacements the text must hash to the paper file's pinned sha256, or it is refused.
IMAGENET_LABELS_TIMM_FIXES = {134: ("crane", "crane, bird"), 517: ("crane", "crane, machine")}


def imagenet_labels_from_timm() -> tuple[list[str], str]:
    """The paper's 1,000 `imagenet_labels` lines rebuilt from timm, byte-identical to the file.

    Raises NdUtilsError when timm is missing or its list differs from the pinned file.
    """
    try:
        import timm
        from timm.data import ImageNetInfo
    except ImportError:
        raise NdUtilsError("rebuilding imagenet_labels offline needs the 'timm' package "
                           "(a dependency of open-clip-torch): pip install timm") from None
    info = ImageNetInfo("imagenet-1k")
    lines = [str(info.index_to_description(i)).strip() for i in range(1000)]
    for k, (old, new) in IMAGENET_LABELS_TIMM_FIXES.items():
        if lines[k] == old:
            lines[k] = new
    pin = PAPER_SETS["imagenet_labels"][0]
    got = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    if got != pin:
        raise NdUtilsError(f"timm {timm.__version__}'s ImageNet-1k descriptions hash to {got}, not "
                           f"to the paper's imagenet_labels file ({pin}): not used as its copy")
    return lines, (f"timm {timm.__version__} ImageNetInfo('imagenet-1k') descriptions, lines "
                   f"135/518 'crane' -> 'crane, bird'/'crane, machine'; sha256 = the paper file's")


def imagenet_label_lines(*, allow_download: bool = True, cache_dir=None,
                         local_dir=None) -> tuple[list[str], str]:
    """The 1,000 lines of the paper's `imagenet_labels` (line k = class k) and their source.

    Every copy is the pinned file's exact text. Tried in order: a local copy (`local_dir`,
    $ND_CONCEPT_DIR, the concept cache), the offline rebuild from timm
    (`imagenet_labels_from_timm`), then the download (when `allow_download`). Raises NdUtilsError
    naming every attempt and why it failed.

    Example:
        >>> lines, source = imagenet_label_lines(allow_download=False)     # doctest: +SKIP
        >>> lines[0]                                                       # doctest: +SKIP
        'tench, Tinca tinca'
    """
    tried = []
    attempts = [("local copy", lambda: _paper_lines(cache_dir, local_dir, False)),
                ("timm", imagenet_labels_from_timm)]
    if allow_download:
        attempts.append(("download", lambda: _paper_lines(cache_dir, local_dir, True)))
    for what, attempt in attempts:
        try:
            lines, source = attempt()
        except NdUtilsError as exc:
            tried.append(f"{what}: {exc}")
            continue
        if len(lines) == 1000:
            return lines, source
        tried.append(f"{what}: {len(lines)} lines, not 1,000")
    raise NdUtilsError("the paper's imagenet_labels lines are unavailable; tried "
                       + " | ".join(tried))


def _paper_lines(cache_dir, local_dir, allow_download: bool) -> tuple[list[str], str]:
    data, source = _fetch_paper_file("imagenet_labels", cache_dir, local_dir, allow_download)
    return _split_numbered(_decode(data, source))[0], source
