"""Run folders: the record of one run (`Run`), opening one (`open_run`) and marking the runs
whose runner process died (`mark_interrupted_runs`).

A run folder (`<data_dir>/runs/<run id>/`) holds the effective `config.yaml`, the executed copy
of every notebook (`notebooks/`), the human-facing outputs (`results/`) and `run.json`.

Example:
    >>> run = open_run("offline", ["target.layers=[head]"])         # doctest: +SKIP
    >>> run.results.name                                             # doctest: +SKIP
    'results'
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .context import load_config
from .notices import set_current_run
from .store import atomic_write_text


@dataclass
class Run:
    """An open run: its effective config and folders."""

    cfg: Config
    path: Path

    @property
    def results(self) -> Path:
        return self.path / "results"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_interrupted_runs(runs_dir: "str | Path", log=print) -> list[Path]:
    """Mark runs whose `run.json` still says "running" but whose runner process is gone.

    A killed runner (kill -9, a closed laptop, a lost node) cannot update its record; the next
    run on the same host finds it here and sets `status: interrupted`. Records written before
    runners stored their pid, or by another host, are left as they are.
    """
    found = []
    for rec_path in sorted(Path(runs_dir).glob("*/run.json")):
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        pid, host = rec.get("pid"), rec.get("host")
        if (rec.get("status") == "running" and isinstance(pid, int)
                and host == platform.node() and not _pid_alive(pid)):
            rec.update(status="interrupted", interrupted_noticed=time.time())
            for stage in rec.get("stages", []):
                if stage.get("status") == "running":
                    stage["status"] = "interrupted"
            atomic_write_text(rec_path, json.dumps(rec, indent=2))
            found.append(rec_path.parent)
    if found:
        log(f"marked {len(found)} earlier run(s) as interrupted (their runner process is gone): "
            f"{', '.join(p.name for p in found)}")
    return found


def _new_run_path(cfg: Config, suffix: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = cfg.data_dir / "runs" / f"{stamp}-{cfg['profile']}-{cfg.fingerprint()[:6]}{suffix}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def open_run(config="offline", overrides=None, run_dir: "str | Path | None" = None) -> Run:
    """Load the config and open (or create) a run folder, saving the effective config in it.

    Notebooks call this first: under the runner `run_dir` is given and its saved config is the
    one to use; run on their own they create a fresh run folder (suffix `-nb`).
    """
    cfg = load_config(config, overrides)
    path = Path(run_dir) if run_dir else _new_run_path(cfg, "-nb")
    (path / "results").mkdir(parents=True, exist_ok=True)
    run = Run(cfg, path)
    set_current_run(path)
    if not run.config_path.exists() or overrides:
        cfg.save(run.config_path)
    return run
