"""Executors: the same keys and bytes in-process, on 2 Ray workers, and after a killed worker.

The Ray tests start one local instance with 2 CPUs (`ray.init(num_cpus=2)`) for the module; every
run writes into the same store path, so that outputs which name files (concept image paths) can
be compared byte for byte.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import nd_utils as nd
from nd_utils.store import ArtifactStore
from nd_utils import executors
from nd_utils.errors import UnknownNameError
from nd_utils.executors import ExecutorError, load_executor

REPO = Path(__file__).resolve().parent.parent
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[cluster]'")


def dnd_overrides(store: Path, executor: str) -> list[str]:
    """A small real DnD run: 2 head channels and 2 fc classes, the offline models (SmolLM2)."""
    return [f"data_dir={store}", "device=cpu", "probe.limit=40", "target.layers=[head, fc]",
            "dnd.layers=[head, fc]", "dnd.neurons={head: 2, fc: [99, 305]}", "dnd.top_k=4",
            "activations.top_k=8", "activations.chunk_size=16", "llm.summaries=2",
            "synthesis.images_per_concept=4", "synthesis.pool=[{name: offline-sample}]",
            f"executor.name={executor}", "executor.threads=1", "executor.num_cpus=2"]


def run_dnd(cfg) -> dict:
    """Stages 01 and 03-06 in the pipeline's order (06 finds 05's images in the store)."""
    nd.cache_activations(cfg, progress=False)
    nd.dnd_synthesis(cfg, progress=False)
    return nd.dnd_selection(cfg, progress=False)


@pytest.fixture(scope="module")
def ray_2_workers():
    ex = load_executor("ray", num_cpus=2, threads=1)
    assert ray.cluster_resources()["CPU"] == 2 and ex.workers == 2
    executors._cached_executor.cache_clear()
    yield ex
    ray.shutdown()
    executors._cached_executor.cache_clear()
    executors._MODELS.clear()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The reference: the whole small DnD run in this process, one CPU thread, store moved
    aside afterwards (the Ray runs reuse its path)."""
    store = tmp_path_factory.mktemp("executors") / "store"
    run_dnd(nd.load_config("offline", dnd_overrides(store, "local")))
    kept = store.with_name("in-process")
    shutil.move(store, kept)
    executors._MODELS.clear()
    return store, ArtifactStore(kept).file_hashes()


def test_local_executor_keeps_order_and_names_are_checked():
    ex = load_executor("local")
    assert ex.map(lambda x, add=0: x * 10 + add, [3, 1, 2], progress=False,
                  local_kwargs={"add": 1}) == [31, 11, 21]
    assert "ray" in nd.list_executors() and "local" in nd.list_executors()
    with pytest.raises(UnknownNameError, match="spark"):
        load_executor("spark")


def test_executor_is_never_part_of_a_key(tmp_path):
    from nd_utils.stages.activations import activation_key
    from nd_utils.probes import load_probes

    probe = load_probes([{"name": "offline-sample"}]).subset(8)
    keys = {activation_key(nd.load_config("offline", [f"executor.name={name}",
                                                      f"executor.threads={t}"]), "fc", probe)
            for name, t in [("local", 1), ("ray", 2)]}
    assert len(keys) == 1


def test_chunks_sent_elsewhere_carry_the_callers_batch_size(tmp_path):
    """The retrieval pool's features use vlm.batch_size, stage 01 activations.batch_size: a
    worker must cut a chunk into the caller's batches, or its results differ in the last bits."""
    from nd_utils.stages.activations import activation_jobs
    from nd_utils.decode_once import run_decode_once

    cfg = nd.load_config("offline", [f"data_dir={tmp_path}", "device=cpu", "probe.limit=10",
                                     "target.layers=[fc]"])
    probe = nd.load_probe_from_config(cfg)
    jobs = activation_jobs(cfg, nd.load_target("efficientnet-lite0"), probe)
    plans = []

    def elsewhere(plan):
        plans.extend(plan)
        raise RuntimeError("stop")  # nothing is published: only the plan matters here

    with pytest.raises(RuntimeError, match="stop"):
        run_decode_once(probe, jobs, ArtifactStore(tmp_path), batch_size=7, chunk_size=4,
                        run_chunks=elsewhere, progress=False)
    assert [p[:3] for p in plans] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert {p[4] for p in plans} == {7}


def test_ray_results_are_identical_to_in_process(in_process, ray_2_workers):
    store, expected = in_process
    cfg = nd.load_config("offline", dnd_overrides(store, "ray"))
    assert executors.executor_from_config(cfg).name == "ray"
    run_dnd(cfg)
    got = ArtifactStore(store).file_hashes()
    assert set(got) == set(expected)        # the same keys ...
    assert got == expected                  # ... and the same bytes in every file
    stages = {k.split("/")[0] for k in got}
    assert {"01_activation_caching", "03_captions", "04_concepts", "05_concept_images",
            "06_concept_activations", "06_selection"} <= stages
    # the work really ran on Ray: the manifests name the executor
    concepts = [json.loads(m.read_text()) for m in store.glob("artifacts/04_concepts/*/manifest.json")]
    assert concepts and all(m["executor"]["name"] == "ray" for m in concepts)
    assert all(m["executor"]["workers"] == 2 for m in concepts)
    shutil.rmtree(store)


def _worker_pids(title: str) -> list[int]:
    """Ray worker processes whose title (`ray::<task name>`) contains `title`."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and title in cmd:
            found.append(p.info["pid"])
    return found


def _kill_worker_running(title: str, when=lambda: True, n: int = 1, timeout: float = 240.0
                        ) -> int:
    """SIGKILL (up to `n` of) the Ray workers found running task `title`, once `when()` holds;
    returns how many were killed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = _worker_pids(title)
        if pids and when():
            for pid in pids[:n]:
                os.kill(pid, signal.SIGKILL)
            return len(pids[:n])
        time.sleep(0.05)
    raise AssertionError(f"no Ray worker ran a task named {title!r} within {timeout} s")


def _in_thread(fn) -> "tuple[threading.Thread, dict]":
    out: dict = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported by the test, not lost in the thread
            out["error"] = exc
    t = threading.Thread(target=body)
    t.start()
    return t, out


def _answers_with_seed(store: Path, seed: int) -> int:
    """Answers in the language-model cache asked with seeds `seed .. seed + 9` (a run with
    `seed` asks simplify with `seed` and summarise call t with `seed + t`)."""
    path = store / "cache" / "llm_answers.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(json.loads(ln)["request"]["seed"] in range(seed, seed + 10)
               for ln in lines if ln)


def test_killed_worker_is_retried_and_a_failed_run_resumes(in_process, ray_2_workers):
    from nd_utils.stages.candidate_concepts import generate_concepts
    from nd_utils.stages.captions import caption_key

    store, expected = in_process
    cfg = nd.load_config("offline", dnd_overrides(store, "ray"))
    nd.cache_activations(cfg, progress=False)
    nd.dnd_captions(cfg, progress=False)
    # 1. a worker killed in the middle of the language-model stage: Ray runs its task again
    t, killed = _in_thread(lambda: _kill_worker_running("head: concepts"))
    nd.dnd_concepts(cfg, progress=False)
    t.join()
    assert "error" not in killed and killed["value"] > 0
    # 2. without retries the stage fails, naming the fix; the rerun resumes from the answers
    #    cached before the failure (another seed: none of these prompts were asked before)
    strict = load_executor("ray", max_retries=0, threads=1)
    other = cfg.with_overrides({"dnd.layers": ["head"], "seed": 7, "llm.summaries": 4})
    tops = nd.dnd_top_images(other, progress=False)
    caps = nd.dnd_captions(other, progress=False, tops=tops)["head"]
    key = caption_key(other, tops["head"])
    # both neurons' workers, once two answers are cached: neither unit can have finished
    t, killed = _in_thread(lambda: _kill_worker_running(
        "head: concepts", when=lambda: _answers_with_seed(store, 7) >= 2, n=2))
    with pytest.raises(ExecutorError, match="rerun the same command to resume"):
        generate_concepts(other, "head", caps, key, progress=False, executor=strict)
    t.join()
    assert "error" not in killed and killed["value"] >= 1
    kept = _answers_with_seed(store, 7)
    assert kept > 0
    resumed = generate_concepts(other, "head", caps, key, progress=False, executor=strict)
    llm = resumed.manifest["llm"]
    assert llm["hits"] >= kept and llm["model_calls"] == llm["misses"] > 0
    # 3. the rest of the run: every output equals the in-process one
    run_dnd(cfg)
    got = ArtifactStore(store).file_hashes()
    assert {k: v for k, v in got.items() if k in expected} == expected
    shutil.rmtree(store)


def test_a_concept_wanted_by_two_workers_is_synthesised_once(tmp_path, ray_2_workers):
    from functools import partial

    from nd_utils.stages.synthesis import images_of_concept

    cfg = nd.load_config("offline", dnd_overrides(tmp_path / "store", "ray"))
    done = ray_2_workers.map(partial(images_of_concept, cfg), ["red fruit"] * 4,
                             desc="same concept", progress=False)
    assert len({d["key"] for d in done}) == 1
    assert sum(d["built"] for d in done) == 1       # one built it, three used its output
    assert len(list((tmp_path / "store").glob("artifacts/05_concept_images/*/manifest.json"))) == 1


def test_unit_errors_name_the_unit_and_the_fix(ray_2_workers):
    with pytest.raises(ExecutorError, match=r"unit 'x' failed on Ray: ValueError: invalid "
                                            r"literal.*rerun the same command to resume"):
        ray_2_workers.map(int, ["1", "x", "2"], desc="check", progress=False)
    assert ray_2_workers.map(int, ["1", "2"], desc="check", progress=False) == [1, 2]


def test_runner_starts_one_ray_instance_for_the_stages(tmp_path):
    """`run ... --executor ray`: the runner starts Ray, the stage's kernel joins it, the
    notebook shows the units' progress, and Ray is gone afterwards."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "nd_utils", "run", "offline", "--stages", "01",
           "--executor", "ray", "--num-cpus", "2", "--set", f"data_dir={store}",
           "--set", "probe.limit=40", "--set", "activations.chunk_size=16",
           "--set", "target.layers=[fc]", "--cold-kernels"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray: started a local instance" in done.stderr
    run = Path(done.stdout.strip().splitlines()[-1]).parent
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["executor"]["name"] == "ray" and saved["executor"]["num_cpus"] == 2
    executed = (run / "notebooks" / "01_activation_caching.ipynb").read_text()
    assert "activation chunks: 3 units on" in executed
    manifests = [json.loads(m.read_text()) for m in
                 store.glob("artifacts/01_activation_caching/*/manifest.json")]
    assert len(manifests) == 1 and manifests[0]["shape"] == [40, 1000]


def test_cli_rejects_an_address_without_ray(capsys):
    from nd_utils.__main__ import main

    assert main(["run", "offline", "--address", "auto"]) == 1
    assert "--address and --num-cpus go with --executor ray" in capsys.readouterr().err
