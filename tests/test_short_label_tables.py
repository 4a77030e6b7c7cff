"""Readers of CLIP-Dissect label tables with fewer concept columns than clip_dissect.top_n
(a small concept set) and with rank_reorder's floor score: run reader, report, figures,
explorer."""
import json
import math

import pandas as pd
import pytest

from nd_utils.viz import neuron_table
from nd_utils.viz.explorer import NeuronExplorer
from nd_utils.viz.figures import write_figures
from nd_utils.viz.report import write_report
from nd_utils.viz.run_folders import open_run_folder
from nd_utils.similarity_formulas import RANK_REORDER_FLOOR
from test_report import _data, make_run

FLOOR = RANK_REORDER_FLOOR


def shorten(run, n_concepts=2, floor_units=(1,)):
    """Rewrite layer head's label table with `n_concepts` concept columns (top_n is 5); the
    last concept of `floor_units` scores rank_reorder's floor (mean cosine <= 0)."""
    path = run / "results" / "02_clip_dissect_head.csv"
    t = pd.read_csv(path, keep_default_na=False)
    keep = ["layer", "unit", "description", "similarity"] + [
        c for j in range(1, n_concepts + 1) for c in (f"concept_{j}", f"score_{j}")]
    t = t[keep].copy()
    t.loc[t.unit.isin(floor_units), f"score_{n_concepts}"] = FLOOR
    t.to_csv(path, index=False)
    return t


def test_floor_constant_matches_similarity():
    assert neuron_table.RANK_REORDER_FLOOR == RANK_REORDER_FLOOR


def test_reader_and_report_tolerate_short_tables_and_the_floor(tmp_path):
    run = make_run(tmp_path)
    shorten(run)
    view = open_run_folder(run)
    assert view.cfg["clip_dissect.top_n"] == 5
    table = view.neuron_table().set_index("unit")
    assert table.loc[0, "cd_concepts"] == ["concept0", "alt0_2"]
    assert len(table.loc[0, "cd_scores"]) == 2
    assert table.loc[1, "cd_concepts"] == ["concept1"]            # the floored concept left out
    data = _data(write_report(view, progress=False))
    cc = {n["u"]: n["cc"] for n in data["neurons"]}
    assert [c for c, _ in cc[0]] == ["concept0", "alt0_2"] and [c for c, _ in cc[1]] == ["concept1"]
    assert all(s is not None and math.isfinite(s) for v in cc.values() for _, s in v)


def test_figures_and_explorer_tolerate_short_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "data"))
    run = make_run(tmp_path, n_units=8)
    shorten(run, n_concepts=3, floor_units=(0, 2))
    result = write_figures(run, tmp_path / "figs", log=lambda *a: None)
    assert {"neuron_cards_head", "label_similarity"} <= set(result.written), result.skipped
    meta = json.loads((tmp_path / "figs" / "label_similarity.json").read_text())
    assert meta["inputs"] == ["results/02_clip_dissect_head.csv",
                              "results/06_dnd_candidates_head.csv"]
    ex = NeuronExplorer(run)
    assert ex.view.unit == 0 and [c for c, _ in ex.view.concepts] == ["concept0", "alt0_2"]
    ex.unit.value = 1
    assert len(ex.view.concepts) == 3 and ex.png.startswith(b"\x89PNG")
    assert all(s > FLOOR for _, s in ex.view.concepts)


@pytest.mark.parametrize("n_concepts", [1, 4])
def test_any_number_of_columns_up_to_top_n(tmp_path, n_concepts):
    run = make_run(tmp_path)
    shorten(run, n_concepts=n_concepts, floor_units=())
    table = open_run_folder(run).neuron_table()
    assert all(len(c) == n_concepts for c in table.cd_concepts)
