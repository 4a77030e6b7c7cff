"""The explorer's records: what it shows for the current neuron, and a layer's data read once."""
from __future__ import annotations

from dataclasses import dataclass, field

from .trust_plots import trust_text


@dataclass
class ExplorerView:
    """What the explorer shows for the current neuron (tests and the notebook read it)."""

    run: str = ""
    layer: str = ""
    unit: int = -1
    n_units: int = 0
    cd_label: "str | None" = None
    cd_score: "float | None" = None
    concepts: list = field(default_factory=list)     # [(concept, score)], best first
    dnd_labels: list = field(default_factory=list)
    dnd_score: "float | None" = None
    candidates: list = field(default_factory=list)   # [(candidate, score, [image paths])]
    quality: list = field(default_factory=list)  # [(method, CoSy AUC, MAD, sim r, label)], 08
    cd_trust: dict = field(default_factory=dict)     # held-out r, p, q, auc, trusted, label; 02
    dnd_trust: dict = field(default_factory=dict)    # held-out r, p, auc of Label 1; 06
    n_images: int = 0                                # top probe images drawn
    n_maps: int = 0                                  # of which with a spatial-map overlay
    map_overlay: bool = False                        # n_maps > 0
    histogram: bool = False
    similar: list = field(default_factory=list)      # [(layer, unit, jaccard, label)]
    notes: list = field(default_factory=list)        # what is missing and how to get it

    @property
    def labels(self) -> list[str]:
        return [x for x in [self.cd_label, *self.dnd_labels] if x]

    @property
    def quality_line(self) -> str:
        """Stage 08's scores of both labels on one line ("" when the run has none)."""
        def fmt(x):
            return "n/a" if x is None else f"{x:.3f}"

        return " | ".join(f"{m}{f' “{lab}”' if lab else ''}: AUC {fmt(a)} · MAD {fmt(d)} · "
                          f"sim r {fmt(r)}" for m, a, d, r, lab in self.quality)

    @property
    def cd_trust_text(self) -> str:
        """CLIP-Dissect's held-out trust score and verdict ("" when the run has none)."""
        return trust_text(**self.cd_trust)

    @property
    def dnd_trust_text(self) -> str:
        """DnD's Label 1 held-out score ("" when the run has none)."""
        return trust_text(**self.dnd_trust)


@dataclass
class _Layer:
    n_units: int
    acts: object              # LayerActivations or None
    tops: dict                # unit -> top probe images (DataFrame)
    cands: dict               # unit -> DnD candidates, best first
    rows: dict                # unit -> neuron_table row
    top: object               # TopImages with maps, or None
    top_note: str             # why `top` is None
    notes: list
    chosen: "list | None"     # the layer's dnd.neurons, when the config and cache say
