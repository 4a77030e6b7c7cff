"""Labels' held-out trust scores (issue 23) in the run reader, the report and the explorer.

Synthetic run folders of the report's tests, with stage 02's trust columns, 06's scores of
Label 1 and 02_trust_summary.csv added; runs without them must read, render and browse as before.
"""
import doctest
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from nd_utils.viz import trust_plots
from nd_utils.viz.explorer import NeuronExplorer
from nd_utils.viz.report import write_report
from nd_utils.viz.neuron_table import TRUST_COLUMNS
from nd_utils.viz.run_folders import open_run_folder
from nd_utils.viz.trust_plots import rank_by_trust, trust_text
from test_explorer import add_fc_labels
from test_report import _csv, _data, _png, make_run

NAN = float("nan")
# unit -> (heldout_r, heldout_p, heldout_q, cosy_auc, trusted, trust_label or None = description)
# Trusted, best first: 2 (lowest q), then 0 and 4 (equal q; higher r first). Unit 3 was not
# tested (empty cells), unit 1's select-half label disagrees with the run's.
CD = {0: (0.31, 0.004, 0.012, 0.71, True, None), 1: (0.12, 0.2, 0.3, 0.55, False, "other1"),
      2: (0.45, 0.001, 0.006, 0.80, True, None), 3: ("", "", "", "", False, None),
      4: (0.25, 0.004, 0.012, 0.66, True, None), 5: (0.05, 0.6, 0.6, 0.5, False, None)}
DND = {0: (0.28, 0.01, 0.69), 1: (0.2, 0.05, 0.6), 2: (0.4, 0.002, 0.77), 3: ("", "", ""),
       4: (0.1, 0.3, 0.52), 5: (0.0, 0.9, 0.49)}
SUMMARY = {"layer": "head", "n_neurons": 6, "n_trusted": 3, "fraction_trusted": 0.5,
           "alpha": 0.05, "median_heldout_r": 0.25, "mean_cosy_auc": 0.642,
           "n_heldout_images": 40, "n_null_concepts": 1000, "label_agreement": 0.8333}


def add_trust(run: Path, layer: str = "head") -> None:
    """Stage 02's trust columns, 06's Label 1 scores, the summary table and figure."""
    res = run / "results"
    cd = pd.read_csv(res / f"02_clip_dissect_{layer}.csv")
    rows = [CD[int(u)] for u in cd.unit]
    for i, name in enumerate(("heldout_r", "heldout_p", "heldout_q", "cosy_auc", "trusted")):
        cd[name] = [r[i] for r in rows]
    cd.insert(4, "trust_label", [r[5] or d for r, d in zip(rows, cd.description)])
    cd["trust_label_agrees"] = cd["trust_label"] == cd["description"]
    cd.to_csv(res / f"02_clip_dissect_{layer}.csv", index=False)
    if (res / f"06_dnd_{layer}.csv").exists():
        dnd = pd.read_csv(res / f"06_dnd_{layer}.csv")
        for i, name in enumerate(("heldout_r", "heldout_p", "cosy_auc")):
            dnd[name] = [DND[int(u)][i] for u in dnd["Neuron ID"]]
        dnd.to_csv(res / f"06_dnd_{layer}.csv", index=False)
    _csv(res / "02_trust_summary.csv", [{**SUMMARY, "layer": layer}])
    _png(res / "02_trust.png", (30, 160, 90), (200, 100))


@pytest.fixture
def trusted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "data"))  # explorers list only these runs
    run = make_run(tmp_path)
    add_trust(run)
    return run


def _nan_or(x):
    return NAN if x == "" else x


# --------------------------------------------------------------------------- the run reader


def test_neuron_table_carries_the_trust_scores(trusted_run):
    view = open_run_folder(trusted_run)
    table = view.neuron_table().set_index("unit")
    assert list(table.columns[-len(TRUST_COLUMNS):]) == list(TRUST_COLUMNS)
    for u, (r, p, q, auc, trusted, label) in CD.items():
        got = table.loc[u, ["cd_heldout_r", "cd_heldout_p", "cd_heldout_q", "cd_cosy_auc"]]
        assert got.tolist() == pytest.approx([_nan_or(x) for x in (r, p, q, auc)], nan_ok=True)
        assert bool(table.loc[u, "cd_trusted"]) is trusted
        assert table.loc[u, "cd_trust_label"] == (label or table.loc[u, "cd_label"])
        dnd = table.loc[u, ["dnd_heldout_r", "dnd_heldout_p", "dnd_cosy_auc"]].tolist()
        assert dnd == pytest.approx([_nan_or(x) for x in DND[u]], nan_ok=True)
    assert table["cd_trusted"].dtype == bool and table["cd_trusted"].sum() == 3
    assert table.loc[1, "cd_label"] == "concept1"  # the run's label is unchanged
    summary = view.trust_summary()
    assert summary.iloc[0]["layer"] == "head" and int(summary.iloc[0]["n_trusted"]) == 3
    assert float(summary.iloc[0]["label_agreement"]) == pytest.approx(0.8333)


def test_rank_by_trust_orders_and_filters(trusted_run):
    table = open_run_folder(trusted_run).neuron_table()
    assert list(rank_by_trust(table).unit) == [2, 0, 4]        # q, then r (0 and 4 tie on q)
    assert list(rank_by_trust(table, "head", min_r=0.3).unit) == [2, 0]
    assert list(rank_by_trust(table, "fc").unit) == []          # no such layer: nothing
    # every neuron, most trusted first; the untested one (3, no q) last
    assert list(rank_by_trust(table, trusted_only=False).unit) == [2, 0, 4, 1, 5, 3]


def test_trust_text_formats_and_doc_example():
    assert trust_text(0.3141, 0.004, 0.712, q=0.012, trusted=True) == (
        "r = 0.31, p = 0.004, AUC 0.71 · ✓ trusted (q = 0.012)")
    assert trust_text(0.12, 0.2, None, q=0.3, trusted=False, label="other") == (
        "“other”: r = 0.12, p = 0.2, AUC n/a · not trusted (q = 0.3)")
    assert trust_text(0.2, 0.05, 0.6) == "r = 0.20, p = 0.05, AUC 0.60"  # DnD: no verdict
    assert trust_text(NAN, "", None, q=NAN, trusted=False) == ""
    result = doctest.testmod(trust_plots)
    assert result.attempted >= 2 and result.failed == 0


def test_runs_without_trust_scores_still_work(tmp_path, monkeypatch):
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "data"))
    run = make_run(tmp_path)  # an older run: none of the new columns or tables
    view = open_run_folder(run)
    assert view.trust_summary() is None and view.missing() == []
    table = view.neuron_table()
    assert table[[c for c in TRUST_COLUMNS if c not in ("cd_trusted", "cd_trust_label")]
                 ].isna().all().all()
    assert not table.cd_trusted.any() and (table.cd_trust_label == "").all()
    assert rank_by_trust(table).empty
    index = write_report(view, progress=False)
    data = _data(index)
    assert not data["hasTrust"] and data["trust"] == []
    assert not any(k in n for n in data["neurons"] for k in ("tc", "td"))
    assert "Label trust" not in (index.parent / "evaluation.html").read_text()
    ex = NeuronExplorer(run)
    assert ex.view.cd_trust == {} and ex.view.cd_trust_text == "" and ex.view.dnd_trust == {}
    assert "held-out r" not in ex.header.value and "held-out " not in ex.header.value
    assert ex.trusted.options[0][0].startswith("no trust scores for head")
    assert len(ex.trusted.options) == 1 and ex.next_trusted.disabled
    assert ex.step_trusted() is None and ex.view.unit == 0
    assert ex.trusted_neurons("head").empty


# --------------------------------------------------------------------------- the report


def test_report_shows_scores_and_the_summary(trusted_run):
    index = write_report(trusted_run, progress=False)
    data = _data(index)
    assert data["hasTrust"]
    neurons = {n["u"]: n for n in data["neurons"]}
    assert neurons[0]["tc"] == pytest.approx([0.31, 0.004, 0.012, 0.71, 1, ""])
    assert neurons[1]["tc"][4] == 0 and neurons[1]["tc"][5] == "other1"  # disagreeing label
    assert neurons[2]["td"] == pytest.approx([0.4, 0.002, 0.77])
    assert "tc" not in neurons[3] and "td" not in neurons[3]  # untested: no line
    assert data["trust"] == [{"layer": "head", "n": 6, "trusted": 3, "fraction": 0.5,
                              "alpha": 0.05, "r": 0.25, "auc": 0.642, "agree": 0.8333}]
    page = index.read_text()
    assert 'id="trusted"' in page and 'value="trust"' in page and 'value="r-desc"' in page
    ev = (index.parent / "evaluation.html").read_text()
    section = ev[ev.index("<h2>Label trust (02)</h2>"):]
    section = section[:section.index("</section>")]
    assert "02_trust_summary.csv" in section and "0.8333" in section and "1000" in section
    assert ev.index("Label trust (02)") < ev.index("07_evaluation.csv")
    assert (index.parent / "fig" / "02_trust.png").exists() and 'src="fig/02_trust.png"' in ev


# The report's own script run in node against a small stand-in DOM: sorting, filtering and
# the text of the cards are what a browser would show (the Chromium test needs a browser).
NODE_DOM = r"""
const fs = require("fs");
const html = fs.readFileSync(process.argv[1], "utf8");
const data = html.match(/<script type="application\/json" id="nd-data">([\s\S]*?)<\/script>/)[1];
const code = html.slice(html.lastIndexOf("<script>") + 8, html.lastIndexOf("</script>"));
class El {
  constructor(tag) {
    Object.assign(this, {tag, children: [], attrs: {}, on: {}, className: "", text: "",
                         hidden: false, value: "", checked: false, disabled: false});
    this.classList = {add: (c) => { this.className = (this.className + " " + c).trim(); }};
  }
  set textContent(t) { this.text = String(t); this.children = []; }
  get textContent() { return this.text + this.children.map((c) => c.textContent).join(""); }
  get childNodes() { return this.children; }
  appendChild(c) {
    if (c.frag) this.children.push(...c.children); else this.children.push(c);
    return c;
  }
  replaceChildren(...cs) { this.children = []; cs.forEach((c) => this.appendChild(c)); }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  getAttribute(k) { return this.attrs[k]; }
  addEventListener(e, f) { (this.on[e] = this.on[e] || []).push(f); }
  fire(e) { (this.on[e] || []).forEach((f) => f({target: this})); }
  remove() { this.removed = true; }
  find(cls) {  // descendants whose class list holds `cls`
    const out = [];
    for (const c of this.children) {
      if (c.className.split(" ").includes(cls)) out.push(c);
      out.push(...c.find(cls));
    }
    return out;
  }
}
const ids = {}, options = [new El("option"), new El("option")];
for (const m of html.matchAll(/<(\w+)([^>]*?) id="([^"]+)"([^>]*)>/g)) {  // the page's elements
  ids[m[3]] = Object.assign(new El(m[1]), {hidden: /\bhidden\b/.test(m[2] + m[4])});
}
global.document = {
  getElementById: (id) => id === "nd-data" ? {textContent: data} : ids[id],
  createElement: (t) => new El(t),
  createTextNode: (t) => { const e = new El("#text"); e.textContent = t; return e; },
  createDocumentFragment: () => Object.assign(new El("#frag"), {frag: true}),
  querySelectorAll: () => options,
  body: new El("body"),
};
global.window = {scrollTo() {}};
eval(code);
const units = () => ids.cards.children.map((c) => Number(c.getAttribute("data-unit")));
const out = {filterHidden: ids["trust-filter"].hidden, removed: options.every((o) => o.removed),
             all: units(), summary: ids["trust-summary"].textContent, cards: {}};
for (const c of ids.cards.children) {
  out.cards[c.getAttribute("data-unit")] = {cls: c.className,
                                            trust: c.find("trust").map((t) => t.textContent)};
}
ids.sort.value = "trust"; ids.sort.fire("change"); out.byTrust = units();
ids.sort.value = "r-desc"; ids.sort.fire("change"); out.byR = units();
ids.trusted.checked = true; ids.trusted.fire("change"); out.trustedOnly = units();
out.count = ids.count.textContent;
console.log(JSON.stringify(out));
"""


def _run_page(index: Path) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the report's script is tested in Chromium only")
    out = subprocess.run([node, "-e", NODE_DOM, str(index)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_report_page_sorts_and_filters_by_trust(trusted_run):
    page = _run_page(write_report(trusted_run, progress=False))
    assert not page["filterHidden"] and not page["removed"]
    assert page["all"] == [0, 1, 2, 3, 4, 5]
    assert page["byTrust"] == [2, 0, 4, 1, 5, 3]     # q ascending, then r; untested last
    assert page["byR"] == [2, 0, 4, 1, 5, 3]         # held-out r, high first; missing last
    assert page["trustedOnly"] == [2, 0, 4]          # the filter keeps the sort order
    assert page["count"] == "showing 1–3 of 3 neurons"
    cards = page["cards"]
    assert cards["0"]["trust"] == [
        "held-out r = 0.31, p = 0.004, AUC 0.71 · ✓ trusted (q = 0.012)",
        "held-out r = 0.28, p = 0.01, AUC 0.69"]     # CLIP-Dissect's, then DnD's Label 1
    assert "trusted" in cards["0"]["cls"].split() and "trusted" not in cards["1"]["cls"].split()
    assert cards["1"]["trust"][0] == ("“other1”: held-out r = 0.12, p = 0.2, AUC 0.55 · "
                                      "not trusted (q = 0.3)")
    assert cards["3"]["trust"] == []
    assert "Label trust per layer" in page["summary"] and "3 of 6" in page["summary"]
    assert "0.833" in page["summary"] and "0.250" in page["summary"]


def test_report_page_of_an_older_run_hides_the_trust_controls(tmp_path):
    page = _run_page(write_report(make_run(tmp_path), progress=False))
    assert page["filterHidden"] and page["removed"] and page["summary"] == ""
    assert all(c["trust"] == [] for c in page["cards"].values())


# --------------------------------------------------------------------------- the explorer


def test_explorer_shows_scores_and_steps_through_trusted_neurons(trusted_run):
    add_fc_labels(trusted_run)  # a layer without trust scores
    ex = NeuronExplorer(trusted_run)
    v = ex.view
    assert (v.layer, v.unit) == ("head", 0)
    assert v.cd_trust == {"r": 0.31, "p": 0.004, "q": 0.012, "auc": 0.71, "trusted": True,
                          "label": ""}
    assert v.cd_trust_text == "r = 0.31, p = 0.004, AUC 0.71 · ✓ trusted (q = 0.012)"
    assert v.dnd_trust_text == "r = 0.28, p = 0.01, AUC 0.69"
    head = ex.header.value
    # the score stands beside the label it judges: after CLIP-Dissect's, before DnD's
    assert head.index("concept0") < head.index("held-out r = 0.31") < head.index("DnD:")
    assert "held-out r = 0.28" in head[head.index("DnD:"):]
    assert list(ex.trusted_neurons("head").unit) == [2, 0, 4]
    assert list(ex.trusted_neurons("head", min_r=0.3).unit) == [2, 0]
    assert ex.trusted.options[0] == ("3 of 6 neurons of head trusted, best first", None)
    assert [o[1] for o in ex.trusted.options[1:]] == [("head", 2), ("head", 0), ("head", 4)]
    assert ex.trusted.options[1][0] == "head:2 · concept2 · r 0.45 · q 0.006"
    assert ex.view.unit == 0  # listing them does not jump
    ex.next_trusted.click()   # 0 is second in trust order: on to 4, then around to 2
    assert ex.view.unit == 4
    assert ex.step_trusted() == ("head", 2) and ex.view.unit == 2
    assert ex.step_trusted(-1) == ("head", 4)
    ex.unit.value = 1         # untrusted: stepping starts at the most trusted
    v = ex.view
    assert v.cd_trust["label"] == "other1" and not v.cd_trust["trusted"]
    assert v.cd_trust_text.startswith("“other1”: r = 0.12") and "not trusted" in v.cd_trust_text
    ex.prev_trusted.click()
    assert ex.view.unit == 4
    ex.unit.value = 3         # untested: no score shown
    assert ex.view.cd_trust == {} and "held-out" not in ex.header.value
    ex.trusted.value = ("head", 0)
    assert (ex.view.layer, ex.view.unit) == ("head", 0)
    ex.layer.value = "fc"     # a layer without scores: its list says so, stepping stays
    assert ex.trusted.options[0][0].startswith("no trust scores for fc")
    assert ex.next_trusted.disabled and ex.step_trusted() is None and ex.view.layer == "fc"
    assert ex.view.cd_label == "zebra stripes" and ex.view.cd_trust_text == ""


def test_report_trust_controls_in_chromium(trusted_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from test_report import _browser

    old = write_report(make_run(tmp_path / "old"), progress=False)
    index = write_report(trusted_run, progress=False)
    driver = _browser(tmp_path)
    try:
        wait = WebDriverWait(driver, 20)
        units = lambda: [c.get_attribute("data-unit")  # noqa: E731
                         for c in driver.find_elements(By.CSS_SELECTOR, "#cards .card")]
        driver.get(index.as_uri())
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        box = driver.find_element(By.ID, "trusted")
        assert box.is_displayed() and units() == ["0", "1", "2", "3", "4", "5"]
        card = driver.find_element(By.CSS_SELECTOR, '#cards .card[data-unit="0"]')
        assert [t.text for t in card.find_elements(By.CSS_SELECTOR, ".trust")] == [
            "held-out r = 0.31, p = 0.004, AUC 0.71 · ✓ trusted (q = 0.012)",
            "held-out r = 0.28, p = 0.01, AUC 0.69"]
        summary = driver.find_element(By.ID, "trust-summary").text
        assert "Label trust per layer" in summary and "3 of 6" in summary
        Select(driver.find_element(By.ID, "sort")).select_by_value("trust")
        wait.until(lambda d: units()[:3] == ["2", "0", "4"])
        box.click()
        wait.until(lambda d: units() == ["2", "0", "4"])
        assert driver.find_element(By.ID, "count").text == "showing 1–3 of 3 neurons"
        driver.get(old.as_uri())  # an older run: no filter, no trust sorts, no summary
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        assert not driver.find_element(By.ID, "trusted").is_displayed()
        values = [o.get_attribute("value") for o in
                  driver.find_elements(By.CSS_SELECTOR, "#sort option")]
        assert values == ["unit", "cd-desc", "cd-asc", "dnd-desc"]
        assert driver.find_element(By.ID, "trust-summary").text == ""
    finally:
        driver.quit()
