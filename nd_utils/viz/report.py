"""A self-contained static HTML report of a run folder: a card per neuron, an evaluation page.

`write_report(run)` writes `<run>/report/index.html` (neuron cards, filtered, searched, sorted
and paginated by plain JavaScript over data embedded as JSON), `evaluation.html` (run stages,
evaluation tables, figures), `img/` (one ~128 px JPEG per distinct image, shared by every card
showing it) and `fig/` (the run's PNG figures). Nothing is fetched from a server or the network.

Example:
    $ python -m nd_utils report latest
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from ..errors import NdUtilsError
from .neuron_table import QUALITY_METRICS
from .run_folders import RunView, open_run_folder
from .trust_plots import row_trust
from ..store import atomic_write_text

PAGE_SIZE = 60
MARKER = "report.json"  # marks a folder as a report, so rewriting it may replace the folder


def _asset(name: str) -> str:
    return resources.files("nd_utils.viz").joinpath("report_assets", name).read_text("utf-8")


def _fill(template: str, **values: str) -> str:
    """Replace `{{name}}` in one pass, so inserted text is never scanned for placeholders."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def script_json(data) -> str:
    """JSON safe inside a `<script>` element: no `<`, `>`, `&` or line separators appear raw."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                     ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, esc)  # these characters occur only inside JSON strings
    return text


def _num(x, digits: int = 4):
    """A JSON-able rounded float, or None for missing / NaN values."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else round(x, digits)


class Thumbnails:
    """Distinct images of the report, each written once as `img/<content id>-<size>.jpg`."""

    def __init__(self, view: RunView, size: int = 128):
        self.view, self.size = view, size
        self.index: dict = {}  # key -> position in self.items
        self.items: list[tuple[str, "int | None", str]] = []  # (path, probe id, file name)

    def add(self, path: str = "", image_id=None, sha256: str = "") -> int:
        """Register an image (by content hash, else by path) and return its index."""
        path = str(path or "")
        if sha256:
            key = ident = sha256
        elif path:
            key = ("path", path)
            try:  # the path may be rewritten later with other content: fold size+mtime in
                st = os.stat(path)
                ident = f"{path}|{st.st_size}|{st.st_mtime_ns}"
            except OSError:
                ident = path
        else:
            key = ident = f"probe-id|{self.view.cfg.fingerprint()}|{image_id}"
        if key not in self.index:
            name = f"{hashlib.sha256(ident.encode()).hexdigest()[:20]}-{self.size}.jpg"
            self.index[key] = len(self.items)
            self.items.append((path, None if image_id is None else int(image_id), name))
        if sha256 and path:  # a later path-only reference to this image reuses its thumbnail
            self.index.setdefault(("path", path), self.index[key])
        return self.index[key]

    def _make(self, item, folder: Path, previous: "Path | None") -> bool:
        path, image_id, name = item
        if previous is not None and (previous / name).is_file():
            shutil.copyfile(previous / name, folder / name)  # same name = same content and size
            return True
        try:
            im = self.view.load_image(path, image_id)
        except Exception:  # a moved, deleted or corrupt image must not sink the whole report
            return False
        im.thumbnail((self.size, self.size))
        im.save(folder / name, "JPEG", quality=82, optimize=True)
        return True

    def write(self, folder: Path, previous: "Path | None" = None, progress: bool = True
              ) -> list["str | None"]:
        """Make every thumbnail (in threads: PIL decodes outside the GIL); None = failed."""
        from tqdm.auto import tqdm

        folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, tqdm(
                total=len(self.items), desc="thumbnails", unit="img", disable=not progress) as bar:
            done = []
            for ok in pool.map(lambda it: self._make(it, folder, previous), self.items):
                done.append(ok)
                bar.update()
        return [f"img/{it[2]}" if ok else None for it, ok in zip(self.items, done)]


def _by_unit(table, value):
    """{unit: [value(row), ...]} over `table`'s rows in order (empty when table is None)."""
    out: dict = {}
    if table is not None:
        for row in table.itertuples(index=False):
            out.setdefault(int(row.unit), []).append(value(row))
    return out


def build_data(view: RunView, thumbs: Thumbnails, top_k: int = 5, n_candidates: int = 3,
               candidate_images: int = 3) -> dict:
    """The report's embedded data: run meta, layers, missing notes and one record per neuron.

    Neuron record keys (short, because 5,000 of them are embedded): l layer index, u unit,
    c/s/cc CLIP-Dissect label, score, [[concept, score]], t [[image index, activation]],
    d DnD labels, ds DnD score, k [[candidate, score, [image index]]], x DnD's D_top items
    [[image index, activation, "kind · caption"]], qc / qd the CLIP-Dissect / DnD label's
    quality from stage 08 [CoSy AUC, MAD, simulation r, the label scored] (only when one of
    them is known; the label stage 08 judged: the run's own when held out, else chosen on its
    select split), tc CLIP-Dissect's held-out trust from stage 02 [r, p, q, CoSy AUC, trusted
    (1/0), the label scored when it is not c], td DnD Label 1's [r, p, CoSy AUC] (each only when
    a score is known; older runs have neither).
    """
    table = view.neuron_table()
    neurons = []
    for li, layer in enumerate(view.layers):
        tops = _by_unit(view.top_probe_images(layer, top_k), lambda r: [
            thumbs.add(r.path, r.image_id, r.sha256), _num(r.activation)])
        cand = view.dnd_candidates(layer)
        cands = {}
        if cand is not None and len(cand):
            cand = cand.sort_values(["unit", "rank"]).groupby("unit").head(n_candidates)
            cands = _by_unit(cand, lambda r: [str(r.candidate), _num(r.score), [
                thumbs.add(p.strip()) for p in str(r.images or "").split(";")
                if p.strip()][:candidate_images]])
        dtop = view.d_top(layer)
        dtops = _by_unit(None if dtop is None else dtop.groupby("unit").head(top_k), lambda r: [
            thumbs.add(r.path, r.image_id if r.kind == "original" else None), _num(r.activation),
            f"{r.kind} · {r.caption}" if r.caption else str(r.kind)])
        rows = {int(r.unit): r for r in table[table["layer"] == layer].itertuples(index=False)}
        for unit in sorted(set(rows) | set(tops) | set(dtops)):
            r = rows.get(unit)
            rec = {"l": li, "u": unit, "t": tops.get(unit, [])}
            if unit in dtops:
                rec["x"] = dtops[unit]
            if r is not None and isinstance(r.cd_label, str):
                rec.update(c=r.cd_label, s=_num(r.cd_score), cc=[
                    [str(c), _num(s)] for c, s in zip(r.cd_concepts, r.cd_scores)])
            if r is not None and isinstance(r.dnd_labels, list):
                rec.update(d=[str(x) for x in r.dnd_labels], ds=_num(r.dnd_score),
                           k=cands.get(unit, []))
            for key, prefix in (("qc", "cd"), ("qd", "dnd")):
                q = [_num(getattr(r, f"{prefix}_{m}")) for m in QUALITY_METRICS] if r else []
                if any(x is not None for x in q):  # only neurons stage 08 scored get a line
                    rec[key] = q + [str(getattr(r, f"{prefix}_quality_label", "") or "")]
            tc, td = row_trust(r) if r is not None else ({}, {})
            if tc:  # p and q keep 6 digits: permutation p-values go down to 1/(n_null + 1)
                rec["tc"] = [_num(tc["r"]), _num(tc["p"], 6), _num(tc["q"], 6),
                             _num(tc["auc"]), int(tc["trusted"]), tc["label"]]
            if td:
                rec["td"] = [_num(td["r"]), _num(td["p"], 6), _num(td["auc"])]
            neurons.append(rec)
    cfg = view.cfg
    meta = (f"{view.path} · status {view.status} · target {cfg.get('target.name')} · "
            f"vlm {cfg.get('vlm.name')} · probe {json.dumps(cfg.get('probe.sets'))} · "
            f"{len(neurons)} neurons")
    return {"run": view.name, "meta": meta, "layers": list(view.layers), "pageSize": PAGE_SIZE,
            "missing": view.missing(), "hasDnd": view.has_dnd(), "neurons": neurons,
            "hasTrust": any("tc" in n for n in neurons), "trust": trust_rows(view)}


def trust_rows(view: RunView) -> list[dict]:
    """`02_trust_summary.csv` for the neuron page: one {layer, n, trusted, fraction, alpha,
    r, auc, agree} per layer (numbers or None); [] when the run has no such table."""
    summary = view.trust_summary()
    columns = {"n": "n_neurons", "trusted": "n_trusted", "fraction": "fraction_trusted",
               "alpha": "alpha", "r": "median_heldout_r", "auc": "mean_cosy_auc",
               "agree": "label_agreement"}
    return [] if summary is None else [
        {"layer": str(row["layer"]), **{k: _num(row.get(c)) for k, c in columns.items()}}
        for _, row in summary.iterrows()]


def _table_html(df, title: str, level: int = 2, row_classes: "list[str] | None" = None) -> str:
    """`df` as an escaped HTML table under an `<h{level}>` title; "" when df is None.

    `row_classes` gives each body row a CSS class ("" = none), e.g. to mark failed checks.
    """
    import pandas as pd

    if df is None:
        return ""
    df = df.copy()
    for col in df.columns:  # tables read with keep_default_na=False hold numbers as text
        num = pd.to_numeric(df[col].replace("", float("nan")), errors="coerce")
        if num.notna().sum() and num.notna().sum() == (df[col].astype(str) != "").sum():
            df[col] = num
    table = df.to_html(index=False, escape=True, na_rep="", float_format="{:.4g}".format)
    if row_classes is not None:
        # Cells are escaped, so every literal "<tr>" after <tbody> opens one body row, in order.
        head, body = table.split("<tbody>", 1)
        classes = iter(row_classes)

        def opening(_match) -> str:
            c = next(classes, "")
            return f'<tr class="{html.escape(c)}">' if c else "<tr>"

        table = head + "<tbody>" + re.sub(r"<tr>", opening, body)
    return f"<h{level}>{html.escape(title)}</h{level}>\n" + table


def _passed(value) -> "bool | None":
    """A sanity check's `ok` cell as a bool; None when it is empty or unreadable."""
    text = str(value).strip().lower()
    return True if text in ("true", "1", "1.0", "yes") else (
        False if text in ("false", "0", "0.0", "no") else None)


def trust_html(view: RunView) -> str:
    """The "Label trust (02)" section of the evaluation page; "" for runs without the table."""
    summary = view.trust_summary()
    if summary is None:
        return ""
    return ('<section class="trust-section">\n<h2>Label trust (02)</h2>\n'
            "<p>Each CLIP-Dissect label, chosen on the probe's select half, is scored on the "
            "held-out half: simulation r, a permutation p-value against random concepts "
            "(n_null_concepts), Benjamini-Hochberg q within the layer, CoSy AUC. A label is "
            "trusted when q &lt; alpha; label_agreement is the fraction of select-half labels "
            "equal to the run's own.</p>\n"
            + _table_html(summary, "Trusted labels per layer (02_trust_summary.csv)", level=3)
            + "\n</section>")


def quality_html(view: RunView) -> str:
    """The "Label quality (08)" section of the evaluation page; "" when stage 08 left nothing."""
    comparison, sanity = view.method_comparison(), view.sanity_checks()
    summary = view.quality_summary()
    if comparison is None and sanity is None and summary is None:
        return ""
    parts = ['<section class="quality-section">\n<h2>Label quality (08)</h2>',
             "<p>Each method's labels, chosen on images outside the quality probe's "
             "held-out test split (this run's own labels when none of their images is a test "
             "image, else chosen again on its select split), scored on that test split "
             "(08_label_quality.csv has every label).</p>"]
    if comparison is not None:
        parts.append(_table_html(comparison, "CLIP-Dissect vs DnD on the same neurons "
                                 "(diff = clip_dissect - dnd, 95% bootstrap CI) · "
                                 "08_method_comparison.csv", level=3))
    if sanity is not None:
        passed = [_passed(x) for x in sanity["ok"]]
        failed = passed.count(False)
        parts.append(_table_html(sanity, "Sanity checks: true class > method > shuffled > "
                                 "constant (08_sanity_checks.csv)", level=3,
                                 row_classes=["fail" if p is False else "" for p in passed]))
        parts.append(f'<p class="{"fail-note" if failed else "pass-note"}">{failed} of '
                     f"{len(passed)} expected orderings failed</p>")
    if summary is not None:
        parts.append(_table_html(summary, "Mean quality per layer and label source, 95% CI "
                                 "(08_quality_summary.csv)", level=3))
    return "\n".join(parts) + "\n</section>"


def probe_banners(view: RunView) -> list[str]:
    """The lines shown above the evaluation tables: 07's and 08's probe when it is not the
    configured one (or, for 07, when some classes have no image), as the stages printed them."""
    from ..stages.evaluation import evaluation_banner
    from ..stages.label_quality import quality_note
    from ..probes import probe_set_names

    def names(key):
        return probe_set_names(view.cfg.get(key))

    out = []
    banner = evaluation_banner(view.evaluation(), names("evaluation.probe_sets"))
    if banner:
        out.append(banner)
    summary = view.quality_summary()
    if (summary is not None and len(summary)
            and {"probe", "n_images", "n_test_images"} <= set(summary.columns)):
        first, wanted = summary.iloc[0], names("quality.probe_sets")
        if str(first["probe"]) != wanted:
            out.append(quality_note(str(first["probe"]), wanted, int(first["n_test_images"]),
                                    int(first["n_images"])))
    return out


def evaluation_html(view: RunView, figures: list[str], css: str) -> str:
    """The evaluation page: stages, missing notes, evaluation tables, figures (server-escaped)."""
    import pandas as pd

    e = html.escape
    parts = []
    notes = view.missing()
    if notes:
        parts.append('<ul class="notices">' + "".join(f"<li>{e(m)}</li>" for m in notes)
                     + "</ul>")
    stages = pd.DataFrame([{k: s.get(k, "") for k in ("notebook", "status", "seconds", "error")}
                           for s in view.stages])
    parts.append(_table_html(stages if len(stages) else None, "Stages"))
    banners = probe_banners(view)
    if banners:
        parts.append('<ul class="notices banner">' + "".join(f"<li>{e(b)}</li>" for b in banners)
                     + "</ul>")
    parts.append(trust_html(view))
    parts.append(_table_html(view.evaluation(), "Final-layer evaluation (07_evaluation.csv)"))
    parts.append(_table_html(view.published(), "Published numbers (07_published.csv)"))
    parts.append(quality_html(view))
    if figures:
        parts.append("<h2>Figures</h2>\n<div class=\"figures\">" + "".join(
            f'<figure><a href="{e(f)}"><img src="{e(f)}" alt="{e(f)}" loading="lazy"></a>'
            f"<figcaption>{e(f.split('/')[-1])}</figcaption></figure>" for f in figures)
            + "</div>")
    parts.append("<h2>Effective config</h2>\n<pre>" + e(view.cfg.to_yaml()) + "</pre>")
    meta = f"{view.path} · status {view.status}"
    return _fill(_asset("evaluation.html"), title=e(view.name), css=css, meta=e(meta),
                 body="\n".join(p for p in parts if p))


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished staging folder in for `out` (two renames; the old report goes last)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_report(run: "str | Path | RunView" = "latest", out_dir: "str | Path | None" = None, *,
                 top_k: int = 5, thumb: int = 128, progress: bool = True) -> Path:
    """Write the static report of a run folder and return the path of its `index.html`.

    `out_dir` defaults to `<run>/report`; an existing report there is replaced atomically
    (thumbnails it already holds are reused). Open the file in any browser, offline.
    """
    t0 = time.time()
    view = open_run_folder(run)
    out = Path(out_dir).expanduser().resolve() if out_dir else view.path / "report"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise NdUtilsError(f"{out} exists and is not an nd_utils report, so it would be replaced: "
                           f"pass --out with a new or empty folder")
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        thumbs = Thumbnails(view, thumb)
        data = build_data(view, thumbs, top_k)
        previous = out / "img" if (out / "img").is_dir() else None
        data["images"] = thumbs.write(staging / "img", previous, progress)
        if failed := data["images"].count(None):
            data["missing"].append(f"{failed} of {len(thumbs.items)} images could not be read "
                                   f"(moved or deleted since the run?); their cards omit them")
        figures = []
        for fig in view.figures():
            (staging / "fig").mkdir(exist_ok=True)
            shutil.copyfile(fig, staging / "fig" / fig.name)
            figures.append(f"fig/{fig.name}")
        css, js = _asset("report.css"), _asset("report.js")
        # Only this exact script may run: an injected inline script or handler would be blocked.
        digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode()
        page = _fill(_asset("index.html"), title=html.escape(view.name), css=css,
                     data=script_json(data), js=js)
        page = page.replace("script-src 'unsafe-inline'", f"script-src 'sha256-{digest}'")
        atomic_write_text(staging / "index.html", page)
        atomic_write_text(staging / "evaluation.html", evaluation_html(view, figures, css))
        atomic_write_text(staging / MARKER, json.dumps({
            "run": str(view.path), "written": time.time(), "neurons": len(data["neurons"]),
            "images": len(thumbs.items), "failed_images": failed,
            "seconds": round(time.time() - t0, 2)}, indent=2))
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "index.html"
