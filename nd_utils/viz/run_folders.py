"""Read a finished (or partial) run folder: its config, record and result tables, lazily.

`open_run_folder` checks that a folder was written by `python -m nd_utils run` and returns a
RunView whose accessors read each CSV once, on first use, and return None when a table is absent
(so reports and explorers show what exists and `missing()` says what does not).

Example:
    >>> run = open_run_folder("latest")                                # doctest: +SKIP
    >>> run.layers, run.missing()                                      # doctest: +SKIP
    >>> run.neuron_table().head()                                      # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path

import pandas as pd

from ..config import Config
from ..context import load_config
from ..errors import NdUtilsError
from ..stages import list_tables
from .neuron_table import NeuronTableMixin

# Keys every run.json written by the current runner holds (nd_utils.pipeline.run_pipeline).
RUN_FIELDS = ("config", "source", "force", "stages", "status", "started")
RERUN = ("rerun the pipeline: python -m nd_utils run CONFIG (a profile such as offline, "
         "or a YAML path)")
# the result tables the stages declare (stage_cache.Table: kind, file, columns, notebooks)
_TABLES = {t.kind: t for t in list_tables()}
QUALITY_TABLES = tuple(t.kind for t in _TABLES.values() if t.notebooks == "08")
# a per-layer table's file name -> its layer (longest prefix first: 06_dnd_candidates before 06_dnd)
_LAYER_RE = re.compile("^(?:" + "|".join(sorted(
    (re.escape(t.file.split("{}")[0].rstrip("_")) for t in _TABLES.values() if t.per_layer),
    key=len, reverse=True)) + r")_(.+)\.csv$")


def runs_dir() -> Path:
    """`<data_dir>/runs` of the offline profile (ND_DATA_DIR redirects it)."""
    return load_config("offline").data_dir / "runs"


def latest_run(base: "str | Path | None" = None) -> Path:
    """The newest run folder with a run.json under `base` (default: `runs_dir()`)."""
    base = Path(base) if base else runs_dir()
    found = [p for p in base.glob("*") if (p / "run.json").is_file()] if base.is_dir() else []
    if not found:
        raise NdUtilsError(f"no run folders with a run.json under {base}: {RERUN}, or pass the "
                           f"run folder's path (set ND_DATA_DIR if your runs live elsewhere)")
    # Names start with YYYYmmdd-HHMMSS; mtime breaks ties within one second.
    return max(found, key=lambda p: (p.name[:15], (p / "run.json").stat().st_mtime))


def open_run_folder(path: "str | Path | RunView" = "latest") -> "RunView":
    """Check a run folder and return a RunView of it; `"latest"` = the newest run."""
    if isinstance(path, RunView):
        return path
    folder = latest_run() if str(path) == "latest" else Path(path).expanduser()
    if folder.name == "results" and (folder.parent / "run.json").exists():
        folder = folder.parent  # the runner prints the results folder; accept it too
    if not folder.is_dir():
        raise NdUtilsError(f"run folder {folder} does not exist: pass a folder under "
                           f"data/runs/ (or 'latest'), or {RERUN}")
    for name in ("config.yaml", "run.json"):
        if not (folder / name).is_file():
            raise NdUtilsError(
                f"{folder} has no {name}, so it is not a run folder of `python -m nd_utils run` "
                f"(folders made by notebooks run on their own have no run.json): {RERUN}")
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NdUtilsError(f"{folder / 'run.json'} is unreadable ({exc}): {RERUN}") from None
    lacking = [k for k in RUN_FIELDS if not isinstance(record, dict) or k not in record]
    if lacking or not isinstance(record.get("stages"), list):
        raise NdUtilsError(f"{folder / 'run.json'} lacks {', '.join(lacking) or 'a stage list'}: "
                           f"it was written by an older nd_utils; {RERUN}")
    try:
        cfg = load_config(folder / "config.yaml")
    except NdUtilsError as exc:
        raise NdUtilsError(f"{folder / 'config.yaml'} is not a valid config ({exc}); "
                           f"{RERUN}") from None
    return RunView(folder.resolve(), cfg, record)


class RunView(NeuronTableMixin):
    """A run folder opened for reading; every table is read on first use and cached."""

    def __init__(self, path: Path, cfg: Config, record: dict):
        self.path, self.cfg, self.record = Path(path), cfg, record
        self.results = self.path / "results"
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"RunView({str(self.path)!r}, status={self.status!r}, layers={self.layers})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return str(self.record.get("status"))

    @property
    def stages(self) -> list[dict]:
        return list(self.record.get("stages", []))

    @cached_property
    def layers(self) -> list[str]:
        """`target.layers`, then DnD layers that have result tables, in that order."""
        found = []
        if self.results.is_dir():
            for p in sorted(self.results.glob("*.csv")):
                m = _LAYER_RE.match(p.name)
                if m and m.group(1) not in found:
                    found.append(m.group(1))
        settings = self.cfg.settings
        configured = list(settings.target.layers)
        # The run's effective config names every layer it used; other names matching the
        # pattern (e.g. a comparison table) are not layers.
        known = set(configured) | set(settings.dnd.layers)
        return configured + [x for x in found if x not in configured and x in known]

    def _table(self, kind: str, layer: "str | None" = None) -> "pd.DataFrame | None":
        key = (kind, layer)
        if key not in self._cache:
            table_def = _TABLES[kind]
            needed, notebooks = table_def.columns, table_def.notebooks
            path = table_def.path(self.results, layer)
            table = None
            if path.is_file():
                try:  # keep_default_na=False: a concept such as "null" or "NA" stays a string
                    table = pd.read_csv(path, keep_default_na=False)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise NdUtilsError(f"{path} is unreadable ({exc}): delete it and rerun "
                                       f"notebook(s) {notebooks}") from None
                lacking = [c for c in needed if c not in table.columns]
                if lacking:
                    raise NdUtilsError(f"{path} lacks the column(s) {', '.join(lacking)} (written "
                                       f"by another version?): delete it and rerun notebook(s) "
                                       f"{notebooks}")
            self._cache[key] = table
        return self._cache[key]

    def clip_dissect(self, layer: str) -> "pd.DataFrame | None":
        """`02_clip_dissect_<layer>.csv`: unit, description, similarity, concept_j, score_j."""
        return self._table("clip_dissect", layer)

    def dnd(self, layer: str) -> "pd.DataFrame | None":
        """`06_dnd_<layer>.csv`: Neuron ID, Label 1, Label 2, Label 3."""
        return self._table("dnd", layer)

    def dnd_candidates(self, layer: str) -> "pd.DataFrame | None":
        """`06_dnd_candidates_<layer>.csv`: unit, rank, candidate, score, ..., images (';' list)."""
        return self._table("dnd_candidates", layer)

    def top_images(self, layer: str) -> "pd.DataFrame | None":
        """`03_top_images_<layer>.csv`: unit, rank, kind (original|crop), image_id, path, ..."""
        return self._table("top_images", layer)

    def evaluation(self) -> "pd.DataFrame | None":
        """`07_evaluation.csv` (final-layer scores per concept set and similarity)."""
        return self._table("07_evaluation.csv")

    def published(self) -> "pd.DataFrame | None":
        """`07_published.csv` (the papers' numbers this run is compared with)."""
        return self._table("07_published.csv")

    def label_quality(self) -> "pd.DataFrame | None":
        """`08_label_quality.csv`: one row per (layer, unit, source) with the label's CoSy AUC,
        MAD, AUPRC, p_value, simulation r (sim_r), n_concept_images, n_test ('' = NaN)."""
        return self._table("08_label_quality.csv")

    def quality_summary(self) -> "pd.DataFrame | None":
        """`08_quality_summary.csv`: layer ('all' pools), source, metric, mean, ci_low, ci_high,
        n."""
        return self._table("08_quality_summary.csv")

    def method_comparison(self) -> "pd.DataFrame | None":
        """`08_method_comparison.csv`: CLIP-Dissect vs DnD per layer and metric over the same
        neurons: clip_dissect, dnd, diff (= clip_dissect - dnd), diff_low/high, p values, n."""
        return self._table("08_method_comparison.csv")

    def sanity_checks(self) -> "pd.DataFrame | None":
        """`08_sanity_checks.csv`: layer, metric, method, higher, lower, their values and ok
        (whether the expected ordering true class > method > shuffled > constant held)."""
        return self._table("08_sanity_checks.csv")

    def trust_summary(self) -> "pd.DataFrame | None":
        """`02_trust_summary.csv`: per layer n_neurons, n_trusted, fraction_trusted, alpha,
        median_heldout_r, mean_cosy_auc, n_heldout_images, n_null_concepts, label_agreement."""
        return self._table("02_trust_summary.csv")

    def figures(self) -> list[Path]:
        """PNG figures of `results/`, in stage order."""
        return sorted(self.results.glob("*.png")) if self.results.is_dir() else []

    def probe(self):
        """The run's probe set (hashes every image once), or None when it cannot be loaded."""
        if "probe" not in self._cache:
            from ..stages.activations import load_probe_from_config

            try:
                self._cache["probe"] = load_probe_from_config(self.cfg)
            except NdUtilsError as exc:
                self._cache["probe"], self._cache["probe_error"] = None, str(exc)
        return self._cache["probe"]

    def activations(self, layer: str):
        """The layer's cached activations (LayerActivations), or None when not cached."""
        key = ("activations", layer)
        if key not in self._cache:
            from ..stages.activations import load_activations

            self._cache[key] = None
            if self.probe() is not None:
                try:
                    self._cache[key] = load_activations(self.cfg, layer, probe=self.probe())
                except NdUtilsError as exc:  # missing cache, or a target outside the registry
                    self._cache[("activations_error", layer)] = str(exc)
        return self._cache[key]

    def top_probe_images(self, layer: str, k: int = 5) -> "pd.DataFrame | None":
        """Top-k probe images per unit by pooled activation: unit, rank, image_id, activation,
        path ('' for in-memory probe items), sha256.

        From the activation cache; when it is gone, from the original images in
        `03_top_images_<layer>.csv` (DnD's neurons only). None when neither exists.
        """
        key = ("top_probe_images", layer, k)
        if key not in self._cache:
            out, table = None, self.top_images(layer)
            if (acts := self.activations(layer)) is not None:
                kk = min(k, acts.top_ids.shape[1])
                ids, vals = acts.top_ids[:, :kk].numpy(), acts.top_values[:, :kk].numpy()
                images, flat = acts.images.set_index("id"), ids.reshape(-1)
                out = pd.DataFrame({
                    "unit": [u for u in range(ids.shape[0]) for _ in range(kk)],
                    "rank": list(range(1, kk + 1)) * ids.shape[0], "image_id": flat,
                    "activation": vals.reshape(-1).astype(float),
                    "path": images["path"].reindex(flat).fillna("").astype(str).to_numpy(),
                    "sha256": (images["sha256"].reindex(flat).fillna("").astype(str).to_numpy()
                               if "sha256" in images else "")})
            elif table is not None and "kind" in table:
                t = table[table["kind"] == "original"].assign(
                    activation=lambda d: pd.to_numeric(d["activation"], errors="coerce"))
                t = t.sort_values(["unit", "activation"], ascending=[True, False])
                t = t.drop_duplicates(["unit", "image_id"]).groupby("unit").head(k)
                out = pd.DataFrame({"unit": t["unit"].astype(int), "image_id": t["image_id"],
                                    "activation": t["activation"],
                                    "path": t["path"].astype(str), "sha256": ""})
                out["rank"] = out.groupby("unit").cumcount() + 1
            self._cache[key] = out
        return self._cache[key]

    def d_top(self, layer: str) -> "pd.DataFrame | None":
        """DnD's D_top items per unit (originals and crops, by rank): unit, rank, kind,
        image_id, activation, path, caption; from `03_top_images_<layer>.csv`, else None."""
        table = self.top_images(layer)
        if table is None:
            return None
        if "in_top" in table:  # the stage also lists the unchosen items of each image
            table = table[table["in_top"].astype(str).str.lower() == "true"]
        else:
            table = table[pd.to_numeric(table["rank"], errors="coerce") > 0]
        out = table.sort_values(["unit", "rank"]).reset_index(drop=True)
        return out.assign(caption=out["caption"].astype(str) if "caption" in out else "")

    def load_image(self, path: str = "", image_id: "int | None" = None):
        """An image as RGB PIL: from `path` when it exists, else probe item `image_id`."""
        from PIL import Image

        from ..probe_set import _to_rgb

        if path and os.path.isfile(path):
            with Image.open(path) as im:
                im.draft("RGB", (512, 512))  # JPEG: decode at reduced size, much faster
                im.load()
                return _to_rgb(im)
        probe = self.probe() if image_id is not None else None
        if probe is None or not 0 <= int(image_id) < len(probe):
            raise FileNotFoundError(f"image {path or image_id!r} not found")
        return probe.load_image(int(image_id))

    def has_dnd(self) -> bool:
        return any(self.dnd(layer) is not None for layer in self.layers)

    def missing(self) -> list[str]:
        """Human sentences naming what this run lacks and how to produce it."""
        out = []
        if self.status != "ok":
            failed = [s for s in self.stages if s.get("status") == "failed"]
            if failed:
                s = failed[-1]
                out.append(f"stage {s.get('notebook')} failed ({s.get('error', '?')}): open "
                           f"{s.get('executed', 'its executed notebook')}, fix it and rerun")
            else:
                done = ", ".join(s.get("notebook", "?")[:2] for s in self.stages) or "none"
                out.append(f"the run's status is {self.status!r} (stages finished: {done}): "
                           f"results may be incomplete; wait for it to finish, or {RERUN}")
        for layer in self.layers:
            if self.clip_dissect(layer) is None:
                out.append(f"no CLIP-Dissect labels for layer {layer}: run notebook 02")
        has_dnd = self.has_dnd()
        if not has_dnd:
            out.append("no DnD results: run notebooks 03-06")
        for layer in self.layers:
            if has_dnd and self.dnd(layer) is None:
                out.append(f"no DnD results for layer {layer}: run notebooks 03-06 on it")
            elif self.dnd(layer) is not None and self.dnd_candidates(layer) is None:
                out.append(f"no DnD candidate table for layer {layer} "
                           f"(06_dnd_candidates_{layer}.csv): candidates' images not shown")
            if self.top_images(layer) is None and self.activations(layer) is None:
                why = (self._cache.get(("activations_error", layer))
                       or self._cache.get("probe_error") or "")
                out.append(f"no top probe images for layer {layer}: its activation cache is "
                           f"missing from {self.cfg.data_dir}; run notebook 01 with this "
                           f"config" + (f" ({why.split(':')[0]})" if why else ""))
        if self.evaluation() is None:
            out.append("no final-layer evaluation: run notebook 07")
        # Stage 08 is optional: runs without it say nothing, but a partial one (or a finished
        # label-quality notebook without its table) names what is lacking.
        absent = [name for name in QUALITY_TABLES if self._table(name) is None]
        ran = any("quality" in str(s.get("notebook", "")) and s.get("status") == "ok"
                  for s in self.stages if str(s.get("notebook", "")).startswith("08"))
        if absent and (len(absent) < len(QUALITY_TABLES) or ran):
            out.append(f"label quality incomplete (no {', '.join(absent)}): rerun notebook 08")
        return out
