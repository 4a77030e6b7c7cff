"""`python -m nd_utils figures`: PNG + PDF + JSON per figure from a run folder, skips explained."""
import json
from pathlib import Path

import nd_utils as nd
from nd_utils.__main__ import main
from nd_utils.stages.activations import activation_key, load_probe_from_config
from nd_utils.viz.figures import GENERATOR, write_figures
from test_explorer import add_fc_labels, add_maps
from test_report import _csv, make_run  # the synthetic run folder of the report's tests

ALL = ["neuron_cards_head", "similarity_functions_fc", "label_similarity", "evaluation_table"]


def _published(run: Path) -> None:
    _csv(run / "results" / "07_published.csv", [
        {"source": "CLIP-Dissect paper", "setup": "ResNet-50 fc, ImageNet val, class names, "
         "soft_wpmi", "metric": "top-1 %", "value": 95.5},
        {"source": "DnD paper", "setup": "ResNet-50 fc", "metric": "CLIP text cos",
         "value": 0.76}])


def test_every_figure_with_provenance(tmp_path):
    run = make_run(tmp_path)
    add_fc_labels(run)
    add_maps(run)
    _published(run)
    logged = []
    result = write_figures(run, tmp_path / "figs", log=logged.append)
    assert sorted(result.written) == sorted(ALL) and list(result.skipped) == ["neuron_cards_fc"]
    assert "no top images for layer fc" in result.skipped["neuron_cards_fc"]  # labels only
    for name in ALL:
        png, pdf, side = (tmp_path / "figs" / f"{name}.{ext}" for ext in ("png", "pdf", "json"))
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
        assert pdf.read_bytes().startswith(b"%PDF")
        meta = json.loads(side.read_text())
        assert meta["generator"] == GENERATOR and meta["figure"] == name
        assert meta["run"] == str(run.resolve())
        assert meta["config"] == str(run.resolve() / "config.yaml")
        assert meta["files"] == [f"{name}.png", f"{name}.pdf"] and meta["inputs"]
    assert f"wrote {ALL[0]}.png / .pdf / .json" in logged
    cards = json.loads((tmp_path / "figs" / "neuron_cards_head.json").read_text())
    cfg = nd.load_config(run / "config.yaml")
    key = activation_key(cfg, "head", load_probe_from_config(cfg))
    assert cards["artifacts"]["01_activation_caching"] == {"head": key}
    assert set(cards["artifacts"]["03_top_images"]) == {"head"}
    assert {"results/02_clip_dissect_head.csv", "results/06_dnd_head.csv",
            "results/03_top_images_head.csv"} <= set(cards["inputs"])
    assert [s["notebook"] for s in cards["stages"]] == ["01_activation_caching.ipynb",
                                                        "02_clip_dissect.ipynb", "06_dnd.ipynb"]
    sims = json.loads((tmp_path / "figs" / "similarity_functions_fc.json").read_text())
    assert sims["inputs"] == ["results/07_evaluation.csv", "results/07_published.csv"]
    assert sims["stages"] == [] and sims["artifacts"] == {}  # the fake run has no stage 07
    assert not list((tmp_path / "figs").glob(".*"))  # atomic writes leave no temporaries


def test_missing_inputs_are_skipped_and_stale_figures_removed(tmp_path):
    out = tmp_path / "figs"
    write_figures(make_run(tmp_path / "full"), out, log=lambda *a: None)
    (out / "mine.png").write_bytes(b"not ours")  # files of others are never touched
    (out / "mine.json").write_text(json.dumps({"figure": "evaluation_table"}))
    logged = []
    result = write_figures(make_run(tmp_path / "clip", dnd=False, evaluation=False, cache=False),
                           out, log=logged.append)
    assert sorted(result.written) == ["label_similarity"]
    assert "notebook 07" in result.skipped["evaluation_table"]
    assert "notebook 07" in result.skipped["similarity_functions_fc"]
    assert "notebook 01" in result.skipped["neuron_cards_head"]
    assert any(m.startswith("skipped evaluation_table: no results/07_evaluation.csv")
               for m in logged)
    assert sorted(result.removed) == ["evaluation_table", "neuron_cards_head",
                                      "similarity_functions_fc"]
    assert sorted(p.name for p in out.iterdir()) == [
        "label_similarity.json", "label_similarity.pdf", "label_similarity.png", "mine.json",
        "mine.png"]


def test_cli_prints_the_output_folder(tmp_path, capsys):
    run = make_run(tmp_path, evaluation=False)
    assert main(["figures", str(run), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str((tmp_path / "out").resolve())
    assert "skipped evaluation_table: no results/07_evaluation.csv: run notebook 07" in err
    assert (tmp_path / "out" / "neuron_cards_head.pdf").exists()
    assert main(["figures", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
