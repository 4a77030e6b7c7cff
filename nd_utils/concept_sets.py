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

Limits (`concept_text`): a file (or download) above `MAX_FILE_BYTES` (8 MiB) is refused before
it is read, and a concept longer than `MAX_CONCEPT_CHARS` (256 characters; `max_concept_chars=`
raises it) is an error naming the file and line: both catch files that are not
one-concept-a-line lists.

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

from .concept_text import MAX_CONCEPT_CHARS, _check_lengths, _decode, _read_capped, _split_numbered
from .errors import NdUtilsError, unknown_name
from .paper_concept_files import OFFLINE_SETS, PAPER_SETS, _fetch_paper_file

INDEX_ALIGNED = {"imagenet_labels", "imagenet_classes", "cifar100_classes"}
_WORDS_RE = re.compile(r"words-(\d+)(k?)")

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


def list_concept_sets() -> list[str]:
    """Names accepted by `load_concept_set` (words-<N> accepts any N; three examples shown).

    Example:
        >>> "20k" in list_concept_sets() and "imagenet_classes" in list_concept_sets()
        True
    """
    return list(PAPER_SETS) + list(OFFLINE_SETS)


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
        from .probe_sources import CIFAR100_CLASSES
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
