"""Append-only JSONL answer caches (captions, language-model answers), safe to interrupt and to share.

One record per line: `{"key": <sha256 of the request>, "request": {...}, "answer": ..., ...}`.
Appends are single `write` calls of one complete line followed by fsync, made under an
inter-process lock (`<file>.lock`), so several processes can share one cache. A crash can leave
at most one torn last line, which reading skips, even when it was cut inside a multi-byte
character (the next append starts on a fresh line). Later records of the same key win, so a
cache can be amended by appending. Every lookup first reads what other processes appended since
the last read (one `stat` when nothing was), and forgets everything when the file was deleted or
replaced.

Example:
    >>> cache = JsonlCache(tmp / "llm.jsonl")                         # doctest: +SKIP
    >>> key = cache.key({"model": "m", "prompt": "hi"})               # doctest: +SKIP
    >>> cache.get(key) is None; cache.put(key, {"model": "m"}, "hello")  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from .locks import process_lock
from .store import canonical_json


class JsonlCache:
    """A dict-like cache of answers persisted as JSONL, with hit/miss counters."""

    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        self._offset = 0          # bytes of the file already parsed (complete lines only)
        self._loaded = False
        self._inode: "tuple[int, int] | None" = None   # the file whose lines were parsed
        self._lock = threading.RLock()
        self.torn_lines = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(request: Mapping[str, Any]) -> str:
        """sha256 of the canonical JSON of the request fields."""
        return hashlib.sha256(canonical_json(dict(request)).encode()).hexdigest()

    def _refresh(self) -> dict[str, dict]:
        """Parse the complete lines appended since the last read (all of them the first time)."""
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:  # deleted (a cleared store): the file is the truth
                self._records, self._offset, self._loaded, self._inode = {}, 0, True, None
                return self._records
            size = st.st_size
            if size < self._offset or (st.st_dev, st.st_ino) != self._inode:
                # replaced, compacted or deleted and made again: read it all again
                self._records, self._offset = {}, 0
                self._inode = (st.st_dev, st.st_ino)
            if size > self._offset:
                with open(self.path, "rb") as fh:
                    fh.seek(self._offset)
                    data = fh.read(size - self._offset)
                end = data.rfind(b"\n") + 1
                if not self._loaded and end < len(data):
                    end = len(data)  # a torn last line at start-up: parse (and skip) it now
                torn = 0
                for raw in data[:end].split(b"\n"):
                    if not raw.strip():
                        continue
                    try:
                        rec = json.loads(raw.decode("utf-8"))
                        self._records[rec["key"]] = rec
                    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                        torn += 1
                self._offset += end
                if torn:
                    self.torn_lines += torn
                    warnings.warn(f"{self.path}: skipped {torn} unreadable line(s) (an "
                                  f"interrupted write); their answers will be recomputed",
                                  stacklevel=4)
            self._loaded = True
            return self._records

    def _load(self) -> dict[str, dict]:
        # a stat per lookup (microseconds) keeps a long-lived process (a Ray worker) from
        # answering with records of a file that was deleted or replaced meanwhile
        return self._refresh()

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def __len__(self) -> int:
        return len(self._refresh())

    def get(self, key: str) -> "dict | None":
        """The record for `key` (counting a hit) or None (counting a miss)."""
        rec = self._load().get(key)  # with what other processes appended meanwhile
        if rec is None:
            self.misses += 1
        else:
            self.hits += 1
        return rec

    def put(self, key: str, request: Mapping[str, Any], answer: Any, **extra) -> dict:
        """Append one record (under the file's inter-process lock) and return it."""
        rec = {"key": key, "request": dict(request), "answer": answer, "time": time.time(),
               **extra}
        line = (json.dumps(rec, ensure_ascii=False, sort_keys=True, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, process_lock(self.path.with_name(self.path.name + ".lock")):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # the previous writer died mid-line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._refresh()  # takes in our line and any line other processes appended
            self._records[key] = rec
        return rec

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / total, 4) if total else None}
