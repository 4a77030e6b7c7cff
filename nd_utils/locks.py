"""Inter-process locks for the artifact store and the JSONL caches.

A `ProcessLock` guards one resource (an artifact key, a cache file) across processes and threads:
an OS file lock (`filelock`, released by the kernel when its holder dies, so a killed writer never
leaves a stale lock) plus a re-entrant thread lock. It is re-entrant within a thread, so a stage
that holds a key's lock can call code that takes it again. One object exists per lock file and
process (`process_lock`), because two OS locks on one file inside a single process would block
each other.

Example:
    >>> lock = process_lock(tmp / ".lock-0123")                       # doctest: +SKIP
    >>> with lock:                                                    # doctest: +SKIP
    ...     ...  # only one process (and thread) at a time
    >>> lock.acquire(blocking=False)  # True when taken, False when held   # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

_REGISTRY: "dict[str, ProcessLock]" = {}
_REGISTRY_GUARD = threading.Lock()


class ProcessLock:
    """A re-entrant lock shared by threads and processes through one lock file."""

    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        self._thread = threading.RLock()
        # thread_local=False: the re-entrancy bookkeeping is ours (`_depth`), per process
        self._file = FileLock(str(self.path), thread_local=False)
        self._depth = 0

    def acquire(self, blocking: bool = True, *, wait_message: "str | None" = None,
                log: "Callable[[str], None] | None" = None, patience: float = 5.0) -> bool:
        """Take the lock; with `blocking=False` return False at once when it is held elsewhere.

        While blocking, `wait_message` is logged once after `patience` seconds, so a user sees
        why a command waits instead of a silent hang.
        """
        if not self._thread.acquire(blocking=blocking):
            return False
        if self._depth == 0:
            try:
                if not blocking:
                    self._file.acquire(timeout=0)
                else:
                    try:
                        self._file.acquire(timeout=patience)
                    except Timeout:
                        if wait_message:
                            (log or print)(wait_message)
                        self._file.acquire()
            except Timeout:
                self._thread.release()
                return False
            except BaseException:
                self._thread.release()
                raise
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._file.release()
        self._thread.release()

    @contextlib.contextmanager
    def acquire_context(self, **kwargs) -> Iterator["ProcessLock"]:
        """`with lock.acquire_context(wait_message=..., log=...):` (blocking `acquire`)."""
        self.acquire(**kwargs)
        try:
            yield self
        finally:
            self.release()

    @property
    def held(self) -> bool:
        """True when this process holds the lock (in any thread)."""
        return self._depth > 0

    def __enter__(self) -> "ProcessLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ProcessLock({str(self.path)!r}, held={self.held})"


def process_lock(path: "str | Path") -> ProcessLock:
    """The process-wide `ProcessLock` of a lock file (created, with its folder, on first use)."""
    path = Path(path)
    key = str(path.resolve())
    with _REGISTRY_GUARD:
        lock = _REGISTRY.get(key)
        if lock is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = _REGISTRY[key] = ProcessLock(path)
        return lock


def wait_until_free(lock: ProcessLock, what: str, log: "Callable[[str], None] | None" = None,
                    patience: float = 5.0) -> float:
    """Block until no other process holds `lock` (then release it); returns seconds waited."""
    t0 = time.time()
    lock.acquire(wait_message=f"waiting for another process that is writing {what}", log=log,
                 patience=patience)
    lock.release()
    return time.time() - t0
