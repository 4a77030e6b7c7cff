"""The run-folder reader and the static HTML report, on synthetic run folders and in Chromium."""
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import nd_utils as nd
from nd_utils.__main__ import main
from nd_utils.stages.activations import STAGE, activation_key, load_probe_from_config
from nd_utils.viz.report import script_json, write_report
from nd_utils.viz.run_folders import open_run_folder
from nd_utils.store import ArtifactStore, save_tensors

XSS = '</script><script>window.ndPwned=1</script><img src=x onerror="window.ndPwned=2">'
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _png(path: Path, rgb, size=(48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(int(c) for c in rgb)).save(path)
    return path


def _csv(path: Path, rows) -> None:
    pd.DataFrame(rows).to_csv(path, index=False)


def make_run(root: Path, n_units: int = 6, labels=None, dnd=True, cache=True, n_images=8,
             evaluation=True, name="20260101-000000-offline-abc123") -> Path:
    """A run folder as `python -m nd_utils run` leaves it, with synthetic tables for layer head."""
    probe_dir = root / "probe"
    rng = np.random.default_rng(0)
    for i in range(n_images):
        _png(probe_dir / f"img{i:02d}.png", rng.integers(0, 255, 3))
    cfg = nd.load_config("offline", {"data_dir": str(root / "data"), "target.layers": ["head"],
                                     "probe.sets": [{"name": "folder", "path": str(probe_dir)}]})
    run = root / "data" / "runs" / name
    (run / "results").mkdir(parents=True)
    (run / "notebooks").mkdir()
    cfg.save(run / "config.yaml")
    stages = ["01_activation_caching", "02_clip_dissect"] + (["06_dnd"] if dnd else [])
    (run / "run.json").write_text(json.dumps({
        "config": str(run / "config.yaml"), "source": cfg.source, "force": False,
        "stages": [{"notebook": f"{s}.ipynb", "executed": str(run / "notebooks" / f"{s}.ipynb"),
                    "status": "ok", "seconds": 1.5} for s in stages],
        "status": "ok", "started": time.time() - 60, "finished": time.time()}))
    labels = labels or [f"concept{u % 10}" for u in range(n_units)]
    rows = []
    for u in range(n_units):
        row = {"layer": "head", "unit": u, "description": labels[u], "similarity": 1 - u / n_units}
        for j in range(1, 6):
            row.update({f"concept_{j}": labels[u] if j == 1 else f"alt{u}_{j}",
                        f"score_{j}": row["similarity"] - j / 10})
        rows.append(row)
    _csv(run / "results" / "02_clip_dissect_head.csv", rows)
    if dnd:
        concept_imgs = [_png(root / "gen" / f"c{i}.png", (40 * i, 200, 90)) for i in range(4)]
        _csv(run / "results" / "06_dnd_head.csv", [
            {"Neuron ID": u, "Label 1": f"dnd {labels[u]}", "Label 2": f"second{u}",
             "Label 3": f"third{u}"} for u in range(n_units)])
        _csv(run / "results" / "06_dnd_candidates_head.csv", [
            {"layer": "head", "unit": u, "rank": r, "candidate": f"dnd {labels[u]}" if r == 1
             else f"cand{u}_{r}", "score": 0.9 - r / 10 - u / (10 * n_units), "mean": 0.5,
             "topk_sq_mean": 0.4, "image_products": 0.3, "topk_compare": 0.2,
             "images": ";".join(str(p) for p in concept_imgs[r - 1:r + 1])}
            for u in range(n_units) for r in (1, 2, 3)])
    if dnd:  # D_top as notebook 03 writes it: originals and crops, in_top marks the chosen
        crop = _png(root / "artifacts" / "crop.png", (250, 10, 10))
        _csv(run / "results" / "03_top_images_head.csv", [
            {"layer": "head", "unit": u, "kind": kind, "image_id": i, "box": box,
             "activation": act, "in_top": in_top, "rank": rank, "file": "",
             "probe_path": str(probe_dir / f"img{i:02d}.png"), "caption": caption,
             "path": str(crop if kind == "crop" else probe_dir / f"img{i:02d}.png")}
            for u in range(n_units) for kind, i, box, act, in_top, rank, caption in [
                ("original", 1, "", 2.0, True, 2, f"a photo of {labels[u]}"),
                ("crop", 1, "0,0,20,20", 3.0, True, 1, "a red square"),
                ("original", 2, "", 0.5, False, 0, "")]])
    if evaluation:
        _csv(run / "results" / "07_evaluation.csv", [
            {"concept_set": "imagenet_classes", "similarity": "soft_wpmi", "top1": 12.5,
             "top5": 30.0}, {"concept_set": "<b>bold</b>", "similarity": "wpmi", "top1": 1.0,
                             "top5": 2.0}])
    _png(run / "results" / "02_clip_dissect_head.png", (10, 20, 30), (200, 100))
    if cache:
        probe = load_probe_from_config(cfg)
        acts = torch.rand(len(probe), n_units)
        top_values, top_ids = torch.topk(acts.T, min(5, len(probe)), dim=1)
        key = activation_key(cfg, "head", probe)
        with ArtifactStore(cfg.data_dir).writer(STAGE.name, key, version=STAGE.version) as tmp:
            save_tensors({"activations": acts, "top_ids": top_ids, "top_values": top_values},
                         tmp / "activations.safetensors")
            pd.DataFrame([{"id": i, "path": it.path, "label": it.label or "", "class_index": "",
                           "source": it.source, "sha256": it.sha256}
                          for i, it in enumerate(probe.items)]).to_csv(tmp / "images.csv",
                                                                        index=False)
    return run


def add_label_quality(run: Path, n_units: int = 6, layer: str = "head") -> None:
    """Stage 08's tables as notebook 08 writes them; unit 4 has no rows, unit 5's DnD metrics
    are empty cells, and one sanity ordering fails."""
    res, rows = run / "results", []
    for u in range(n_units):
        if u == 4:
            continue
        for source, base in (("clip_dissect", 0.9), ("dnd", 0.8), ("shuffled clip_dissect", 0.5),
                             ("constant 'depiction'", 0.4)):
            empty = u == 5 and source == "dnd"
            rows.append({"layer": layer, "unit": u, "source": source, "label": f"l{u}",
                         "auc": "" if empty else base - u / 100,
                         "mad": "" if empty else 2 * base + u / 10, "auprc": 0.5,
                         "p_value": 0.01, "sim_r": "" if empty else base / 2 + u / 1000,
                         "n_concept_images": 10, "n_test": 40})
    _csv(res / "08_label_quality.csv", rows)
    _csv(res / "08_quality_summary.csv", [
        {"layer": lay, "source": src, "metric": m, "mean": 0.7, "ci_low": 0.6, "ci_high": 0.8,
         "n": 5} for lay in (layer, "all") for src in ("clip_dissect", "dnd")
        for m in ("auc", "mad", "auprc", "sim_r")])
    _csv(res / "08_method_comparison.csv", [
        {"layer": layer, "metric": m, "clip_dissect": 0.876, "dnd": 0.765, "diff": 0.111,
         "diff_low": 0.05, "diff_high": 0.17, "p_wilcoxon": 0.0312, "p_permutation": 0.04,
         "n": 5} for m in ("auc", "mad", "auprc", "sim_r")])
    _csv(res / "08_sanity_checks.csv", [
        {"layer": layer, "metric": "auc", "method": "clip_dissect", "higher": "clip_dissect",
         "lower": "shuffled clip_dissect", "higher_value": 0.86, "lower_value": 0.5, "ok": True},
        {"layer": layer, "metric": "auc", "method": "dnd", "higher": "dnd",
         "lower": "<b>shuffled dnd</b>", "higher_value": 0.42, "lower_value": 0.5, "ok": False},
        {"layer": layer, "metric": "sim_r", "method": "dnd", "higher": "dnd",
         "lower": "constant 'depiction'", "higher_value": 0.4, "lower_value": 0.2, "ok": True}])
    _png(res / "08_label_quality.png", (90, 90, 200), (200, 100))


def _data(index_html: Path) -> dict:
    m = re.search(r'<script type="application/json" id="nd-data">(.*?)</script>',
                  index_html.read_text(), re.S)
    return json.loads(m.group(1))


# --------------------------------------------------------------------------- the run reader


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(nd.NdUtilsError, match="does not exist.*python -m nd_utils run"):
        open_run_folder(tmp_path / "nope")


def test_folder_without_run_json_is_refused(tmp_path):
    run = make_run(tmp_path, cache=False)
    (run / "run.json").unlink()
    with pytest.raises(nd.NdUtilsError, match="no run.json.*python -m nd_utils run"):
        open_run_folder(run)


def test_old_run_json_is_refused(tmp_path):
    run = make_run(tmp_path, cache=False)
    (run / "run.json").write_text(json.dumps({"stages": [], "status": "ok"}))
    with pytest.raises(nd.NdUtilsError, match="lacks config, source, force, started.*older"):
        open_run_folder(run)


def test_latest_is_the_newest_run(tmp_path, monkeypatch):
    make_run(tmp_path, cache=False)
    newer = tmp_path / "data" / "runs" / "20260202-000000-offline-abc123"
    shutil.copytree(tmp_path / "data" / "runs" / "20260101-000000-offline-abc123", newer)
    (tmp_path / "data" / "runs" / "20270101-000000-offline-nb").mkdir()  # no run.json: skipped
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "data"))
    assert open_run_folder("latest").path == newer.resolve()
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(nd.NdUtilsError, match="no run folders"):
        open_run_folder("latest")


def test_reader_tables_and_neuron_table(tmp_path):
    view = open_run_folder(make_run(tmp_path) / "results")  # the path the runner prints
    assert view.layers == ["head"] and view.status == "ok"
    assert list(view.clip_dissect("head").unit) == list(range(6))
    assert view.dnd_candidates("head").shape[0] == 18 and len(view.top_images("head")) == 18
    d_top = view.d_top("head")
    assert list(d_top[d_top.unit == 1].kind) == ["crop", "original"]
    assert d_top.caption.iloc[1] == "a photo of concept0"
    table = view.neuron_table()
    assert len(table) == 6
    row = table.iloc[1]
    assert row.cd_label == "concept1" and row.dnd_labels == ["dnd concept1", "second1", "third1"]
    assert row.dnd_score == pytest.approx(0.8 - 1 / 60) and len(row.cd_concepts) == 5
    top = view.top_probe_images("head")  # from the activation cache
    assert len(top) == 30 and all(Path(p).exists() for p in top.path)
    assert view.missing() == []
    assert view.clip_dissect("fc") is None
    _csv(view.results / "06_dnd_head.csv", [{"Neuron ID": 0, "label": "x"}])  # another schema
    with pytest.raises(nd.NdUtilsError, match="06_dnd_head.csv lacks the column.*Label 1.*03-06"):
        open_run_folder(view.path).dnd("head")


def test_clip_only_run_says_dnd_missing(tmp_path):
    view = open_run_folder(make_run(tmp_path, dnd=False, evaluation=False))
    assert "no DnD results: run notebooks 03-06" in view.missing()
    assert "no final-layer evaluation: run notebook 07" in view.missing()
    assert view.neuron_table().dnd_label.isna().all()
    index = write_report(view, progress=False)
    data = _data(index)
    assert not data["hasDnd"] and "no DnD results: run notebooks 03-06" in data["missing"]
    assert all("d" not in n and n["c"] for n in data["neurons"])
    assert "no DnD results: run notebooks 03-06" in (index.parent / "evaluation.html").read_text()


def test_report_without_activation_cache_degrades(tmp_path):
    view = open_run_folder(make_run(tmp_path, cache=False, dnd=False))
    assert any("no top probe images for layer head" in m and "notebook 01" in m
               for m in view.missing())
    data = _data(write_report(view, progress=False))
    assert len(data["neurons"]) == 6 and all(n["t"] == [] for n in data["neurons"])
    # with notebook 03's table, its original images stand in for the cache (best first)
    view = open_run_folder(make_run(tmp_path / "with03", cache=False))
    assert view.top_probe_images("head").groupby("unit").image_id.apply(list)[0] == [1, 2]
    assert not any("no top probe images" in m for m in view.missing())


# --------------------------------------------------------------------------- the report


def test_report_layout_and_thumbnails(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert index == run.resolve() / "report" / "index.html"
    out = index.parent
    data = _data(index)
    assert len(data["neurons"]) == 6 and data["hasDnd"]
    thumbs = sorted((out / "img").iterdir())
    # one file per distinct image: probe images (top-5 from the cache, D_top originals 1 and
    # 2, named by path, share their thumbnails), 4 concept images, 1 crop
    probe_ids = set(open_run_folder(run).top_probe_images("head").image_id) | {1}
    assert len(thumbs) == len(data["images"]) == len(probe_ids) + 4 + 1
    assert None not in data["images"]
    assert all(max(Image.open(p).size) <= 128 for p in thumbs)
    n = data["neurons"][2]
    assert n["d"][0] == "dnd concept2" and len(n["k"]) == 3 and len(n["t"]) == 5
    assert [x[2] for x in n["x"]] == ["crop · a red square", "original · a photo of concept2"]
    assert (out / "fig" / "02_clip_dissect_head.png").exists()
    ev = (out / "evaluation.html").read_text()
    assert "&lt;b&gt;bold&lt;/b&gt;" in ev and "<b>bold" not in ev and "soft_wpmi" in ev
    assert not any(p.name.startswith(".report") for p in run.iterdir())  # no staging left
    # rewriting replaces the report; a folder that is not a report is never replaced
    assert write_report(run, progress=False) == index
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["report", str(run), "--out", str(tmp_path / "mine")]) == 1
    assert "not an nd_utils report" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_unreadable_images_are_left_out(tmp_path):
    run = make_run(tmp_path)
    (tmp_path / "gen" / "c0.png").unlink()  # a DnD concept image deleted after the run
    (tmp_path / "gen" / "c1.png").write_bytes(b"not a png")
    index = write_report(run, progress=False)
    data = _data(index)
    assert data["images"].count(None) == 2
    assert any("2 of" in m and "could not be read" in m for m in data["missing"])
    assert json.loads((index.parent / "report.json").read_text())["failed_images"] == 2


def test_html_labels_are_escaped(tmp_path):
    labels = [XSS, "a & b", "x\u2028y", "plain", "<!-- c", "null"]
    index = write_report(make_run(tmp_path, labels=labels), progress=False)
    text = index.read_text()
    assert "window.ndPwned" in text  # present, but only as escaped JSON text
    assert "<script>window.ndPwned" not in text and "<img src=x" not in text
    assert text.count("</script>") == 2  # the data block and the code block, nothing else
    data = _data(index)
    assert [n["c"] for n in data["neurons"]] == labels
    assert data["neurons"][0]["d"][0] == "dnd " + XSS
    assert "<" not in script_json({"a": "</script>"})


def test_5000_neurons_stay_fast_and_small(tmp_path):
    run = make_run(tmp_path, n_units=5000)
    t0 = time.perf_counter()
    index = write_report(run, progress=False)
    seconds = time.perf_counter() - t0
    size = index.stat().st_size
    data = _data(index)
    assert len(data["neurons"]) == 5000
    assert len(list((index.parent / "img").iterdir())) <= 13  # thumbnails reused across cards
    assert size < 5_000_000, f"index.html is {size / 1e6:.1f} MB"
    assert seconds < 30, f"report of 5,000 neurons took {seconds:.1f} s"


def test_label_quality_tables_and_neuron_columns(tmp_path):
    run = make_run(tmp_path, cache=False)
    add_label_quality(run)
    view = open_run_folder(run)
    assert len(view.label_quality()) == 20 and len(view.quality_summary()) == 16
    assert list(view.method_comparison().metric) == ["auc", "mad", "auprc", "sim_r"]
    assert list(view.sanity_checks().ok.astype(str)) == ["True", "False", "True"]
    table = view.neuron_table().set_index("unit")
    assert list(table.columns) == ["layer", "cd_label", "cd_score", "cd_concepts", "cd_scores",
                                   "dnd_label", "dnd_labels", "dnd_score", "cd_auc", "cd_mad",
                                   "cd_sim_r", "dnd_auc", "dnd_mad", "dnd_sim_r",
                                   "cd_quality_label", "dnd_quality_label", "cd_heldout_r",
                                   "cd_heldout_p", "cd_heldout_q", "cd_cosy_auc", "cd_trusted",
                                   "cd_trust_label", "dnd_heldout_r", "dnd_heldout_p",
                                   "dnd_cosy_auc"]
    assert table.loc[2, ["cd_auc", "cd_mad", "cd_sim_r"]].tolist() == pytest.approx(
        [0.88, 2.0, 0.452])
    assert table.loc[2, ["dnd_auc", "dnd_mad", "dnd_sim_r"]].tolist() == pytest.approx(
        [0.78, 1.8, 0.402])
    assert table.loc[4, ["cd_auc", "dnd_auc", "dnd_sim_r"]].isna().all()  # no rows for unit 4
    assert table.loc[5, ["dnd_auc", "dnd_mad", "dnd_sim_r"]].isna().all()  # empty cells
    assert table.loc[5, "cd_auc"] == pytest.approx(0.85)
    assert not any("label quality" in m for m in view.missing())
    (run / "results" / "08_sanity_checks.csv").unlink()  # a partial stage 08 is named
    assert ("label quality incomplete (no 08_sanity_checks.csv): rerun notebook 08"
            in open_run_folder(run).missing())
    _csv(run / "results" / "08_method_comparison.csv", [{"layer": "head", "metric": "auc"}])
    with pytest.raises(nd.NdUtilsError, match="08_method_comparison.csv lacks the column.*"
                                              "clip_dissect, dnd.*notebook.*08"):
        open_run_folder(run).method_comparison()


def test_report_label_quality_section_and_card_line(tmp_path):
    run = make_run(tmp_path)
    add_label_quality(run)
    index = write_report(run, progress=False)
    neurons = {n["u"]: n for n in _data(index)["neurons"]}
    assert neurons[2]["qc"][:3] == pytest.approx([0.88, 2.0, 0.452])
    assert neurons[2]["qd"][:3] == pytest.approx([0.78, 1.8, 0.402])
    assert neurons[2]["qc"][3] == "l2"   # the label stage 08 scored
    assert "qc" not in neurons[4] and "qd" not in neurons[4]  # no 08 rows: no line
    assert "qd" not in neurons[5]  # its DnD metrics are all empty cells
    assert neurons[5]["qc"][:3] == pytest.approx([0.85, 2.3, 0.455])
    ev = (index.parent / "evaluation.html").read_text()
    section = ev[ev.index("<h2>Label quality (08)</h2>"):ev.index("</section>")]
    # the comparison first, then the sanity checks, then the summary
    assert (section.index("08_method_comparison.csv") < section.index("08_sanity_checks.csv")
            < section.index("08_quality_summary.csv"))
    assert "0.876" in section and "0.765" in section and "0.0312" in section
    rows = re.findall(r"<tr[^>]*>.*?</tr>", section[section.index("08_sanity_checks.csv"):
                                                    section.index("08_quality_summary.csv")],
                      re.S)
    failed = [r for r in rows if r.startswith('<tr class="fail">')]
    assert len(rows) == 4 and len(failed) == 1  # header + 3 checks, one of them failed
    assert "&lt;b&gt;shuffled dnd&lt;/b&gt;" in failed[0] and "<b>shuffled" not in ev
    assert "1 of 3 expected orderings failed" in section and 'class="fail-note"' in section
    assert "tr.fail td" in ev  # the page's own CSS marks them
    assert (index.parent / "fig" / "08_label_quality.png").exists()
    assert 'src="fig/08_label_quality.png"' in ev
    assert "qc" in (index.parent / "index.html").read_text()  # card code reads the data


def test_evaluation_page_banners_a_fallback_probe(tmp_path):
    run = make_run(tmp_path)
    ev_page = lambda: (write_report(run, progress=False).parent / "evaluation.html").read_text()
    assert 'class="notices banner"' not in ev_page()     # no probe columns (an older run)
    rows = pd.read_csv(run / "results" / "07_evaluation.csv")
    rows = rows.assign(probe="offline-sample", n_images=78, n_neurons=43, n_classes=1000)
    rows.to_csv(run / "results" / "07_evaluation.csv", index=False)
    add_label_quality(run)
    summary = pd.read_csv(run / "results" / "08_quality_summary.csv")
    summary.insert(0, "probe", "offline-sample")
    summary.insert(1, "n_images", 78)
    summary.insert(2, "n_test_images", 24)
    summary.to_csv(run / "results" / "08_quality_summary.csv", index=False)
    page = ev_page()
    banner = page[page.index('class="notices banner"'):page.index("07_evaluation.csv)")]
    assert "Evaluated on offline-sample (78 images), not imagenet-sample-1k" in banner
    assert "43 of 1,000" in banner and "not comparable with the published" in banner
    assert "Judged on 24 held-out test images of offline-sample (78 images)" in banner
    rows.assign(probe="imagenet-sample-1k", n_images=1000, n_neurons=1000).to_csv(
        run / "results" / "07_evaluation.csv", index=False)
    summary.assign(probe="imagenet-sample-1k").to_csv(run / "results" / "08_quality_summary.csv",
                                                      index=False)
    assert 'class="notices banner"' not in ev_page()     # the configured probe, every class


def test_absent_label_quality_changes_nothing(tmp_path):
    run = make_run(tmp_path)
    view = open_run_folder(run)
    assert view.label_quality() is None and view.quality_summary() is None
    assert view.method_comparison() is None and view.sanity_checks() is None
    assert view.missing() == []
    table = view.neuron_table()
    assert table[["cd_auc", "cd_mad", "cd_sim_r", "dnd_auc", "dnd_mad", "dnd_sim_r"]
                 ].isna().all().all()
    index = write_report(view, progress=False)
    assert not any(k in n for n in _data(index)["neurons"] for k in ("qc", "qd"))
    ev = (index.parent / "evaluation.html").read_text()
    assert "Label quality" not in ev and 'class="fail' not in ev
    assert "Final-layer evaluation" in ev
    # a run whose label-quality notebook finished without its tables says so
    record = json.loads((run / "run.json").read_text())
    record["stages"].append({"notebook": "08_label_quality.ipynb", "status": "ok"})
    (run / "run.json").write_text(json.dumps(record))
    assert any(m.startswith("label quality incomplete (no 08_label_quality.csv")
               for m in open_run_folder(run).missing())


# --------------------------------------------------------------------------- in a real browser


def _browser(tmp_path):
    """A headless Chromium through selenium; skip (fail under CI) when either is missing."""
    reason = None
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        reason = (f"{CHROMIUM} / {CHROMEDRIVER} absent: apt-get install chromium "
                  f"chromium-driver")
    else:
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            reason = "selenium is not installed: pip install selenium"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run under CI: {reason}")
        pytest.skip(reason)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path / 'chrome-profile'}",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def test_missing_chromium_skips_but_fails_under_ci(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        _browser(tmp_path)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="cannot run under CI"):
        _browser(tmp_path)


def test_report_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    labels = [f"concept{u % 10}" for u in range(130)]
    for u in (3, 50, 120):
        labels[u] = f"zebra stripes {u}"
    labels[7] = XSS
    run = make_run(tmp_path, n_units=130, labels=labels)
    add_label_quality(run, n_units=130)
    index = write_report(run, progress=False)
    driver = _browser(tmp_path)
    try:
        driver.get(index.as_uri())
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        cards = lambda: driver.find_elements(By.CSS_SELECTOR, "#cards .card")  # noqa: E731
        assert len(cards()) == 60  # first page of 130
        assert "of 130 neurons" in driver.find_element(By.ID, "count").text
        search = driver.find_element(By.ID, "search")
        search.send_keys("zebra")
        wait.until(lambda d: len(cards()) == 3)
        assert [c.get_attribute("data-unit") for c in cards()] == ["3", "50", "120"]
        assert all("zebra stripes" in c.text for c in cards())
        # stage 08's line: both labels' CoSy AUC, MAD and simulation r (unit 3)
        line = cards()[0].find_element(By.CSS_SELECTOR, ".quality").text
        assert line == ("held-out label quality CLIP-Dissect \u201cl3\u201d: AUC 0.870 · MAD 2.100 · "
                        "sim r 0.453 | DnD \u201cl3\u201d: AUC 0.770 · MAD 1.900 · sim r 0.403"), line
        assert driver.find_element(By.ID, "count").text == "showing 1–3 of 3 neurons"
        search.clear()
        search.send_keys("concept4")  # unit 4 has no 08 rows: its card has no line
        wait.until(lambda d: cards() and cards()[0].get_attribute("data-unit") == "4")
        assert not cards()[0].find_elements(By.CSS_SELECTOR, ".quality")
        search.clear()
        search.send_keys("zebra")
        wait.until(lambda d: len(cards()) == 3)
        # the script-laden label is shown as text and never ran
        search.clear()
        search.send_keys("ndpwned")
        wait.until(lambda d: len(cards()) == 1)
        card = cards()[0]
        assert card.get_attribute("data-unit") == "7"
        assert XSS in card.get_attribute("textContent")
        assert driver.execute_script("return typeof window.ndPwned") == "undefined"
        assert not driver.find_elements(By.CSS_SELECTOR, "#cards img[src=x]")
        loaded = driver.execute_script(
            "return Array.from(document.querySelectorAll('#cards img'))"
            ".filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded >= 5  # thumbnails load from the sibling img/ folder over file://
        search.clear()
        search.send_keys("concept")
        wait.until(lambda d: len(cards()) == 60)
        shots = [tmp_path / "report.png"]
        if os.environ.get("ND_SCREENSHOT_DIR"):
            shots.append(Path(os.environ["ND_SCREENSHOT_DIR"]) / "report.png")
        for shot in shots:
            shot.parent.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
