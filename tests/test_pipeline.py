"""The papermill stage runner, on a two-notebook pipeline and on the real offline profile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import nd_utils as nd
from nd_utils.pipeline import StageFailed, list_notebooks
from nd_utils.config import REPO_ROOT

PARAMS = 'config = "offline"\noverrides = []\nrun_dir = None\nforce = False'


def notebook(path: Path, body: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def pipeline(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    notebook(nbs / "01_first.ipynb",
             "import nd_utils as nd, pathlib\nrun = nd.open_run(config, overrides, run_dir)\n"
             "(run.results / 'first.txt').write_text(run.cfg['target.name'])")
    notebook(nbs / "02_second.ipynb",
             "import pathlib\nassert (pathlib.Path(run_dir) / 'results' / 'first.txt').exists()\n"
             "(pathlib.Path(run_dir) / 'results' / 'second.txt').write_text('ok')")
    (nbs / "notes.ipynb").write_text("not a stage notebook, never run")
    return nbs


def test_runs_in_order_into_a_run_folder(pipeline, tmp_path):
    notebook(pipeline / "01_first.ipynb",   # and tells the runner two things, one to repeat
             "import nd_utils as nd, pathlib\nrun = nd.open_run(config, overrides, run_dir)\n"
             "(run.results / 'first.txt').write_text(run.cfg['target.name'])\n"
             "from nd_utils.notices import record_notice\n"
             "record_notice('evaluation_probe', 'Evaluated on offline-sample (78 images)', stage='07')\n"
             "record_notice('probe_skipped', 'one image unreadable')")
    sources = {p: p.read_bytes() for p in pipeline.iterdir()}
    lines = []
    run = nd.run_pipeline("offline", [f"data_dir={tmp_path / 'd'}", "target.name=resnet18:none"],
                          notebook_dir=pipeline, log=lambda *a, **k: lines.append(" ".join(a)))
    # a notice that changes how the numbers read is said after its stage and again at the end
    assert lines[-1] == "note [07]: Evaluated on offline-sample (78 images)"
    assert sum("one image unreadable" in line for line in lines) == 1
    assert run.path.parent == tmp_path / "d" / "runs"
    assert (run.results / "first.txt").read_text() == "resnet18:none"
    assert (run.results / "second.txt").read_text() == "ok"
    assert sorted(p.name for p in (run.path / "notebooks").iterdir()) == [
        "01_first.ipynb", "02_second.ipynb"]
    record = json.loads((run.path / "run.json").read_text())
    assert record["status"] == "ok" and [s["status"] for s in record["stages"]] == ["ok", "ok"]
    assert nd.load_config(run.config_path)["target.name"] == "resnet18:none"
    assert {p: p.read_bytes() for p in pipeline.iterdir()} == sources  # sources untouched


def test_stops_at_first_failure(pipeline, tmp_path):
    notebook(pipeline / "01_first.ipynb", "raise ValueError('boom in stage one')")
    with pytest.raises(StageFailed, match="boom in stage one") as err:
        nd.run_pipeline("offline", [f"data_dir={tmp_path / 'd'}"], notebook_dir=pipeline,
                        log=lambda *a, **k: None)
    assert "01_first.ipynb" in str(err.value)
    run_dir = next((tmp_path / "d" / "runs").iterdir())
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and len(record["stages"]) == 1
    assert not (run_dir / "notebooks" / "02_second.ipynb").exists()


def test_stage_selection(pipeline, tmp_path):
    run = nd.run_pipeline("offline", [f"data_dir={tmp_path / 'd'}"], stages="1",
                          notebook_dir=pipeline, log=lambda *a, **k: None)
    assert [p.name for p in (run.path / "notebooks").iterdir()] == ["01_first.ipynb"]
    with pytest.raises(nd.NdUtilsError, match="available stages are 01, 02"):
        nd.run_pipeline("offline", [f"data_dir={tmp_path / 'd'}"], stages="07",
                        notebook_dir=pipeline, log=lambda *a, **k: None)


def _kernel_children() -> set[int]:
    import psutil
    return {c.pid for c in psutil.Process().children(recursive=True)
            if "ipykernel" in " ".join(c.cmdline())}


def test_cell_progress_lines():
    import io

    from nd_utils.pipeline import CellProgress

    lines, tty = [], io.StringIO()
    tty.isatty = lambda: True
    progress = CellProgress("04", lambda *a, **k: lines.append(" ".join(a)), min_seconds=0.05,
                            stream=tty)
    quick = nbformat.v4.new_code_cell("# load\nx = 1")
    slow = nbformat.v4.new_code_cell("%%time\nconcepts = nd.dnd_concepts(cfg, force=force)")
    progress.started(nbformat.v4.new_markdown_cell("# title"), 0)  # not counted
    for i, cell in enumerate([quick, slow], start=1):
        progress.started(cell, i)
        if cell is slow:
            import time
            time.sleep(0.1)
        progress.executed(cell, i)
    assert len(lines) == 1 and lines[0].startswith("[04] cell 2 ")
    assert lines[0].endswith("s  concepts = nd.dnd_concepts(cfg, force=force)")
    assert "[04] cell 1 running: x = 1" in tty.getvalue()  # the live line on a terminal


@pytest.mark.parametrize("warm", [True, False])
def test_next_kernel_starts_ahead_with_nd_utils_imported(pipeline, tmp_path, warm, capfd):
    notebook(pipeline / "02_second.ipynb",
             "import sys, pathlib\nwas = 'nd_utils.stages.dnd' in sys.modules\n"
             "(pathlib.Path(run_dir) / 'results' / 'warm.txt').write_text(str(was))")
    before = _kernel_children()
    run = nd.run_pipeline("offline", [f"data_dir={tmp_path / 'd'}"], notebook_dir=pipeline,
                          log=lambda *a, **k: None, warm_kernels=warm)
    # the warm-up import is silent: no output, and the notebook's counts start at 1 as usual
    assert (run.results / "warm.txt").read_text() == str(warm)
    executed = nbformat.read(run.path / "notebooks" / "02_second.ipynb", as_version=4)
    assert [c.execution_count for c in executed.cells if c.cell_type == "code"] == [1, 2, 3]
    assert not any(o.get("name") == "stderr" for c in executed.cells for o in c.outputs)
    assert _kernel_children() <= before  # every kernel was shut down
    if warm:  # our kernels use IPC: no TCP port, no warning about it
        assert "without encryption" not in capfd.readouterr().err


def test_failed_stage_shuts_down_the_kernel_started_ahead(pipeline, tmp_path):
    notebook(pipeline / "01_first.ipynb", "raise ValueError('boom in stage one')")
    before = _kernel_children()
    with pytest.raises(StageFailed, match="boom"):
        nd.run_pipeline("offline", [f"data_dir={tmp_path / 'd'}"], notebook_dir=pipeline,
                        log=lambda *a, **k: None)
    assert _kernel_children() <= before


def test_kernel_whose_warm_up_fails_is_replaced(pipeline, tmp_path, monkeypatch):
    import nd_utils.kernels as kernels
    monkeypatch.setattr(kernels, "WARM_UP_CODE", "raise RuntimeError('warm-up broke')")
    lines = []
    run = nd.run_pipeline("offline", [f"data_dir={tmp_path / 'd'}"], notebook_dir=pipeline,
                          log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert (run.results / "second.txt").read_text() == "ok"
    assert any("did not import nd_utils" in line for line in lines), lines


def test_cli_rejects_unknown_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nd_utils", "run", "offline",
                           "--set", "tagret.layers=[fc]"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "ND_DATA_DIR": str(tmp_path)})
    assert proc.returncode == 1
    assert "target.layers" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_demo_pipeline_end_to_end():
    """What `make demo` runs: every stage notebook on the offline profile, via the CLI.

    It uses the session's artifact store (ND_DATA_DIR, set in conftest.py), so the nbval runs of
    the same notebooks afterwards read these caches instead of recomputing them.
    """
    store = Path(os.environ["ND_DATA_DIR"])
    proc = subprocess.run([sys.executable, "-m", "nd_utils", "run", "offline", "--report"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = Path(proc.stdout.strip().splitlines()[-1])
    assert f"report: {results.parent / 'report' / 'index.html'}" in proc.stderr
    assert (results.parent / "report" / "index.html").stat().st_size > 1000
    assert results.is_dir() and results.parent.parent == store / "runs"
    record = json.loads((results.parent / "run.json").read_text())
    assert record["status"] == "ok"
    assert [s["notebook"] for s in record["stages"]] == [p.name for p in list_notebooks()]
    assert (results / "01_activation_distributions.png").stat().st_size > 10_000
    cfg = nd.load_config(results.parent / "config.yaml")
    for layer in cfg["target.layers"]:
        acts = nd.load_activations(cfg, layer)
        assert acts.n_images >= 50 and torch_finite(acts.activations)
        if (REPO_ROOT / "notebooks" / "02_clip_dissect.ipynb").exists():
            import pandas as pd
            table = pd.read_csv(results / f"02_clip_dissect_{layer}.csv", keep_default_na=False)
            assert len(table) == acts.n_neurons  # every neuron of every layer is labelled
            assert (table.description != "").all()


def torch_finite(x):
    import torch
    return bool(torch.isfinite(x).all())


def _network_reachable(host="download.pytorch.org") -> bool:
    import socket
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_paper_profile_offline_names_the_offline_profile(tmp_path):
    if _network_reachable():
        pytest.skip("network reachable: the paper profile would download ResNet-50 for real")
    env = {**os.environ, "ND_DATA_DIR": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, "-m", "nd_utils", "run", "paper", "--stages", "01"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert proc.returncode == 1
    assert "OfflineError" in proc.stderr and "configs/offline.yaml" in proc.stderr
    assert "01_activation_caching.ipynb" in proc.stderr  # the executed copy to open
    assert not list(tmp_path.glob("artifacts/*/[!.]*"))  # no stage output published
