"""An interactive neuron explorer over a run folder: ipywidgets controls, matplotlib panels.

It reads only what a run left behind (result CSVs, the activation cache, DnD's top-image
artifact); no model runs. Per-layer data is read once, so moving to another neuron redraws in
well under a second. `explorer.view` describes everything shown, so tests drive it from Python.

Example:
    >>> ex = NeuronExplorer("latest")                                   # doctest: +SKIP
    >>> display(ex); ex.jump("head", 3); ex.view.labels                 # doctest: +SKIP
    >>> ex.search.value = "dog"; ex.matches.options[1:]                 # doctest: +SKIP
    >>> ex.trusted_neurons("head").head(); ex.step_trusted()           # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import html
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import NdUtilsError
from .explorer_figure import NeuronFigure
from .explorer_view import ExplorerView, _Layer
from .figures import cached_top_images, readable_layers
from .neuron_table import QUALITY_METRICS
from .run_folders import RERUN, RunView, open_run_folder, runs_dir
from .trust_plots import rank_by_trust, row_trust, trusted_choices

MAX_MATCHES = 200
MAP_NOTE = "spatial map not cached (neuron not in dnd.neurons)"
_WORD = re.compile(r"[a-z0-9]+")


def list_runs(base: "str | Path | None" = None) -> list[Path]:
    """Run folders (with a run.json) under `base` (default `runs_dir()`), newest first."""
    base = Path(base) if base else runs_dir()
    found = [p.resolve() for p in base.glob("*") if (p / "run.json").is_file()]
    return sorted(found, key=lambda p: (p.name[:15], (p / "run.json").stat().st_mtime),
                  reverse=True)


class NeuronExplorer(NeuronFigure):
    """Browse a run's neurons: run / layer / neuron pickers, label search, one figure each."""

    def __init__(self, run: "str | Path | RunView | None" = None, k: int = 5,
                 n_candidates: int = 3, candidate_images: int = 3, n_similar: int = 8,
                 dpi: int = 80):
        import ipywidgets as W

        self.k, self.n_candidates, self.candidate_images = k, n_candidates, candidate_images
        self.n_similar, self.dpi = n_similar, dpi
        self.run: "RunView | None" = None
        self.message, self.png, self.view, self.last_redraw_seconds = "", b"", ExplorerView(), 0.0
        self._layers, self._thumbs, self._busy = {}, {}, False
        self._entries, self._by_word, self._where, self._run_notes = [], {}, {}, []
        self.run_select = W.Dropdown(description="run", layout=W.Layout(width="480px"))
        self.layer = W.Dropdown(description="layer", layout=W.Layout(width="auto"))
        self.unit = W.IntSlider(description="neuron", min=0, max=0, continuous_update=False)
        self.unit_box = W.BoundedIntText(min=0, max=0, layout=W.Layout(width="90px"))
        W.link((self.unit, "value"), (self.unit_box, "value"))
        W.link((self.unit, "max"), (self.unit_box, "max"))
        self.search = W.Text(description="search", placeholder="label text, all layers")
        self.matches = W.Dropdown(options=[("type to search labels", None)],
                                  layout=W.Layout(width="420px"))
        self.similar = W.Dropdown(description="similar", options=[("", None)],
                                  layout=W.Layout(width="560px"))
        # the layer's trusted neurons, most trusted first: pick one, or step through them
        self.trusted = W.Dropdown(description="trusted", options=[("", None)],
                                  layout=W.Layout(width="420px"))
        self.prev_trusted = W.Button(description="‹ trusted", layout=W.Layout(width="90px"))
        self.next_trusted = W.Button(description="trusted ›", layout=W.Layout(width="90px"))
        self._trusted_layer = None  # (run, layer) the trusted list was made for
        self.header, self.notes_html, self.image = W.HTML(), W.HTML(), W.Image(format="png")
        self.widget = W.VBox([self.run_select, W.HBox([self.layer, self.unit, self.unit_box]),
                              W.HBox([self.search, self.matches]),
                              W.HBox([self.trusted, self.prev_trusted, self.next_trusted]),
                              self.header, self.image, self.similar, self.notes_html])
        self._controls = (self.layer, self.unit, self.unit_box, self.search, self.matches,
                          self.similar, self.trusted, self.prev_trusted, self.next_trusted)
        runs = list_runs()
        with self._hold():  # listing runs selects the first: that must not open it yet
            self.run_select.options = [(p.name, str(p)) for p in runs]
        # while _busy (see _hold), control changes made by the explorer itself do not redraw
        self.run_select.observe(lambda c: self._busy or self.open(c.new), "value")
        self.layer.observe(lambda c: self._busy or self.jump(c.new, self.unit.value), "value")
        self.unit.observe(lambda c: self._busy or self.redraw(), "value")
        self.search.observe(lambda c: self._find(c.new), "value")
        self.matches.observe(lambda c: c.new and self.jump(*c.new), "value")
        self.similar.observe(lambda c: c.new and self.jump(*c.new), "value")
        self.trusted.observe(lambda c: c.new and self.jump(*c.new), "value")
        self.prev_trusted.on_click(lambda _: self.step_trusted(-1))
        self.next_trusted.on_click(lambda _: self.step_trusted(1))
        if run is None and not runs:
            self._fail(f"no run folders with a run.json under {runs_dir()}: {RERUN}; or pass "
                       f"a run folder to NeuronExplorer")
        else:
            self.open(run if run is not None else str(runs[0]))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @contextlib.contextmanager
    def _hold(self):
        """Set several controls without each one triggering a redraw."""
        busy, self._busy = self._busy, True
        try:
            yield
        finally:
            self._busy = busy

    def _fail(self, message: str) -> None:
        self.message = message
        self.view = ExplorerView(run=str(self.run.path) if self.run else "", notes=[message])
        self.header.value = f"<b style='color:#b00'>{html.escape(message)}</b>"
        self.notes_html.value, self.image.value, self.png = "", b"", b""
        for w in self._controls:
            w.disabled = True

    def open(self, run) -> None:
        """Show another run folder (a path, 'latest' or a RunView); failures become a message."""
        try:
            view = open_run_folder(run)
            self._run_notes = readable_layers(view)  # a table of another version: skip its layer
            self.run, self._layers, self.message = view, {}, ""
            self._trusted_layer = None  # its tables may have changed since: list them again
            self._index()  # every layer's labels, once per run
        except NdUtilsError as exc:
            self.run = None
            return self._fail(f"cannot open run {run}: {exc}")
        with self._hold():
            if str(view.path) not in [v for _, v in self.run_select.options]:
                self.run_select.options = [(view.name, str(view.path)), *self.run_select.options]
            self.run_select.value = str(view.path)
            self.search.value = ""
            self.matches.options = [("type to search labels", None)]
            self.layer.options = list(view.layers)
        if not view.layers:
            return self._fail(f"run {view.name} names no layers (no target.layers in its config, "
                              f"no result tables): {RERUN}")
        for w in self._controls:
            w.disabled = False
        first = next((x for x in view.layers if view.dnd(x) is not None), view.layers[0])
        self.jump(first, min(self._layer(first).rows, default=0))

    def _index(self) -> None:
        """Labels and their words of every neuron of the run, for search and similarity."""
        self._entries, self._by_word = [], {}
        for r in self.run.neuron_table().itertuples(index=False):
            labels = [("CD", r.cd_label)] if isinstance(r.cd_label, str) and r.cd_label else []
            dnd = r.dnd_labels if isinstance(r.dnd_labels, list) else []
            labels += [("DnD", x) for x in dnd if x]
            # lower-case words of both methods' labels: what the Jaccard similarity compares
            words = frozenset(_WORD.findall(" ".join(t for _, t in labels).lower()))
            for w in words:
                self._by_word.setdefault(w, []).append(len(self._entries))
            self._entries.append((r.layer, int(r.unit), labels, words))
        self._where = {(e[0], e[1]): i for i, e in enumerate(self._entries)}

    def _layer(self, layer: str) -> _Layer:
        """Everything of one layer the panels need, read once per run."""
        if layer in self._layers:
            return self._layers[layer]
        run, notes, chosen = self.run, list(self._run_notes), None
        acts = run.activations(layer)
        group = lambda t: {int(u): g for u, g in t.groupby("unit")} if t is not None else {}  # noqa
        tops = group(run.top_probe_images(layer, self.k))
        cand = run.dnd_candidates(layer)
        if cand is not None:  # rank 0 = a candidate without usable images: list it last
            r = pd.to_numeric(cand["rank"], errors="coerce").fillna(0)
            cand = cand.assign(_r=r.where(r > 0, np.inf)).sort_values(["unit", "_r"])
        table = run.neuron_table()
        rows = {int(r.unit): r for r in table[table["layer"] == layer].itertuples(index=False)}
        n = acts.n_neurons if acts is not None else max([*rows, *tops, -1]) + 1
        if acts is None:
            notes.append(f"no activation cache for layer {layer} in {run.cfg.data_dir}: no "
                         f"histogram; run notebook 01 with this run's config")
        elif layer in run.cfg.settings.dnd.layers:
            from ..stages.top_images import choose_neurons
            with contextlib.suppress(NdUtilsError):
                chosen = choose_neurons(run.cfg, layer, acts.n_neurons)
        if run.clip_dissect(layer) is None:
            notes.append(f"no CLIP-Dissect labels for layer {layer}: run notebook 02")
        if not run.has_dnd():
            notes.append("no DnD results in this run: run notebooks 03-06")
        elif run.dnd(layer) is None:
            notes.append(f"no DnD results for layer {layer}: run notebooks 03-06 on it")
        top, top_note = cached_top_images(run, layer) if tops else (None, "")
        self._layers[layer] = _Layer(n, acts, tops, group(cand), rows, top, top_note, notes,
                                     chosen)
        return self._layers[layer]

    def jump(self, layer: str, unit: int) -> None:
        """Show neuron `unit` of `layer` (what the search results and similar list call)."""
        if self.run is None or layer not in self.run.layers:
            return
        n = self._layer(layer).n_units
        with self._hold():
            self.layer.value, self.unit.value = layer, 0
            self.unit.max = max(n - 1, 0)
            self.unit.value = min(max(int(unit), 0), self.unit.max)
        self.redraw()

    def _find(self, text: str) -> None:
        q, found = text.strip().lower(), []
        for layer, unit, labels, _ in self._entries if q and self.run else []:
            hit = next(((m, t) for m, t in labels if q in t.lower()), None)
            if hit:
                found.append((f"{layer}:{unit} · {hit[0]}: {hit[1]}", (layer, unit)))
        more = (f" (first {MAX_MATCHES} listed)" if len(found) > MAX_MATCHES else "") + (
            ": choose one to jump" if found else "")
        head = f"{len(found)} matches{more}" if q else "type to search labels"
        # the placeholder comes first, so listing matches never jumps by itself
        self.matches.options = [(head, None), *found[:MAX_MATCHES]]

    def closest(self, layer: str, unit: int) -> list[tuple]:
        """Neurons of any layer whose label words overlap most (Jaccard) with this one's."""
        i = self._where.get((layer, unit))
        words = self._entries[i][3] if i is not None else frozenset()
        scores = {}
        for j in {j for w in words for j in self._by_word.get(w, ())} - {i}:
            other = self._entries[j][3]
            scores[j] = len(words & other) / len(words | other)
        best = sorted(scores, key=lambda j: (-scores[j], j))[:self.n_similar]
        return [(self._entries[j][0], self._entries[j][1], round(scores[j], 3),
                 self._entries[j][2][0][1]) for j in best]

    def trusted_neurons(self, layer: str, min_r: "float | None" = None,
                        trusted_only: bool = True) -> pd.DataFrame:
        """`layer`'s rows of the neuron table, trusted ones only (unless `trusted_only` is
        False), ranked by held-out q then r; with cd_heldout_r >= `min_r` when given."""
        if self.run is None:
            return pd.DataFrame()
        return rank_by_trust(self.run.neuron_table(), layer, min_r, trusted_only)

    def step_trusted(self, step: int = 1) -> "tuple[str, int] | None":
        """Jump to the next (step > 0) or previous trusted neuron of the current layer, in
        trust order, wrapping around; the first (or last) one when the current is untrusted.
        Returns (layer, unit), or None when the layer has no trusted neuron."""
        layer = self.layer.value
        units = [int(u) for u in self.trusted_neurons(layer)["unit"]] if self.run else []
        if not units:
            return None
        here = int(self.unit.value)
        i = (units.index(here) + step) % len(units) if here in units else (
            0 if step > 0 else len(units) - 1)
        self.jump(layer, units[i])
        return layer, units[i]

    def _list_trusted(self, layer: str) -> None:
        """Fill the trusted dropdown for `layer` (once per layer: redraws keep the choice)."""
        if self._trusted_layer == (self.run.path, layer):
            return
        self._trusted_layer = (self.run.path, layer)
        head, found = trusted_choices(self.run.neuron_table(), layer, MAX_MATCHES)
        # the placeholder comes first, so listing them never jumps by itself
        self.trusted.options = [(head, None), *found]
        self.prev_trusted.disabled = self.next_trusted.disabled = not found

    def redraw(self) -> None:
        """Redraw the current neuron; a failure becomes a note instead of an exception."""
        if self.run is None:
            return
        t0 = time.perf_counter()
        v = ExplorerView(run=str(self.run.path), layer=self.layer.value, unit=int(self.unit.value))
        try:
            d = self._layer(v.layer)
            self._describe(d, v)
            self.png = self._draw(d, v)
        except Exception as exc:  # a damaged table or image must not kill the widget
            v.notes.append(f"could not draw {v.layer}:{v.unit}: {type(exc).__name__}: {exc}")
            self.png = b""
        v.similar = self.closest(v.layer, v.unit)
        self.view, self.image.value = v, self.png
        self.similar.options = [(f"{len(v.similar)} neurons with similar labels", None), *[
            (f"{a}:{b} · {s:.2f} · {t}", (a, b)) for a, b, s, t in v.similar]]
        self._list_trusted(v.layer)
        e, dnd_score = html.escape, "" if v.dnd_score is None else f" ({v.dnd_score:.3f})"

        def trust(text):  # the held-out score, beside the label it judges
            return f" <span style='color:#555'>[held-out {e(text)}]</span>" if text else ""

        cd = (f"<b>{e(v.cd_label)}</b> ({v.cd_score:.3f}){trust(v.cd_trust_text)}"
              if v.cd_label else "—")
        dnd = (f"<b>{e(' | '.join(v.dnd_labels))}</b>{dnd_score}{trust(v.dnd_trust_text)}"
               if v.dnd_labels else "—")
        quality = (f"<br><span style='color:#555'>held-out label quality · {e(v.quality_line)}</span>"
                   if v.quality else "")
        self.header.value = (f"<b>{e(v.layer)}:{v.unit}</b> of {v.n_units} &nbsp; "
                             f"CLIP-Dissect: {cd} &nbsp; DnD: {dnd}{quality}")
        self.notes_html.value = "<ul style='color:#a60'>" + "".join(
            f"<li>{e(n)}</li>" for n in v.notes) + "</ul>" if v.notes else ""
        self.last_redraw_seconds = time.perf_counter() - t0

    def _describe(self, d: _Layer, v: ExplorerView) -> None:
        """Fill the view's labels, concepts, candidates and notes for the current neuron."""
        unit, row = v.unit, d.rows.get(v.unit)
        v.n_units, v.notes = d.n_units, list(d.notes)
        if row is not None and isinstance(row.cd_label, str):
            v.cd_label, v.cd_score = row.cd_label, float(row.cd_score)
            v.concepts = [(str(c), float(s)) for c, s in zip(row.cd_concepts, row.cd_scores)]
        if row is not None and isinstance(row.dnd_labels, list):
            v.dnd_labels = [str(x) for x in row.dnd_labels]
            v.dnd_score = None if pd.isna(row.dnd_score) else float(row.dnd_score)
            if unit not in d.cands:
                v.notes.append(f"no DnD candidates of {v.layer}:{unit} in "
                               f"06_dnd_candidates_{v.layer}.csv: their images are not shown")
        elif self.run.dnd(v.layer) is not None:
            v.notes.append(f"{v.layer}:{unit} has no DnD label (not in dnd.neurons)")
        for method, prefix in (("CLIP-Dissect", "cd"), ("DnD", "dnd")):
            q = [getattr(row, f"{prefix}_{m}", None) if row is not None else None
                 for m in QUALITY_METRICS]
            q = [None if x is None or pd.isna(x) else float(x) for x in q]
            if any(x is not None for x in q):
                v.quality.append((method, *q, str(getattr(row, f"{prefix}_quality_label", "")
                                                  or "")))
        if row is not None:
            v.cd_trust, v.dnd_trust = row_trust(row)
        for r in d.cands[unit].head(self.n_candidates).itertuples() if unit in d.cands else []:
            paths = [p.strip() for p in str(r.images or "").split(";") if p.strip()]
            v.candidates.append((str(r.candidate), float(r.score), paths[:self.candidate_images]))
        if unit not in d.tops:
            v.notes.append(f"no top images cached for {v.layer}:{unit} (no activation cache "
                           f"for the layer and not a DnD neuron): run notebook 01")
        elif d.top is None or unit not in d.top.neurons:  # say why: the neuron, else the layer
            chosen = d.top.neurons if d.top is not None else d.chosen
            v.notes.append(MAP_NOTE if chosen is not None and unit not in chosen
                           else d.top_note or MAP_NOTE)

    def snapshot(self):
        """The current neuron's figure as an IPython Image (a static notebook output)."""
        from IPython.display import Image
        return Image(data=self.png) if self.png else (self.message or "\n".join(self.view.notes))
