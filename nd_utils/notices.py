"""Notices a stage leaves for the runner (e.g. images left out of a probe set): `notices.jsonl`.

The run folder a process writes into is set once (`open_run` calls `set_current_run`); stage code
anywhere below calls `record_notice`, which appends one JSON line there and does nothing outside
a run. The runner prints each distinct notice after the stage (`read_notices`).

Example:
    >>> set_current_run(None)
    >>> record_notice("probe_skipped", "2 images unreadable")   # outside a run: nothing happens
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .locks import process_lock

NOTICES = "notices.jsonl"
_CURRENT_RUN: "Path | None" = None     # the run folder notebooks of this process write into


def set_current_run(path: "str | Path | None") -> None:
    """Send this process's notices to `<path>/notices.jsonl` (None: drop them)."""
    global _CURRENT_RUN
    _CURRENT_RUN = Path(path) if path is not None else None


def record_notice(kind: str, message: str, **data) -> None:
    """Tell the runner something the user should see (e.g. images left out of a probe set).

    Inside a run (after `open_run`) the notice is appended to `<run>/notices.jsonl`, which the
    runner prints as one line per distinct notice after the stage; outside a run it does nothing
    (the caller also warns).
    """
    if _CURRENT_RUN is None:
        return
    line = json.dumps({"kind": kind, "message": message, "time": time.time(), **data},
                      default=str) + "\n"
    path = _CURRENT_RUN / NOTICES
    try:
        with process_lock(path.with_name(NOTICES + ".lock")), \
                open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError:  # a notice must never fail the stage that sends it
        pass


def read_notices(run_path: "str | Path") -> list[dict]:
    """The notices of a run, in order (unreadable lines skipped)."""
    path = Path(run_path) / NOTICES
    out = []
    if path.exists():
        for raw in path.read_bytes().split(b"\n"):
            try:
                out.append(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
    return out
