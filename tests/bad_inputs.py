"""Bad inputs and faults a new user meets, and what each one must get: a clear, named error or a
correct result, never a silently wrong output or a broken cache.

Every case is a function of a fresh temporary folder that raises AssertionError when the input
is not handled, and otherwise returns what the user sees (the first line of the error, or the
outcome). `tests/test_bad_inputs.py` runs each case as a test; run on its own this prints one
line per case and `N/N handled`:

    python tests/bad_inputs.py               # all cases
    python tests/bad_inputs.py --markdown    # the README's table
    python tests/bad_inputs.py -k jsonl      # cases whose name contains "jsonl"
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from nd_utils.errors import DamagedArtifactError

REPO = Path(__file__).resolve().parents[1]
CASES: "list[tuple[str, str, Callable[[Path], str]]]" = []   # (name, input, case)


def case(name: str, what: str):
    def register(fn):
        CASES.append((name, what, fn))
        return fn
    return register


def expect_error(exc_type, fn, *needles: str) -> str:
    """Run `fn`, require `exc_type`, and require every needle in its message; return line 1."""
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        return msg.splitlines()[0]
    except Exception as exc:  # the wrong kind of error is a failure of the case
        raise AssertionError(f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}")
    raise AssertionError(f"expected {exc_type.__name__}, nothing was raised")


# --- a tiny real pipeline: a conv net and a folder of images ------------------------------------

TINY = textwrap.dedent("""
    import torch
    from torch import nn
    from torchvision import transforms as T

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.pool(self.act(self.conv(x))).flatten(1))

    PRE = T.Compose([T.Resize((16, 16)), T.ToTensor()])
""")


def make_images(root: Path, n: int = 12, broken: int = 1) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("red" if i % 2 else "blue")
        sub.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"img{i:02d}.png")
    for b in range(broken):
        (root / "red" / f"broken{b}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def tiny_setup(tmp: Path, extra: "list[str] | None" = None):
    """(config, target) of the tiny net over 12 images (+1 broken), store under tmp/store."""
    import nd_utils as nd

    ns: dict = {}
    exec(TINY, ns)
    folder = make_images(tmp / "imgs")
    cfg = nd.load_config("offline", [
        f"data_dir={tmp / 'store'}", "target.layers=[act, fc]", "target.name=tiny",
        f"probe.sets=[{{name: folder, path: {folder}}}]", "activations.chunk_size=4",
        "activations.batch_size=3", "activations.top_k=5", "device=cpu", *(extra or [])])
    return cfg, nd.from_module(ns["Tiny"](), ns["PRE"], name="tiny")


def cached_layer(tmp: Path):
    """Cache the tiny net's layers; return (cfg, target, folder of the `act` artifact)."""
    import nd_utils as nd

    cfg, target = tiny_setup(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.cache_activations(cfg, target=target, progress=False)
        folder = nd.load_activations(cfg, "act", target=target).path
    return cfg, target, folder


def load_act(cfg, target):
    import nd_utils as nd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nd.load_activations(cfg, "act", target=target)


# --- 1. damaged artifacts ---------------------------------------------------------------------

@case("tampered-tensor", "activations.safetensors rewritten as a valid file, manifest untouched")
def _(tmp):
    import torch
    from safetensors.torch import load_file, save_file


    cfg, target, folder = cached_layer(tmp)
    f = folder / "activations.safetensors"
    t = load_file(str(f))
    t["activations"] = torch.flip(t["activations"], [0]).contiguous()   # same size, other values
    save_file(t, str(f))
    return expect_error(DamagedArtifactError, lambda: load_act(cfg, target),
                        str(folder), "activations.safetensors", "--stages 01 --force")


@case("truncated-tensor", "activations.safetensors truncated")
def _(tmp):

    cfg, target, folder = cached_layer(tmp)
    f = folder / "activations.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return expect_error(DamagedArtifactError, lambda: load_act(cfg, target),
                        str(folder), "truncated", "--force")


@case("bad-manifest", "manifest.json that is not JSON")
def _(tmp):

    cfg, target, folder = cached_layer(tmp)
    (folder / "manifest.json").write_text('{"stage": "01_activation_caching", "files": {')
    return expect_error(DamagedArtifactError, lambda: load_act(cfg, target),
                        str(folder), "manifest.json", "--force")


@case("edited-checksum", "a file's sha256 edited in manifest.json")
def _(tmp):

    cfg, target, folder = cached_layer(tmp)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["activations.safetensors"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))
    return expect_error(DamagedArtifactError, lambda: load_act(cfg, target),
                        str(folder), "edited", "--force")


@case("missing-file", "a published artifact without its tensor file")
def _(tmp):

    cfg, target, folder = cached_layer(tmp)
    (folder / "activations.safetensors").unlink()
    return expect_error(DamagedArtifactError, lambda: load_act(cfg, target),
                        str(folder), "missing", "--force")


@case("force-rebuilds", "--force after damage: the artifact is rebuilt, same values")
def _(tmp):
    import torch

    import nd_utils as nd

    cfg, target, folder = cached_layer(tmp)
    before = load_act(cfg, target).activations.clone()
    f = folder / "activations.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.cache_activations(cfg, target=target, progress=False, force=True)
    after = load_act(cfg, target).activations
    assert torch.equal(before, after), "the rebuilt activations differ"
    return "rebuilt; values identical to the first run"


# --- 2. concurrent writers --------------------------------------------------------------------

STORE_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nd_utils.store import ArtifactStore
    store, go = ArtifactStore(sys.argv[1]), Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    for i in range(12):
        key = f"k{i:02d}"
        if store.exists("conc", key):
            store.open("conc", key)
            continue
        with store.writer("conc", key, params={"i": i}) as tmp:
            for j in range(3):  # slow, deterministic content: writers overlap
                (tmp / f"part{j}.bin").write_bytes(bytes([i, j]) * 50_000)
                time.sleep(0.02)
        store.open("conc", key)
""")


def _run_parallel(code: str, args: list, n: int = 3, timeout: float = 300) -> list:
    go = Path(args[-1])
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    time.sleep(0.5)
    go.touch()
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        out.append((p.returncode, so, se))
    return out


@case("concurrent-store", "3 processes writing the same 12 keys")
def _(tmp):
    from nd_utils.store import ArtifactStore

    results = _run_parallel(STORE_WRITER, [tmp / "store", tmp / "go"])
    errors = [se.strip().splitlines()[-1] for rc, _, se in results if rc != 0]
    assert not errors, f"writers failed: {errors}"
    store = ArtifactStore(tmp / "store")
    for i in range(12):
        art = store.open("conc", f"k{i:02d}")
        assert sorted(art.manifest["files"]) == ["part0.bin", "part1.bin", "part2.bin"]
    debris = [p.name for p in (tmp / "store" / "artifacts" / "conc").iterdir()
              if p.name.startswith((".staging", ".discard", ".trash"))]
    assert not debris, f"left behind: {debris}"
    return "12/12 keys complete and verified, no staging debris, 3/3 writers exit 0"


DECODE_WRITER = TINY + textwrap.dedent("""
    import hashlib, json, sys, time, warnings
    from pathlib import Path
    import nd_utils as nd
    folder, store, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cfg = nd.load_config("offline", [f"data_dir={store}", "target.layers=[act, fc]",
        "target.name=tiny", f"probe.sets=[{{name: folder, path: {folder}}}]",
        "activations.chunk_size=4", "activations.batch_size=3", "activations.top_k=5", "device=cpu"])
    target = nd.from_module(Tiny(), PRE, name="tiny")
    warnings.simplefilter("ignore")
    probe = nd.load_probe_from_config(cfg)
    while not go.exists():
        time.sleep(0.005)
    arts = nd.cache_activations(cfg, target=target, probe=probe, progress=False)
    print(json.dumps({layer: [a.key, a.manifest["writer"]["pid"],
                              hashlib.sha256((a.path / "activations.safetensors").read_bytes()).hexdigest()]
                      for layer, a in arts.items()}))
""")


@case("concurrent-activations", "3 processes caching the same layers at once")
def _(tmp):
    folder = make_images(tmp / "imgs", n=40, broken=0)
    results = _run_parallel(DECODE_WRITER, [folder, tmp / "store", tmp / "go"])
    errors = [se.strip().splitlines()[-1] for rc, _, se in results if rc != 0]
    assert not errors, f"writers failed: {errors}"
    seen = [json.loads(so.strip().splitlines()[-1]) for _, so, _ in results]
    assert all(s == seen[0] for s in seen), "processes saw different artifacts"
    writers = {pid for _, pid, _ in seen[0].values()}
    return (f"3/3 processes exit 0 with identical artifacts; each key computed once "
            f"({len(writers)} writer process(es) for {len(seen[0])} keys)")


JSONL_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nd_utils.jsonl_cache import JsonlCache
    cache, go, who = JsonlCache(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    while not go.exists():
        time.sleep(0.005)
    for i in range(150):
        req = {"who": who, "i": i, "text": "naïve café ✓ " * 20}
        cache.put(cache.key(req), req, f"answer {who} {i} – ✓")
""")


@case("concurrent-jsonl", "3 processes appending to one answer cache")
def _(tmp):
    from nd_utils.jsonl_cache import JsonlCache

    path, go = tmp / "answers.jsonl", tmp / "go"
    procs = [subprocess.Popen([sys.executable, "-c", JSONL_WRITER, str(path), str(go), str(w)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for w in range(3)]
    time.sleep(0.5)
    go.touch()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a torn line would warn
        cache = JsonlCache(path)
        assert len(cache) == 450, len(cache)
    return "450/450 records readable, no torn line"


@case("jsonl-torn-utf8", "an answer cache whose last line was cut inside a multi-byte character")
def _(tmp):
    from nd_utils.jsonl_cache import JsonlCache

    path = tmp / "llm_answers.jsonl"
    cache = JsonlCache(path)
    cache.put("a", {"p": 1}, "crème brûlée")
    line = json.dumps({"key": "b", "answer": "brûlée"}, ensure_ascii=False).encode()
    cut = line.index("û".encode()) + 1                      # inside the 2-byte character
    with open(path, "ab") as fh:
        fh.write(line[:cut])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = JsonlCache(path)
        assert fresh.get("a")["answer"] == "crème brûlée" and fresh.get("b") is None
        assert any("unreadable line" in str(w.message) for w in caught), "no warning"
        fresh.put("c", {"p": 3}, "ok")
        assert JsonlCache(path).get("c")["answer"] == "ok"
    return "torn line skipped with a warning; later appends readable"


@case("jsonl-shared-reads", "an answer added by another process is seen without restarting")
def _(tmp):
    from nd_utils.jsonl_cache import JsonlCache

    path = tmp / "captions.jsonl"
    mine, theirs = JsonlCache(path), JsonlCache(path)
    assert mine.get("k") is None
    theirs.put("k", {"q": 1}, "a caption")
    assert mine.get("k")["answer"] == "a caption"
    return "a miss re-reads the lines appended since the last read"


# --- 3. config values -------------------------------------------------------------------------

def _cfg(*overrides):
    import nd_utils as nd

    return lambda: nd.load_config("offline", list(overrides))


@case("malformed-yaml", "a config file that is not valid YAML")
def _(tmp):
    import nd_utils as nd

    bad = tmp / "mine.yaml"
    bad.write_text("profile: offline\ntarget:\n  layers: [head\n  name: x\n")
    return expect_error(nd.ConfigError, lambda: nd.load_config(bad), str(bad), "line")


@case("probe-limit-abc", "probe.limit=abc")
def _(tmp):
    import nd_utils as nd

    return expect_error(nd.ConfigError, _cfg("probe.limit=abc"), "probe.limit", "abc")


@case("top-k-zero", "activations.top_k=0")
def _(tmp):
    import nd_utils as nd

    return expect_error(nd.ConfigError, _cfg("activations.top_k=0"), "activations.top_k")


@case("chunk-size-zero", "activations.chunk_size=0")
def _(tmp):
    import nd_utils as nd

    return expect_error(nd.ConfigError, _cfg("activations.chunk_size=0"),
                        "activations.chunk_size")


@case("dnd-neurons-abc", "dnd.neurons={head: abc}")
def _(tmp):
    import nd_utils as nd

    return expect_error(nd.ConfigError, _cfg("dnd.neurons={head: abc}"), "dnd.neurons")


@case("layers-no-brackets", "target.layers=head (no brackets)")
def _(tmp):
    import nd_utils as nd

    return expect_error(nd.ConfigError, _cfg("target.layers=head"), "target.layers", "[head]")


@case("device-tpu", "device=tpu")
def _(tmp):
    import nd_utils as nd

    return expect_error(nd.ConfigError, _cfg("device=tpu"), "device", "cpu")


@case("data-dir-file", "data_dir that is a file")
def _(tmp):
    import nd_utils as nd
    from nd_utils.config import check_data_dir

    f = tmp / "not-a-folder"
    f.write_text("x")
    cfg = nd.load_config("offline", [f"data_dir={f}"])
    return expect_error(nd.ConfigError, lambda: check_data_dir(cfg), str(f), "data_dir")


@case("data-dir-read-only", "data_dir on a read-only file system")
def _(tmp):
    import nd_utils as nd
    from nd_utils.config import check_data_dir

    if os.geteuid() == 0:       # root writes through permission bits: use a read-only mount
        ro = Path("/sys/nd-data")
        assert not os.access("/sys", os.W_OK) or not _can_mkdir(ro), "no read-only place here"
    else:
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    cfg = nd.load_config("offline", [f"data_dir={ro}"])
    return expect_error(nd.ConfigError, lambda: check_data_dir(cfg), str(ro), "data_dir")


def _can_mkdir(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


# --- 4. concept sets --------------------------------------------------------------------------

@case("short-concept-set", "a concept set with fewer concepts than clip_dissect.top_n")
def _(tmp):
    import torch

    import nd_utils as nd
    from nd_utils.stages.clip_dissect import label_table

    words = tmp / "three.txt"
    words.write_text("dog\ncat\ncar\n")
    concepts = nd.load_concept_set(str(words))
    table = label_table(torch.rand(4, 3), concepts, "fc")
    assert len(table) == 4 and table["description"].isin(["dog", "cat", "car"]).all()
    return f"labels made; columns {', '.join(c for c in table.columns if c.startswith('concept_'))}"


@case("huge-concept-line", "a 10 MB line in a concept file")
def _(tmp):
    import nd_utils as nd

    big = tmp / "big.txt"
    big.write_text("dog\n" + "x" * 10_000_000 + "\ncat\n")
    return expect_error(nd.NdUtilsError, lambda: nd.load_concept_set(str(big)), str(big),
                        "line 2")


# --- 5. silence -------------------------------------------------------------------------------

def _notebook_dir(tmp: Path, *cells: str) -> Path:
    """A one-stage notebook folder: the runner's parameters, then `cells`."""
    import nbformat

    nbs = tmp / "nbs"
    nbs.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('config = "offline"\noverrides = []\nrun_dir = None\n'
                                       'force = False')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, nbs / "01_stage.ipynb")
    return nbs


@case("unreadable-images-summary", "unreadable probe images: the runner prints one line")
def _(tmp):
    import nd_utils as nd

    folder = make_images(tmp / "imgs", n=4, broken=2)
    nbs = _notebook_dir(tmp, "import nd_utils as nd\n"
                        "run = nd.open_run(config, overrides, run_dir)\n"
                        "probe = nd.load_probe_from_config(run.cfg)")
    lines = []
    nd.run_pipeline("offline", [f"data_dir={tmp / 'store'}",
                                f"probe.sets=[{{name: folder, path: {folder}}}]"],
                    notebook_dir=nbs, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    notes = [ln for ln in lines if "note:" in ln]
    assert len(notes) == 1 and "2 of 6 image(s) unreadable" in notes[0], lines
    return notes[0].split("note: ", 1)[1].split(" (details")[0]


@case("killed-run", "a run whose runner was killed: run.json said 'running' forever")
def _(tmp):
    from nd_utils.runs import mark_interrupted_runs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = tmp / "runs" / "20260101-000000-offline-abc" / "run.json"
    rec.parent.mkdir(parents=True)
    import platform
    rec.write_text(json.dumps({"status": "running", "pid": dead.pid, "host": platform.node(),
                               "stages": [{"notebook": "01_x.ipynb", "status": "running"}]}))
    alive = rec.parent.with_name("20260101-000001-offline-abc") / "run.json"
    alive.parent.mkdir()
    alive.write_text(json.dumps({"status": "running", "pid": os.getpid(),
                                 "host": platform.node(), "stages": []}))
    marked = mark_interrupted_runs(tmp / "runs", log=lambda *a, **k: None)
    assert marked == [rec.parent], marked
    assert json.loads(rec.read_text())["status"] == "interrupted"
    assert json.loads(alive.read_text())["status"] == "running"
    return "marked 'interrupted' by the next run; a live run is left alone"


# --- 5b. long runs on shared machines: termination signals, a full disk, Ray's ports ----------

RUNNER = textwrap.dedent("""
    import sys
    from nd_utils.pipeline import run_pipeline
    try:
        run_pipeline("offline", sys.argv[2:], notebook_dir=sys.argv[1], log=lambda *a, **k: None)
    except KeyboardInterrupt as exc:
        sys.exit(getattr(exc, "exit_code", 130))
""")


def _descendants(pid: int) -> set:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _kernel_files(pids: set) -> list:
    """The connection files of the kernels among `pids`, and their IPC socket folders."""
    import psutil

    out = []
    for pid in pids:
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        if "-f" in cmd and cmd.index("-f") + 1 < len(cmd):
            conn = Path(cmd[cmd.index("-f") + 1])
            out.append(conn)
            try:
                out.append(Path(json.loads(conn.read_text())["ip"]).parent)
            except (OSError, ValueError, KeyError):
                pass
    return out


def _sigterm_mid_stage(tmp: Path, cell: str, overrides: list, settle: float = 0.0) -> str:
    """Start a runner whose stage writes `started` then works; SIGTERM it there; check that it
    exits 143, run.json says interrupted by SIGTERM, and none of its processes, kernel
    connection files or socket folders are left."""
    import signal

    import psutil

    nbs = _notebook_dir(tmp, "import pathlib, time\n" + cell +
                        "\npathlib.Path(run_dir, 'started').write_text('1')\ntime.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(nbs),
                             f"data_dir={tmp / 'store'}", *overrides],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not list((tmp / "store" / "runs").glob("*/started")):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "the stage never started"
        time.sleep(0.5)
    time.sleep(settle)
    children = _descendants(proc.pid)
    kernel_files = _kernel_files(children)
    assert any(p.name.startswith("ndk-") for p in kernel_files), kernel_files
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    assert rc == 143, (rc, proc.stdout.read().decode()[-2000:])
    time.sleep(2)
    left = [p for p in children if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[psutil.Process(p).name() for p in left]}"
    assert not [p for p in kernel_files if p.exists()], "kernel files left behind"
    record = json.loads(next((tmp / "store" / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM", record
    assert record["stages"][-1]["status"] == "interrupted", record["stages"]
    return (f"exit 143, run.json 'interrupted' (SIGTERM); its {len(children)} child process(es), "
            f"kernel connection files and socket folders are gone")


@case("sigterm-in-stage", "SIGTERM (SLURM time limit, eviction, kill) during a stage")
def _(tmp):
    return _sigterm_mid_stage(tmp, "", [])


@case("sigterm-on-ray", "SIGTERM during a stage running on a local Ray instance")
def _(tmp):
    cell = ("import nd_utils as nd\nfrom nd_utils.executors import load_executor\n"
            "ex = load_executor('ray')\nex.map(abs, [-1, 2], desc='probe', progress=False)")
    return "Ray: " + _sigterm_mid_stage(tmp, cell, ["executor.name=ray", "executor.num_cpus=1"],
                                        settle=1.0)


@case("disk-full-run-record", "the disk fills up while the runner writes run.json")
def _(tmp):
    import errno

    import nd_utils.pipeline as pipeline
    from nd_utils.errors import DiskFullError

    nbs = _notebook_dir(tmp, "x = 1")
    real, calls = pipeline.atomic_write_text, []

    def full_on_second(path, text):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    pipeline.atomic_write_text = full_on_second
    try:
        shown = expect_error(DiskFullError, lambda: pipeline.run_pipeline(
            "offline", [f"data_dir={tmp / 'store'}"], notebook_dir=nbs, log=lambda *a, **k: None,
            warm_kernels=False), "no space left on the disk holding", "run.json", "free of",
            "--set data_dir=", "rerun the same command")
    finally:
        pipeline.atomic_write_text = real
    record = json.loads(next((tmp / "store" / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "failed" and record["reason"] == "disk_full", record
    return shown.split(" (")[0]


@case("disk-full-in-stage", "a stage finds the disk full (OSError: [Errno 28])")
def _(tmp):
    import nd_utils as nd
    from nd_utils.errors import DiskFullError

    nbs = _notebook_dir(tmp, "raise OSError(28, 'No space left on device', '/data/x.safetensors')")
    shown = expect_error(DiskFullError, lambda: nd.run_pipeline(
        "offline", [f"data_dir={tmp / 'store'}"], notebook_dir=nbs, log=lambda *a, **k: None,
        warm_kernels=False), "the outputs of stage 01_stage.ipynb", "free of",
        "Executed notebook with the traceback")
    record = json.loads(next((tmp / "store" / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "failed" and record["reason"] == "disk_full", record
    assert record["stages"][0]["reason"] == "disk_full"
    return shown.split(" (")[0]


@case("disk-short-before-stage-01", "a disk too small for stage 01's activations")
def _(tmp):
    import nd_utils.run_faults as rf

    cfg, target = tiny_setup(tmp)
    real = rf.free_bytes
    rf.free_bytes = lambda folder: (100, 3 * 2**20)      # a 3 MB disk with 100 bytes left
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import nd_utils as nd

            nd.cache_activations(cfg, target=target, progress=False)
    finally:
        rf.free_bytes = real
    said = [str(w.message) for w in caught if "needs about" in str(w.message)]
    assert said and "stage 01 (" in said[0] and "--set data_dir=" in said[0], said
    return said[0].split(":")[0]


@case("ray-local-instance-token", "a local Ray instance: its ports are reachable from the network")
def _(tmp):
    code = textwrap.dedent("""
        import os, subprocess, sys
        from nd_utils.executors import load_executor
        ex = load_executor("ray", num_cpus=1)
        assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
        address = ex._ray.get_runtime_context().gcs_address
        intruder = ("import ray; ray.init(address=%r, logging_level='ERROR');"
                    "print(ray.get(ray.remote(lambda: 'ran').remote()))" % address)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        r = subprocess.run([sys.executable, "-c", intruder], env=env, capture_output=True,
                           text=True, timeout=120)
        print("refused" if r.returncode and "ran" not in r.stdout else "ACCEPTED")
        ex._ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("refused"), out.stderr[-2000:]
    return "token authentication on: a client without the run's token is refused"


@case("ray-remote-without-token", "joining a Ray cluster on another host without a token")
def _(tmp):
    from nd_utils.executors import warn_if_unauthenticated

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RAY_AUTH")}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert warn_if_unauthenticated("127.0.0.1:6379") is None
            assert warn_if_unauthenticated("ray://[::1]:10001") is None
            said = warn_if_unauthenticated("10.1.2.3:6379")
        assert said and "RAY_AUTH_MODE=token" in said and len(caught) == 1
        os.environ["RAY_AUTH_MODE"] = "token"
        assert warn_if_unauthenticated("10.1.2.3:6379") is None
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.update(saved)
    return "a warning: " + said.split(". ")[0]


# --- 6. rank_reorder with negative cosines ----------------------------------------------------

@case("rank-reorder-negative", "rank_reorder when concepts have negative mean cosines")
def _(tmp):
    import torch

    from nd_utils.similarity_formulas import rank_reorder

    g = torch.Generator().manual_seed(0)
    P = torch.rand(200, 30, generator=g) * 2 - 1          # cosines in [-1, 1]
    A = torch.rand(200, 8, generator=g)
    sim = rank_reorder(P, A)
    assert not torch.isnan(sim).any(), "NaN scores"
    best = sim.argmax(1)
    idx = A.T.topk(10, dim=1).indices                       # the top 5 % of 200 images
    mean_c = torch.stack([P[idx[k]].mean(0) for k in range(8)])   # [K, M]
    assert (mean_c[torch.arange(8), best] > 0).all(), "a label with a negative mean cosine won"
    return "no NaN; every label has a positive mean cosine"


def run(select: str = "", markdown: bool = False) -> int:
    import tempfile

    chosen = [c for c in CASES if select in c[0]]
    ok = 0
    rows = []
    for name, what, fn in chosen:
        with tempfile.TemporaryDirectory(prefix=f"nd-bad-{name}-") as d:
            t0 = time.time()
            try:
                shown, good = fn(Path(d)), True
            except Exception as exc:  # a case that fails is reported, not fatal to the rest
                shown, good = f"NOT HANDLED: {type(exc).__name__}: {exc}".splitlines()[0], False
            shown = shown.replace(str(Path(d).resolve()), "<tmp>").replace(d, "<tmp>")
        ok += good
        rows.append((name, what, shown, good))
        if not markdown:
            print(f"{'ok  ' if good else 'FAIL'} {name:<26} {time.time() - t0:5.1f}s  {shown}",
                  flush=True)
    if markdown:
        print("| bad input or fault | what it gets |\n|---|---|")
        for _, what, shown, _ in rows:
            print(f"| {what} | {shown.replace('|', '/')} |")
    print(f"{ok}/{len(chosen)} handled")
    return 0 if ok == len(chosen) else 1


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    a = ap.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(run(a.k, a.markdown))
