"""Append-only JSONL answer caches (captions, language-model answers), safe to interrupt.

One record per line: `{"key": <sha256 of the request>, "request": {...}, "answer": ..., ...}`.
Appends are single `write` calls of one complete line followed by fsync, so a crash can leave at
most one torn last line, which reading skips (and the next append starts on a fresh line).
Later records of the same key win, so a cache can be amended by appending.

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

from .store import canonical_json


class JsonlCache:
    """A dict-like cache of answers persisted as JSONL, with hit/miss counters."""

    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        self._records: "dict[str, dict] | None" = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(request: Mapping[str, Any]) -> str:
        """sha256 of the canonical JSON of the request fields."""
        return hashlib.sha256(canonical_json(dict(request)).encode()).hexdigest()

    def _load(self) -> dict[str, dict]:
        if self._records is None:
            records: dict[str, dict] = {}
            if self.path.exists():
                torn = 0
                with open(self.path, encoding="utf-8") as fh:
                    for line in fh:
                        line = line.strip()
                        if not line:
                            continue
                        try:
                            rec = json.loads(line)
                            records[rec["key"]] = rec
                        except (json.JSONDecodeError, KeyError, TypeError):
                            torn += 1
                if torn:
                    warnings.warn(f"{self.path}: skipped {torn} unreadable line(s) (an interrupted "
                                  f"write); their answers will be recomputed", stacklevel=3)
            self._records = records
        return self._records

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def __len__(self) -> int:
        return len(self._load())

    def get(self, key: str) -> "dict | None":
        """The record for `key` (counting a hit) or None (counting a miss)."""
        rec = self._load().get(key)
        if rec is None:
            self.misses += 1
        else:
            self.hits += 1
        return rec

    def put(self, key: str, request: Mapping[str, Any], answer: Any, **extra) -> dict:
        """Append one record and return it."""
        rec = {"key": key, "request": dict(request), "answer": answer, "time": time.time(),
               **extra}
        line = json.dumps(rec, ensure_ascii=False, sort_keys=True, default=str) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                if os.fstat(fd).st_size and not self._ends_with_newline():
                    line = "\n" + line  # the previous writer died mid-line
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._load()[key] = rec
        return rec

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / total, 4) if total else None}
