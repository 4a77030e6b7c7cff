"""Run the numbered notebooks in order with papermill, each run in its own folder.

A run folder (`<data_dir>/runs/<run id>/`) holds the effective `config.yaml`, the executed copy
of every notebook (`notebooks/`), the human-facing outputs (`results/`: CSV tables, figures) and
`run.json` (stages, status, timings). Notebook sources are never written to.

Example:
    $ python -m nd_utils run offline --set target.layers=[head] --stages 01
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Iterable

from .config import REPO_ROOT, Config
from .context import load_config
from .errors import DiskFullError, NdUtilsError
from .kernels import notebook_kernel_name, start_warm_kernel
from .notices import NOTICES, read_notices
from .runs import Run, _new_run_path, mark_interrupted_runs
from .run_faults import (disk_full_message, is_disk_full, reclaim_signals, signal_record,
                         terminate_as_interrupt, write_in_place)
from .store import atomic_write_text

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
_NOTEBOOK_RE = re.compile(r"^(\d\d)_.+\.ipynb$")


class StageFailed(NdUtilsError, RuntimeError):
    """A notebook of the pipeline raised; the message carries its error and executed copy."""


# notices that change how a run's numbers read: the runner repeats them at the end of the run
END_OF_RUN_NOTICES = ("evaluation_probe", "quality_probe")


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
    from .config import check_data_dir

    check_data_dir(cfg)
    stages = set(stages)
    keyless = not os.environ.get("OPENAI_API_KEY", "").strip()
    llm = cfg.settings.llm
    if keyless and llm.name == "openai" and llm.mode == "live":
        from .backends.openai_backend import MissingApiKeyError
        from .stages import language_model_stages

        calling = language_model_stages(cfg, stages)  # reads probe sets: only when it matters
        if calling:
            raise MissingApiKeyError(
                f"llm.name is openai but OPENAI_API_KEY is not set, so stage(s) "
                f"{', '.join(calling)} would fail when they ask the language model "
                f"({'; '.join(calling.values())}): export "
                f"OPENAI_API_KEY=... first, or use --set llm.name=transformers (offline) or "
                f"llm.mode=replay (answers from the cache, no key needed)")


@contextlib.contextmanager
def shared_ray_instance(cfg: Config, log=print):
    """With `executor.name: ray` and no address: one local Ray instance for the whole run.

    Every stage's kernel joins it through `RAY_ADDRESS` instead of starting its own (5-10 s
    each). A configured address (a running cluster) is used as it is; nothing is started then.
    """
    settings = cfg.settings.executor
    if settings is None or settings.name != "ray" or settings.address \
            or os.environ.get("RAY_ADDRESS"):
        yield None
        return
    from .executors import load_executor

    ex = load_executor("ray", num_cpus=settings.num_cpus)
    reclaim_signals()  # ray.init's own SIGTERM handler aborts, skipping the shutdown below
    address = ex._ray.get_runtime_context().gcs_address
    info = ex.describe()
    log(f"ray: started a local instance at {address} ({info['cpus']:g} CPUs, "
        f"{info['gpus']:g} GPUs); the stages' kernels join it", flush=True)
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ex._ray.shutdown()


def executor_overrides(executor: "str | None", address: "str | None" = None,
                       num_cpus: "int | None" = None) -> list[str]:
    """`--executor/--address/--num-cpus` as config overrides (`executor.*`)."""
    out = [f"executor.name={executor}"] if executor else []
    if address:
        out.append(f"executor.address={address}")
    if num_cpus:
        out.append(f"executor.num_cpus={int(num_cpus)}")
    return out


def run_pipeline(config="offline", overrides=None, stages=None, force: bool = False,
                 notebook_dir: "str | Path" = NOTEBOOK_DIR, kernel_name: "str | None" = None,
                 log=print, warm_kernels: bool = True) -> Run:
    """Execute the stage notebooks in order into a new run folder; stop at the first failure.

    `warm_kernels`: start each stage's kernel (and its `import nd_utils`) while the previous
    stage runs (`nd_utils.kernels`); the outputs are the same either way.
    With `executor.name: ray` the stages' units run as Ray tasks (`shared_ray_instance`).
    Raises StageFailed naming the stage, its error and the executed notebook to open.
    """
    cfg = load_config(config, overrides)
    # SIGTERM/SIGHUP as Ctrl-C: outermost, so a local Ray instance is shut down on them too
    with terminate_as_interrupt(), shared_ray_instance(cfg, log=log):
        return _run_pipeline(cfg, stages, force, notebook_dir, kernel_name, log, warm_kernels)


def _run_pipeline(cfg: Config, stages, force: bool, notebook_dir, kernel_name, log,
                  warm_kernels: bool) -> Run:
    import papermill as pm

    notebooks = select_notebooks(list_notebooks(notebook_dir), stages)
    if not notebooks:
        raise NdUtilsError(f"no stage notebooks (NN_name.ipynb) in {notebook_dir}")
    preflight(cfg, [nb.name[:2] for nb in notebooks])
    mark_interrupted_runs(cfg.data_dir / "runs", log=log)
    run = Run(cfg, _new_run_path(cfg))
    record = {"config": str(run.config_path), "source": cfg.source, "force": force,
              "stages": [], "status": "running", "started": time.time(),
              "pid": os.getpid(), "host": platform.node(), "notices": []}

    def save_record():
        try:
            atomic_write_text(run.path / "run.json", json.dumps(record, indent=2))
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            record.update(status="failed", reason="disk_full")
            write_in_place(run.path / "run.json", json.dumps(record, indent=2))
            raise DiskFullError(disk_full_message(run.path, "the run's record run.json")) \
                from None

    try:
        (run.path / "notebooks").mkdir(parents=True)
        run.results.mkdir()
        cfg.save(run.config_path)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(disk_full_message(run.path, "the run folder")) from None
        raise
    save_record()
    shown: set = set()
    warm = {}  # notebook -> WarmKernel started ahead of its stage

    def start(nb: Path) -> None:
        warm[nb] = start_warm_kernel(notebook_kernel_name(nb, kernel_name), nb.parent, log=log)

    try:
        for i, nb in enumerate(notebooks):
            if warm_kernels and i == 0:
                start(nb)  # ours too, so that every kernel of the run talks over IPC
            if warm_kernels and i + 1 < len(notebooks):
                start(notebooks[i + 1])
            _run_stage(pm, nb, run, record, save_record, shown, kernel_name, force,
                       warm.pop(nb, None), log)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP between two stages
        if record["status"] == "running":
            record.update(status="interrupted", **signal_record(exc))
            save_record()
        raise
    finally:  # a failed or interrupted run leaves no kernel behind
        for kernel in warm.values():
            if kernel is not None:
                kernel.close(now=True)
    record.update(status="ok", finished=time.time())
    save_record()
    for notice in record["notices"]:  # said after its stage; repeated where the run ends
        if notice.get("kind") in END_OF_RUN_NOTICES:
            log(f"note [{notice['stage']}]: {notice['message']}", flush=True)
    return run


def _run_stage(pm, nb: Path, run: Run, record: dict, save_record, shown: set,
               kernel_name: "str | None", force: bool, warm, log) -> None:
    """One notebook through papermill (in `warm`'s kernel when it is alive); raises StageFailed."""
    out = run.path / "notebooks" / nb.name
    log(f"[{nb.name[:2]}] {nb.name} ...", flush=True)
    t0 = time.time()
    entry = {"notebook": nb.name, "executed": str(out), "status": "running"}
    record["stages"].append(entry)
    save_record()
    kernel = {"kernel_name": kernel_name}
    if warm is not None and warm.ready():
        kernel = warm.papermill_kwargs()
    elif warm is not None:  # the import failed or hung: the notebook's own import shows why
        log(f"[{nb.name[:2]}] note: its kernel started ahead did not import nd_utils; "
            f"starting a fresh one", flush=True)
        warm.close(now=True)
        warm = None
    cells = CellProgress(nb.name[:2], log)
    try:
        try:
            pm.execute_notebook(
                str(nb), str(out), progress_bar=False, cwd=str(nb.parent), **kernel,
                on_cell_start=cells.started, on_cell_executed=cells.executed,
                parameters={"config": str(run.config_path), "overrides": [],
                            "run_dir": str(run.path), "force": bool(force)})
        finally:
            if warm is not None:
                warm.close()
    except BaseException as exc:  # papermill wraps the cell's error; Ctrl-C lands here too
        stopped = isinstance(exc, KeyboardInterrupt)   # SIGTERM and SIGHUP too (run_faults)
        entry.update(status="interrupted" if stopped else "failed",
                     seconds=round(time.time() - t0, 2),
                     error=f"{getattr(exc, 'ename', type(exc).__name__)}: "
                           f"{getattr(exc, 'evalue', exc)}", **signal_record(exc))
        full = not stopped and is_disk_full(entry["error"])
        if full:
            entry["reason"] = "disk_full"
        record.update(status=entry["status"], **signal_record(exc),
                      **({"reason": "disk_full"} if full else {}))
        _report_notices(run, nb.name[:2], shown, record, log)
        try:
            save_record()
        except DiskFullError:
            if not full:   # else run.json was rewritten in place; the stage's error says more
                raise
        if not isinstance(exc, Exception):
            raise
        if full:
            raise DiskFullError(disk_full_message(
                run.cfg.data_dir, f"the outputs of stage {nb.name}") +
                f".\nExecuted notebook with the traceback: {out}") from None
        raise StageFailed(f"stage {nb.name} failed: {entry['error']}\n"
                          f"Executed notebook with the traceback: {out}") from None
    entry.update(status="ok", seconds=round(time.time() - t0, 2))
    _report_notices(run, nb.name[:2], shown, record, log)
    save_record()
    log(f"[{nb.name[:2]}] done in {entry['seconds']:.1f} s", flush=True)


class CellProgress:
    """Streams a stage's progress: one line per code cell that took `min_seconds` or more
    ("[04] 4/5  83.8 s  concepts = nd.dnd_concepts(cfg, force=force)"); on a terminal the cell
    that is running shows on a line that the next one overwrites."""

    def __init__(self, stage: str, log, min_seconds: float = 1.0, stream=None):
        import sys

        self.stage, self.log, self.min_seconds = stage, log, min_seconds
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0, self._n = 0.0, 0

    @staticmethod
    def _first_line(cell) -> str:
        lines = [ln for ln in str(cell.source).splitlines() if ln.strip() and
                 not ln.lstrip().startswith(("#", "%", "import ", "from "))]
        text = lines[0].strip() if lines else str(cell.source).strip().splitlines()[0]
        return text if len(text) <= 70 else text[:69] + "…"

    def started(self, cell, cell_index: int, **_) -> None:
        if cell.cell_type != "code" or not str(cell.source).strip():
            return
        self._t0, self._n = time.time(), self._n + 1
        if self.tty:
            self.stream.write(f"\r\033[K[{self.stage}] cell {self._n} running: "
                              f"{self._first_line(cell)}")
            self.stream.flush()

    def executed(self, cell, cell_index: int, **_) -> None:
        seconds = time.time() - self._t0
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        if seconds >= self.min_seconds:
            self.log(f"[{self.stage}] cell {self._n} {seconds:6.1f} s  {self._first_line(cell)}",
                     flush=True)


def _report_notices(run: Run, stage: str, shown: set, record: dict, log) -> None:
    """Print each new distinct notice the stage's notebook recorded, once per run."""
    for notice in read_notices(run.path):
        text = notice.get("message", "")
        if text and text not in shown:
            shown.add(text)
            record["notices"].append({"stage": stage, **notice})
            log(f"[{stage}] note: {text} (details: {run.path / NOTICES})", flush=True)
