"""The paper profile through all nine stages, every download replaced by a stand-in of its class.

`configs/paper.yaml` as a researcher with internet and a GPU runs it, with the names a real
config gives (`resnet50:IMAGENET1K_V1`, `blip`, `openai` + `gpt-3.5-turbo`, `diffusers` with 50
DPM-Solver++ steps, `imagenet_labels`, ImageNet val and Broden in their own layouts); only what
cannot be downloaded here is swapped for a local object the real loading code accepts (see
tests/paper_standins.py). Sizes are cut to fit a CPU: 80 ImageNet photos + 16 Broden ones,
layers conv1/layer4/fc, 2 DnD neurons, 2 CoSy images per label.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import nd_utils as nd
from nd_utils.config import REPO_ROOT
from nd_utils.pipeline import list_notebooks
from nd_utils.probes import load_probes

from paper_standins import (ConceptServer, paper_overrides, place_resnet50_checkpoint,
                             standin_env)

SHARED = Path(os.environ.get("ND_SHARED_DIR") or Path(nd.__file__).resolve().parents[2] / "shared")
CONCEPT_SETS = SHARED / "data" / "reference" / "concept_sets"
N_IMAGENET, N_BRODEN = 80, 16

pytestmark = pytest.mark.skipif(
    not (SHARED / "data" / "imagenet-sample-images").is_dir() or not CONCEPT_SETS.is_dir(),
    reason="needs the ImageNet sample photos and the papers' concept-set files "
           "(data/imagenet-sample-images, data/reference/concept_sets beside the repository)")


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nd_utils", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=1500)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, tiny_blip_dir, tiny_sd_dir):
    """One cold run of `python -m nd_utils run paper` on the stand-ins; its folder and server."""
    root = tmp_path_factory.mktemp("paper")
    place_resnet50_checkpoint(root / "torch")
    overrides = paper_overrides(root, SHARED, tiny_blip_dir, tiny_sd_dir, N_IMAGENET, N_BRODEN)
    with ConceptServer() as server:
        env = standin_env(root, CONCEPT_SETS, server)
        proc = _run(["run", "paper", *sum((["--set", o] for o in overrides), [])], env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = Path(proc.stdout.strip().splitlines()[-1])
        yield {"results": results, "run": results.parent, "server": server, "env": env,
               "overrides": overrides, "stderr": proc.stderr, "root": root}


def test_all_nine_stages_pass_under_the_real_names(paper_run):
    run = paper_run["run"]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "ok"
    assert [s["notebook"] for s in record["stages"]] == [p.name for p in list_notebooks()]
    assert len(record["stages"]) == 9 and all(s["status"] == "ok" for s in record["stages"])
    cfg = nd.load_config(run / "config.yaml")
    assert (cfg["profile"], cfg["target.name"], cfg["llm.name"], cfg["llm.model"]) == \
        ("paper", "resnet50:IMAGENET1K_V1", "openai", "gpt-3.5-turbo")
    assert (cfg["synthesis.steps"], cfg["synthesis.scheduler"]) == (50, "dpm-multistep")


def test_activations_cover_both_probe_layouts_and_every_neuron(paper_run):
    cfg = nd.load_config(paper_run["run"] / "config.yaml")
    widths = {"conv1": 64, "layer4": 2048, "fc": 1000}
    for layer, k in widths.items():
        acts = nd.load_activations(cfg, layer)
        assert tuple(acts.activations.shape) == (N_IMAGENET + N_BRODEN, k)
        table = pd.read_csv(paper_run["results"] / f"02_clip_dissect_{layer}.csv",
                            keep_default_na=False)
        assert len(table) == k and (table.description != "").all()
    # ImageNet photos carry their class names (from the wnid folders), Broden's none
    probes = load_probes(cfg["probe.sets"])
    labels = [item.label for item in probes.items]
    assert labels[0] == "tench" and set(labels[N_IMAGENET:]) == {None}


def test_dnd_goes_through_blip_the_openai_server_and_diffusion(paper_run):
    results, server = paper_run["results"], paper_run["server"]
    items = pd.read_csv(results / "03_top_images_layer4.csv", keep_default_na=False)
    # random tiny BLIP weights often end a caption at once: some, not all, say something
    assert set(items.unit) == {0, 1} and (items.caption != "").any()
    assert "crop" in set(items.kind)  # attention crops of layer4's maps
    # every answer came from the local OpenAI-compatible server, with the paper's settings
    assert server.requests
    assert {r["model"] for r in server.requests} == {"gpt-3.5-turbo"}
    assert {r["max_tokens"] for r in server.requests} == {24}
    assert {r["temperature"] for r in server.requests} == {0.3}
    concepts = pd.read_csv(results / "04_concepts_layer4.csv", keep_default_na=False)
    images = pd.read_csv(results / "05_concept_images.csv", keep_default_na=False)
    assert set(concepts.candidate) <= set(images.concept)
    assert (images.status == "ok").all()
    dnd = pd.read_csv(results / "06_dnd_layer4.csv", keep_default_na=False)
    assert list(dnd["Neuron ID"]) == [0, 1] and (dnd["Label 1"] != "").all()
    assert set(dnd["Label 1"]) <= set(concepts.candidate)


def test_evaluation_and_label_quality_tables(paper_run):
    results = paper_run["results"]
    evaluation = pd.read_csv(results / "07_evaluation.csv")
    assert {"cos_similarity", "cos_similarity_cubed", "rank_reorder", "wpmi",
            "soft_wpmi"} <= set(evaluation.similarity)  # beside the constant-label baseline
    assert set(evaluation.sentence_model) == {"all-mpnet-base-v2"}
    assert evaluation.top1.dropna().between(0, 100).all()  # the constant baseline has no top-1
    # a stand-in probe of a few classes: only the fc neurons of those classes are counted
    assert (evaluation.n_classes == 1000).all() and evaluation.n_images.nunique() == 1
    assert (0 < evaluation.n_neurons).all() and (evaluation.n_neurons <= evaluation.n_images).all()
    summary = pd.read_csv(results / "08_quality_summary.csv")
    assert {"clip_dissect", "dnd"} <= set(summary.source)


def test_replay_needs_no_key_and_makes_no_request(paper_run):
    """Rerunning stage 04 with llm.mode=replay and no OPENAI_API_KEY answers from the cache."""
    server = paper_run["server"]
    before = len(server.requests)
    env = {k: v for k, v in paper_run["env"].items() if k != "OPENAI_API_KEY"}
    proc = _run(["run", "paper", *sum((["--set", o] for o in paper_run["overrides"]), []),
                 "--set", "llm.mode=replay", "--stages", "04", "--force"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(server.requests) == before
    again = pd.read_csv(Path(proc.stdout.strip().splitlines()[-1]) / "04_concepts_layer4.csv",
                        keep_default_na=False)
    first = pd.read_csv(paper_run["results"] / "04_concepts_layer4.csv", keep_default_na=False)
    assert again.equals(first)
