"""Run the numbered notebooks in order with papermill, each run in its own folder.

A run folder (`<data_dir>/runs/<run id>/`) holds the effective `config.yaml`, the executed copy
of every notebook (`notebooks/`), the human-facing outputs (`results/`: CSV tables, figures) and
`run.json` (stages, status, timings). Notebook sources are never written to.

Example:
    $ python -m nd_utils run offline --set target.layers=[head] --stages 01
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .config import REPO_ROOT, Config, load_config
from .errors import NdUtilsError
from .store import atomic_write_text

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
_NOTEBOOK_RE = re.compile(r"^(\d\d)_.+\.ipynb$")


class StageFailed(NdUtilsError, RuntimeError):
    """A notebook of the pipeline raised; the message carries its error and executed copy."""


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
    if not run.config_path.exists() or overrides:
        cfg.save(run.config_path)
    return run


def list_notebooks(notebook_dir: "str | Path" = NOTEBOOK_DIR) -> list[Path]:
    """The numbered stage notebooks (`NN_name.ipynb`), in order."""
    found = [p for p in Path(notebook_dir).glob("*.ipynb") if _NOTEBOOK_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def select_notebooks(notebooks: list[Path], stages: "Iterable[str] | str | None") -> list[Path]:
    """Keep the notebooks whose number is in `stages` (`"01,02"` or `["01", "2"]`)."""
    if stages is None:
        return notebooks
    if isinstance(stages, str):
        stages = [s for s in stages.split(",") if s.strip()]
    wanted = {f"{int(s):02d}" if s.strip().isdigit() else s.strip() for s in stages}
    have = {p.name[:2] for p in notebooks}
    missing = sorted(wanted - have)
    if missing:
        raise NdUtilsError(f"no notebook for stage(s) {', '.join(missing)}: available stages are "
                           f"{', '.join(sorted(have)) or 'none'}")
    return [p for p in notebooks if p.name[:2] in wanted]


def preflight(cfg, stages: "Iterable[str]") -> None:
    """Fail before any work when a selected stage cannot run (e.g. no API key for `openai`)."""
    if "04" in set(stages) and cfg.get("llm.name") == "openai" and cfg.get("llm.mode") == "live":
        from .openai_backend import MissingApiKeyError

        if not os.environ.get("OPENAI_API_KEY", "").strip():
            raise MissingApiKeyError(
                "llm.name is openai but OPENAI_API_KEY is not set, so stage 04 would fail: "
                "export OPENAI_API_KEY=... first, or use --set llm.name=transformers (offline) "
                "or llm.mode=replay (answers from the cache)")


def run_pipeline(config="offline", overrides=None, stages=None, force: bool = False,
                 notebook_dir: "str | Path" = NOTEBOOK_DIR, kernel_name: "str | None" = None,
                 log=print) -> Run:
    """Execute the stage notebooks in order into a new run folder; stop at the first failure.

    Raises StageFailed naming the stage, its error and the executed notebook to open.
    """
    import papermill as pm

    cfg = load_config(config, overrides)
    notebooks = select_notebooks(list_notebooks(notebook_dir), stages)
    if not notebooks:
        raise NdUtilsError(f"no stage notebooks (NN_name.ipynb) in {notebook_dir}")
    preflight(cfg, [nb.name[:2] for nb in notebooks])
    run = Run(cfg, _new_run_path(cfg))
    (run.path / "notebooks").mkdir(parents=True)
    run.results.mkdir()
    cfg.save(run.config_path)
    record = {"config": str(run.config_path), "source": cfg.source, "force": force,
              "stages": [], "status": "running", "started": time.time()}

    def save_record():
        atomic_write_text(run.path / "run.json", json.dumps(record, indent=2))

    save_record()
    for nb in notebooks:
        out = run.path / "notebooks" / nb.name
        log(f"[{nb.name[:2]}] {nb.name} ...", flush=True)
        t0 = time.time()
        entry = {"notebook": nb.name, "executed": str(out)}
        try:
            pm.execute_notebook(
                str(nb), str(out), kernel_name=kernel_name, progress_bar=False, cwd=str(nb.parent),
                parameters={"config": str(run.config_path), "overrides": [],
                            "run_dir": str(run.path), "force": bool(force)})
        except Exception as exc:  # papermill wraps the cell's error
            entry.update(status="failed", seconds=round(time.time() - t0, 2),
                         error=f"{getattr(exc, 'ename', type(exc).__name__)}: "
                               f"{getattr(exc, 'evalue', exc)}")
            record["stages"].append(entry)
            record["status"] = "failed"
            save_record()
            raise StageFailed(f"stage {nb.name} failed: {entry['error']}\n"
                              f"Executed notebook with the traceback: {out}") from None
        entry.update(status="ok", seconds=round(time.time() - t0, 2))
        record["stages"].append(entry)
        save_record()
        log(f"[{nb.name[:2]}] done in {entry['seconds']:.1f} s", flush=True)
    record.update(status="ok", finished=time.time())
    save_record()
    return run
