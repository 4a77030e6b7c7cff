"""Final-layer evaluation protocol (07): ground-truth lines, cosine and top-k metrics.

The protocol is CLIP-Dissect's: ground truth of neuron k = line k of `imagenet_labels` (whole
line), mean cosine of (label, line) embeddings over neurons, top-k = own class among the k best.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch

import nd_utils
from nd_utils import concept_sets, imagenet_labels
from nd_utils.imagenet_labels import imagenet_label_lines, imagenet_labels_from_timm
from nd_utils.paper_concept_files import PAPER_SETS
from nd_utils.stages import evaluation, evaluation_metrics
from nd_utils.errors import NdUtilsError
from nd_utils.stages.evaluation import ground_truth, reading_notes
from nd_utils.stages.evaluation_metrics import _EmbeddingCache, mean_pair_cosine, topk_accuracy


def _shared() -> Path:
    base = os.environ.get("ND_SHARED_DIR")
    return Path(base) if base else Path(nd_utils.__file__).resolve().parents[2] / "shared"


REF_FILE = _shared() / "data" / "reference" / "concept_sets" / "imagenet_labels.txt"
needs_ref = pytest.mark.skipif(not REF_FILE.is_file(), reason=(
    f"the paper's imagenet_labels.txt is not at {REF_FILE} (../shared is absent in a user's "
    f"clone; set ND_SHARED_DIR to a folder holding data/reference/concept_sets)"))


pytestmark = pytest.mark.usefixtures("isolated_concepts")  # tests/conftest.py


def _short_names() -> list[str]:
    return list(concept_sets.load_concept_set("imagenet_classes").concepts)


# ------------------------------------------------------------------- ground truth

@needs_ref
def test_ground_truth_lines_equal_the_reference_file_lines():
    data = REF_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == PAPER_SETS["imagenet_labels"][0]
    ref = data.decode("utf-8").split("\n")  # the reference reads the file this way
    assert len(ref) == 1000 and ref[0] == "tench, Tinca tinca"
    pytest.importorskip("timm")
    lines, source = imagenet_label_lines(allow_download=False)  # offline: the timm rebuild
    assert lines == ref and "timm" in source
    gt, info = ground_truth(_short_names(), allow_download=False)
    assert gt == ref and info["ground_truth"] == "imagenet_labels"
    assert gt[134] == "crane, bird" and gt[517] == "crane, machine"


@needs_ref
def test_a_local_copy_of_the_paper_file_is_used_first(monkeypatch):
    monkeypatch.setenv("ND_CONCEPT_DIR", str(REF_FILE.parent))
    lines, source = imagenet_label_lines(allow_download=False)
    assert source == str(REF_FILE) and lines == REF_FILE.read_text("utf-8").split("\n")


def test_the_timm_rebuild_is_checked_against_the_pinned_file(monkeypatch):
    pytest.importorskip("timm")
    lines, _ = imagenet_labels_from_timm()
    assert len(lines) == 1000 and lines[0] == "tench, Tinca tinca"
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == PAPER_SETS["imagenet_labels"][0]
    monkeypatch.setitem(PAPER_SETS, "imagenet_labels", ("0" * 64, 1000))
    with pytest.raises(NdUtilsError, match="not to the paper's imagenet_labels file"):
        imagenet_labels_from_timm()


def test_without_any_copy_the_short_names_are_used_with_a_warning(monkeypatch):
    def no_timm():
        raise NdUtilsError("rebuilding imagenet_labels offline needs the 'timm' package")
    monkeypatch.setattr(imagenet_labels, "imagenet_labels_from_timm", no_timm)
    with pytest.raises(NdUtilsError, match="local copy: .* timm: .*needs the 'timm'"):
        imagenet_label_lines(allow_download=False)
    names = _short_names()
    with pytest.warns(UserWarning, match="FALLING BACK to torchvision's short class names"):
        gt, info = ground_truth(names, allow_download=False)
    assert gt == names and info["ground_truth"] == "imagenet_classes (fallback)"
    assert "not the paper's imagenet_labels" in reading_notes("conse", "all-mpnet-base-v2", info)


def test_other_classifiers_use_their_own_class_names():
    names = ["apple", "aquarium fish", "baby"]
    assert ground_truth(names) == (names, {"ground_truth": "target class names",
                                           "source": "target.class_names"})
    shuffled = _short_names()[::-1]  # 1,000 names, but not ImageNet's order: not ImageNet
    assert ground_truth(shuffled)[1]["ground_truth"] == "target class names"


# ------------------------------------------------------------------- metrics

def test_topk_accuracy_by_hand():
    nan = float("nan")
    sim = torch.tensor([
        [0.9, 0.5, 0.1, 0.0],   # neuron 0: own class first            -> top-1 hit
        [0.8, 0.7, 0.1, 0.0],   # neuron 1: own class second           -> top-2 hit
        [0.5, 0.5, 0.5, 0.9],   # neuron 2: tie with 0 and 1, index order puts 2 fourth
        [nan, 0.1, 0.2, 0.3],   # neuron 3: NaN ranks last, own class first -> top-1 hit
    ])
    assert topk_accuracy(sim, 1) == 50.0
    assert topk_accuracy(sim, 2) == 75.0
    assert topk_accuracy(sim, 3) == 75.0     # neuron 2 ranks its class 4th: 3, 0, 1, 2
    assert topk_accuracy(sim, 4) == 100.0
    assert topk_accuracy(sim, 10) == 100.0   # k above the number of concepts: all of them


def test_topk_accuracy_matches_the_reference_definition_on_random_scores():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(50, 50, generator=g)
    sim[torch.arange(50), torch.arange(50)] += 1.5
    for k in (1, 5):
        # the reference: for each neuron, torch.topk of its row, a hit if it holds the neuron's id
        hits = sum(int(i in torch.topk(sim[i], k).indices.tolist()) for i in range(50))
        assert topk_accuracy(sim, k) == pytest.approx(hits / 50 * 100)


def test_mean_pair_cosine_by_hand():
    vec = {"a": [1.0, 0.0], "b": [0.0, 3.0], "c": [1.0, 1.0], "d": [-2.0, 0.0]}
    enc = lambda texts: torch.tensor([vec[t] for t in texts])  # noqa: E731 (unnormalised)
    assert mean_pair_cosine(enc, ["a"], ["a"]) == pytest.approx(1.0)
    expected = (0 + 1 / math.sqrt(2)) / 2
    assert mean_pair_cosine(enc, ["a", "c"], ["b", "a"]) == pytest.approx(expected)
    assert mean_pair_cosine(enc, ["d", "c", "b"], ["a", "b", "c"]) == pytest.approx(
        (-1 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3)
    with pytest.raises(NdUtilsError, match="2 labels but 1"):
        mean_pair_cosine(enc, ["a", "b"], ["a"])


def test_each_string_is_embedded_once_across_rows():
    calls = []

    def enc(texts):
        calls.append(list(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])
    cache = _EmbeddingCache(enc)
    first = mean_pair_cosine(cache, ["dog", "cat"], ["dog, domestic dog", "tabby, tabby cat"])
    again = mean_pair_cosine(cache, ["cat", "dog"], ["tabby, tabby cat", "dog, domestic dog"])
    assert first == pytest.approx(again)
    assert sorted(sum(calls, [])) == sorted(["cat", "dog", "dog, domestic dog", "tabby, tabby cat"])
    direct = mean_pair_cosine(enc, ["dog"], ["dog, domestic dog"])
    assert mean_pair_cosine(cache, ["dog"], ["dog, domestic dog"]) == pytest.approx(direct)


def test_the_whole_line_is_the_ground_truth_string():
    # The embedded string is the line itself, not its first name: an encoder that tells them
    # apart gives a lower cosine to a label that equals only the first name.
    enc = lambda texts: torch.tensor([[1.0, float("," in t)] for t in texts])  # noqa: E731
    line = "tench, Tinca tinca"
    assert mean_pair_cosine(enc, ["tench"], [line]) == pytest.approx(1 / math.sqrt(2))
    assert mean_pair_cosine(enc, [line], [line]) == pytest.approx(1.0)


def test_reading_notes_name_the_circularity_of_conse():
    info = {"ground_truth": "imagenet_labels", "source": "x"}
    notes = reading_notes("conse", "all-mpnet-base-v2", info)
    assert "agreement between two ImageNet classifiers" in notes
    assert "words-10k, words-20k" in notes
    assert reading_notes("open_clip:ViT-B-16:openai", "all-mpnet-base-v2", info) == ""
    assert "fallback" in reading_notes("open_clip:ViT-B-16:openai", "all-MiniLM-L6-v2", info)
    assert "CLIP-Dissect" in evaluation.PROTOCOL and "whole line" in evaluation.PROTOCOL


@needs_ref
def test_imagenet_labels_as_concept_set_works_offline_and_equals_the_paper_set():
    pytest.importorskip("timm")
    gt, info = ground_truth(_short_names(), allow_download=False)
    cfg = nd_utils.load_config("offline", ["clip_dissect.clean=null"])
    offline = evaluation._concepts_for(cfg, "imagenet_labels", gt, info)
    paper = concept_sets.load_concept_set("imagenet_labels", local_dir=REF_FILE.parent)
    assert offline.concepts == paper.concepts and offline.sha256 == paper.sha256
    assert offline.concepts[0] == "tench, Tinca tinca" and len(offline) == 1000


# ------------------------------------------------------------------- the probe the numbers are on

def test_topk_accuracy_counts_only_the_covered_neurons():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.3, 0.2]])
    assert topk_accuracy(sim, 1, torch.tensor([0, 1])) == 50.0     # neuron 2 (a miss) not counted
    assert topk_accuracy(sim, 1, torch.tensor([1, 2])) == 0.0
    assert topk_accuracy(sim, 1, torch.arange(3)) == topk_accuracy(sim, 1)


def test_covered_neurons_are_the_classes_with_an_image():
    from types import SimpleNamespace as Item
    probe = Item(items=[Item(class_index=c) for c in (4, 1, None, 4, 1000, -1)])
    assert evaluation_metrics.covered_neurons(probe, 1000).tolist() == [1, 4]
    unlabelled = Item(items=[Item(class_index=None)] * 3)   # coverage unknown: every neuron
    assert evaluation_metrics.covered_neurons(unlabelled, 5).tolist() == [0, 1, 2, 3, 4]


def _table(probe, n_images, n_neurons, n_classes=1000):
    import pandas as pd
    return pd.DataFrame({"probe": [probe] * 2, "n_images": n_images, "n_neurons": n_neurons,
                         "n_classes": n_classes})


def test_the_banner_names_the_probe_its_size_and_the_fix():
    banner = evaluation.evaluation_banner(_table("offline-sample", 78, 43), "imagenet-sample-1k")
    assert "offline-sample (78 images), not imagenet-sample-1k" in banner
    assert "43 of 1,000" in banner and "not comparable with the published" in banner
    assert "allow its download" in banner and "CI" not in banner and "shared" not in banner
    part = evaluation.evaluation_banner(_table("imagenet-sample-1k", 900, 900), "imagenet-sample-1k")
    assert part.startswith("Evaluated on imagenet-sample-1k (900 images): ") and "900 of 1,000" in part
    assert evaluation.evaluation_banner(_table("imagenet-sample-1k", 1000, 1000),
                                        "imagenet-sample-1k") is None
    assert evaluation.evaluation_banner(_table("x", 1, 1).drop(columns="probe"), "x") is None


def test_an_unavailable_evaluation_probe_falls_back_and_says_so(monkeypatch):
    from nd_utils.errors import OfflineError

    cfg = nd_utils.load_config("offline")
    real = evaluation.load_probe_from_config

    def offline(c):
        if c["probe.sets"] == c["evaluation.probe_sets"]:
            raise OfflineError("the ImageNet sample is not available: no network")
        return real(c)

    monkeypatch.setattr(evaluation, "load_probe_from_config", offline)
    with pytest.warns(UserWarning, match="evaluation probe unavailable.*no network"):
        ecfg = evaluation.evaluation_config(cfg)
    assert evaluation.is_fallback(ecfg) and ecfg["probe.sets"] == cfg["probe.sets"]
    assert ecfg["target.layers"] == [cfg["evaluation.layer"]]
