"""The neuron explorer, driven from Python on synthetic run folders (no browser needed)."""
import html
import json

import pandas as pd
import pytest
import torch

import nd_utils as nd
from nd_utils.stages.top_images import choose_neurons
from nd_utils.stages.activations import load_probe_from_config
from nd_utils.viz.explorer import MAP_NOTE, NeuronExplorer, list_runs
from nd_utils.store import ArtifactStore, save_tensors
from nd_utils.stages.top_images import STAGE, top_images_key
from test_report import _csv, add_label_quality, make_run  # the report tests' run folders

HEAD = ["zebra", "striped horse", "dog", "cat", "red car", "tree", "lamp", "boat"]


def add_fc_labels(run, labels=("zebra stripes", "grass", "fast red car")) -> None:
    """A second, CLIP-Dissect-only layer `fc` (no activation cache, no DnD)."""
    _csv(run / "results" / "02_clip_dissect_fc.csv", [
        {"layer": "fc", "unit": u, "description": x, "similarity": 0.5,
         **{f"concept_{j}": x if j == 1 else f"fc{u}_{j}" for j in range(1, 6)},
         **{f"score_{j}": 0.5 - j / 10 for j in range(1, 6)}} for u, x in enumerate(labels)])


def add_maps(run) -> list[int]:
    """Notebook 03's artifact with spatial maps for the config's dnd.neurons of layer head."""
    cfg = nd.load_config(run / "config.yaml")
    probe = load_probe_from_config(cfg)
    acts = nd.load_activations(cfg, "head", probe=probe)
    neurons = choose_neurons(cfg, "head", acts.n_neurons)
    rows, maps = [], []
    for u in neurons:
        for i in acts.top_ids[u].tolist():
            rows.append({"layer": "head", "unit": u, "kind": "original", "image_id": i,
                         "box": "", "activation": 1.0, "map_index": len(maps), "in_top": True,
                         "rank": len(rows) + 1, "file": ""})
            maps.append(torch.rand(4, 4))
    key = top_images_key(cfg, "head", neurons, probe)
    with ArtifactStore(cfg.data_dir).writer(STAGE.name, key, version=STAGE.version) as tmp:
        pd.DataFrame(rows).to_csv(tmp / "items.csv", index=False)
        save_tensors({"maps": torch.stack(maps)}, tmp / "maps.safetensors")
    return neurons


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "data"))  # the run list sees only these
    path = make_run(tmp_path, n_units=8, labels=HEAD)
    add_fc_labels(path)
    neurons = add_maps(path)
    for name, col in (("06_dnd_head.csv", "Neuron ID"), ("06_dnd_candidates_head.csv", "unit")):
        t = pd.read_csv(path / "results" / name)  # DnD labels only the dnd.neurons, as in a run
        t[t[col].isin(neurons)].to_csv(path / "results" / name, index=False)
    return path


def test_neuron_shows_both_methods_and_spatial_maps(run):
    ex = NeuronExplorer(run)
    assert ex.message == "" and ex.layer.value == "head" and ex.unit.value == 0
    v = ex.view
    assert v.cd_label == "zebra" and v.dnd_labels == ["dnd zebra", "second0", "third0"]
    assert v.labels[:2] == ["zebra", "dnd zebra"] and len(v.concepts) == 5
    assert [c[0] for c in v.candidates] == ["dnd zebra", "cand0_2", "cand0_3"]
    assert all(len(c[2]) == 2 for c in v.candidates) and v.dnd_score == pytest.approx(0.8)
    assert v.n_images == 5 and v.n_maps == 5 and v.map_overlay and v.histogram
    assert v.n_units == 8 and not any("spatial map" in n for n in v.notes)
    assert ex.png.startswith(b"\x89PNG") and ex.image.value == ex.png
    assert "dnd zebra" in ex.header.value
    # a neuron outside dnd.neurons (5): its images alone, and the note saying why
    ex.unit.value = 6
    v = ex.view
    assert v.unit == 6 and v.n_images == 5 and v.n_maps == 0 and not v.map_overlay
    assert MAP_NOTE in v.notes and "head:6 has no DnD label (not in dnd.neurons)" in v.notes
    assert v.cd_label == "lamp" and v.dnd_labels == [] and v.candidates == []
    assert 0 < ex.last_redraw_seconds < 2, ex.last_redraw_seconds


def test_unit_box_layer_switch_and_redraw_time(run, monkeypatch):
    ex = NeuronExplorer(run)
    ex.unit_box.value = 3
    assert ex.unit.value == 3 and ex.view.unit == 3 and ex.view.cd_label == "cat"
    # per-layer data is read once: a new neuron of the same layer only draws (the speed itself
    # is measured by hand, not asserted: timings on a loaded 2-core machine vary by 5x)
    reads = []
    real = type(ex.run).activations
    monkeypatch.setattr(type(ex.run), "activations",
                        lambda self, layer: reads.append(layer) or real(self, layer))
    times = []
    for u in (4, 5, 2):
        ex.unit.value = u
        times.append(ex.last_redraw_seconds)
    assert reads == [] and all(t > 0 for t in times), (reads, times)
    ex.layer.value = "fc"  # no activation cache, CLIP-Dissect only; 3 units
    v = ex.view
    assert (v.layer, v.unit, v.n_units, ex.unit.max) == ("fc", 2, 3, 2)
    assert v.cd_label == "fast red car" and not v.histogram and v.n_images == 0
    assert any(n.startswith("no activation cache for layer fc") for n in v.notes)
    assert any(n.startswith("no top images cached for fc:2") for n in v.notes)
    assert "no DnD results for layer fc: run notebooks 03-06 on it" in v.notes


def test_search_across_layers_jumps_and_similar_labels(run):
    ex = NeuronExplorer(run)
    ex.search.value = "ZEBRA"
    found = [o[1] for o in ex.matches.options]
    assert found == [None, ("head", 0), ("fc", 0)] and "2 matches" in ex.matches.options[0][0]
    assert ex.view.unit == 0  # listing matches alone does not jump
    ex.matches.value = ("fc", 0)
    assert (ex.view.layer, ex.view.unit, ex.view.cd_label) == ("fc", 0, "zebra stripes")
    ex.search.value = "second4"  # a DnD label of another layer
    ex.matches.value = ex.matches.options[1][1]
    assert (ex.view.layer, ex.view.unit) == ("head", 4)
    # similar labels: word overlap of both methods' labels, across layers
    ex.jump("head", 4)  # "red car" / "dnd red car"
    assert ex.view.similar[0][:2] == ("fc", 2) and ex.view.similar[0][2] > 0.3
    ex.similar.value = ("fc", 2)
    assert (ex.view.layer, ex.view.unit) == ("fc", 2)
    ex.search.value = ""
    assert ex.matches.options == (("type to search labels", None),)


def test_clip_only_run_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "data"))
    ex = NeuronExplorer(make_run(tmp_path, dnd=False, evaluation=False))
    v = ex.view
    assert v.cd_label == "concept0" and v.dnd_labels == [] and v.candidates == []
    assert v.n_images == 5 and not v.map_overlay and v.histogram
    assert "no DnD results in this run: run notebooks 03-06" in v.notes
    assert any(n.startswith("spatial map not cached (no 03_top_images artifact of layer head")
               for n in v.notes)
    ex.unit.value = 5  # beyond dnd.neurons
    assert MAP_NOTE in ex.view.notes


def test_run_list_newest_first_and_switching(run, tmp_path):
    newer = make_run(tmp_path, n_units=3, dnd=False, cache=False,
                     name="20260202-000000-offline-abc123")
    assert list_runs() == [newer.resolve(), run.resolve()]
    ex = NeuronExplorer()  # the newest run
    assert ex.run.path == newer.resolve() and ex.view.labels == ["concept0"]
    assert [v for _, v in ex.run_select.options] == [str(newer.resolve()), str(run.resolve())]
    ex.run_select.value = str(run.resolve())
    assert ex.run.path == run.resolve() and ex.view.dnd_labels[0] == "dnd zebra"


def test_missing_runs_and_old_folders_give_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "empty"))
    ex = NeuronExplorer()
    assert ex.run is None and "no run folders" in ex.message and ex.view.notes == [ex.message]
    assert ex.layer.disabled and ex.png == b"" and "python -m nd_utils run" in ex.header.value
    assert ex.snapshot() == ex.message
    ex.search.value = "x"  # controls stay harmless
    run = make_run(tmp_path, cache=False)
    (run / "run.json").write_text(json.dumps({"stages": [], "status": "ok"}))
    ex = NeuronExplorer(run)
    assert ex.run is None and "older nd_utils" in ex.message
    # a table of another version: its layer is left out, the rest still shows
    run = make_run(tmp_path / "v2", cache=False)
    add_fc_labels(run)
    _csv(run / "results" / "06_dnd_head.csv", [{"Neuron ID": 0, "label": "x"}])
    ex = NeuronExplorer(run)
    assert ex.message == "" and ex.run.layers == ["fc"] and ex.view.cd_label == "zebra stripes"
    assert any(n.startswith("layer 'head' left out") and "06_dnd_head.csv" in n
               for n in ex.view.notes)


def test_label_quality_line(run):
    ex = NeuronExplorer(run)  # no stage 08: no line, nothing else changes
    assert ex.view.quality == [] and ex.view.quality_line == ""
    assert "label quality" not in ex.header.value
    add_label_quality(run, n_units=8)
    ex = NeuronExplorer(run)
    ex.jump("head", 2)
    v = ex.view
    assert [q[0] for q in v.quality] == ["CLIP-Dissect", "DnD"]
    assert v.quality[0][1:4] == pytest.approx((0.88, 2.0, 0.452)) and v.quality[0][4] == "l2"
    assert v.quality[1][1:4] == pytest.approx((0.78, 1.8, 0.402))
    assert v.quality_line == ("CLIP-Dissect “l2”: AUC 0.880 · MAD 2.000 · sim r 0.452 | "
                              "DnD “l2”: AUC 0.780 · MAD 1.800 · sim r 0.402")
    assert "held-out label quality · " + html.escape(v.quality_line) in ex.header.value
    ex.unit.value = 4  # no 08 rows
    assert ex.view.quality == [] and "label quality" not in ex.header.value
    ex.unit.value = 5  # DnD's metrics are empty cells: CLIP-Dissect only
    assert [q[0] for q in ex.view.quality] == ["CLIP-Dissect"]
    assert ex.view.quality_line == "CLIP-Dissect “l5”: AUC 0.850 · MAD 2.300 · sim r 0.455"
    ex.layer.value = "fc"  # a layer stage 08 did not score
    assert ex.view.quality == [] and ex.view.cd_label == "fast red car"
