"""What long runs on shared machines meet: termination signals and full disks.

- `terminate_as_interrupt`: SIGTERM (a SLURM time limit or preemption, a Kubernetes eviction,
  `kill`) and SIGHUP (a closed terminal) raise `RunTerminated`, a KeyboardInterrupt, so the
  runner handles them as it handles Ctrl-C: the stage and the run are marked `interrupted` in
  `run.json`, the kernels and a local Ray instance are shut down by the code's own `finally`
  blocks, and the process exits with 128 + the signal's number (143 for SIGTERM). A second
  signal during that clean-up is ignored, so the clean-up finishes.
- `disk_full_message` / `is_disk_full`: a write that finds no space left names the folder, what
  was being written and the space left, instead of a raw `OSError: [Errno 28]`.
- `stage01_bytes` / `check_free_space`: before stage 01 writes a probe set's activations, their
  size (images x neurons x 4 bytes, plus image features), against the free space.

Example:
    >>> is_disk_full("OSError: [Errno 28] No space left on device: '/data/runs/x/run.json'")
    True
    >>> human_bytes(3 * 2**30)
    '3.0 GiB'
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import signal
import threading
import warnings
from pathlib import Path


SIGNALS = (signal.SIGTERM, signal.SIGHUP)
FEATURE_DIMS = 1024  # upper bound of a vision-language image embedding, for the estimate
RUN_FOLDER_BYTES = 50 * 2**20  # the run folder's executed notebooks, figures and tables


class RunTerminated(KeyboardInterrupt):
    """The runner got SIGTERM or SIGHUP; handled as Ctrl-C. `signum`: which signal."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_HANDLING = [False]   # inside terminate_as_interrupt (of the main thread)


def _raise_terminated(signum, _frame):
    for s in SIGNALS:  # the clean-up that follows must not be cut short by a second one
        signal.signal(s, signal.SIG_IGN)
    raise RunTerminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM and SIGHUP raise `RunTerminated` in the main thread (once;
    later ones are ignored until the block ends). Elsewhere than the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in SIGNALS}
    _HANDLING[0] = True
    try:
        yield
    finally:
        _HANDLING[0] = False
        for s, h in previous.items():
            signal.signal(s, h)


def reclaim_signals() -> None:
    """Inside `terminate_as_interrupt`: take SIGTERM and SIGHUP back from a library that set
    its own handlers since (`ray.init` installs one that aborts the process, which would skip
    every clean-up)."""
    if _HANDLING[0] and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise_terminated)


def signal_record(exc: BaseException) -> dict:
    """{"signal": "SIGTERM"} for a run ended by a termination signal, else {} (run.json)."""
    return {"signal": str(exc)} if isinstance(exc, RunTerminated) else {}


def write_in_place(path: "str | Path", text: str) -> None:
    """Best effort on a full disk: overwrite `path` in place (truncating frees its blocks,
    where a temporary file beside it needs new ones). A failure here is silent: the
    DiskFullError raised next says what happened."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: "str | Path") -> "tuple[int, int]":
    """(free, total) bytes of the file system holding `folder` (its nearest existing parent)."""
    p = Path(folder).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    usage = shutil.disk_usage(p)
    return usage.free, usage.total


def is_disk_full(error) -> bool:
    """Whether an exception, or an error's text (a stage's `ename: evalue`), is ENOSPC/EDQUOT."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full_message(folder: "str | Path", what: str) -> str:
    """The error a full disk gives: the folder, what was being written, the space left, the fix."""
    free, total = free_bytes(folder)
    return (f"no space left on the disk holding {folder} while writing {what} "
            f"({human_bytes(free)} free of {human_bytes(total)}). Free some space there, or "
            f"point data_dir at a larger disk (--set data_dir=/path), then rerun the same "
            f"command: finished stages and chunks are cached, and nothing half-written was "
            f"published")


def stage01_bytes(n_images: int, widths: "dict[str, int]", n_feature_jobs: int = 0) -> int:
    """Peak bytes stage 01 adds: N x (neurons + feature dims) x 4 bytes, twice, as each layer's
    file is written from its chunks before the chunks are removed, plus `RUN_FOLDER_BYTES`.
    >>> stage01_bytes(1000, {"fc": 1000, "head": 1280}) - RUN_FOLDER_BYTES
    18240000
    """
    per_image = sum(widths.values()) + n_feature_jobs * FEATURE_DIMS
    return 2 * int(n_images) * per_image * 4 + RUN_FOLDER_BYTES


def check_free_space(folder: "str | Path", need: int, what: str) -> "str | None":
    """Warn (and return the message) when the disk holding `folder` has less than `need` bytes
    free; None when it has enough."""
    free, _ = free_bytes(folder)
    if free >= need:
        return None
    message = (f"{what} needs about {human_bytes(need)} in {folder}, but its disk has "
               f"{human_bytes(free)} free: the run will stop with a full disk. Free some space "
               f"or point data_dir at a larger disk (--set data_dir=/path)")
    warnings.warn(message, stacklevel=3)
    return message
