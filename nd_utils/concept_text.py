"""Concept files as text: one concept a line, split and checked against the size limits.

Only "\\n", "\\r\\n" and bare "\\r" end a line; blank lines are dropped before indexing. A file
above `MAX_FILE_BYTES` is refused after reading at most that much, and a concept longer than
`MAX_CONCEPT_CHARS` is an error naming the file and line.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import NdUtilsError

# Size limits, far above any real concept list, so that a wrong file fails fast with a clear
# message instead of exhausting memory in the text encoder (a 10 MB "concept" once did).
MAX_FILE_BYTES = 8 << 20  # bytes per concept file or download; the largest paper file is 155 kB
MAX_CONCEPT_CHARS = 256   # characters per concept; the longest in the paper's sets has 121


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


def _decode(data: bytes, where) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NdUtilsError(f"concept file {where} is not UTF-8 text ({e}); re-save it as UTF-8") from None
