"""The explorer's neuron figure: top images with map overlays, histogram, concepts, candidates."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..attention_crops import normalise_map
from .explorer_view import ExplorerView, _Layer
from .figures import blank


class NeuronFigure:
    """NeuronExplorer's drawing half: reads its `run`, `k`, `candidate_images`, `dpi`, `_thumbs`."""

    def _thumb(self, path: str, image_id=None, square: bool = False, size: int = 160):
        """An image as a small array (cached: neurons share images); None if unreadable."""
        key = (path, None, square) if path else (str(self.run.path), image_id, square)
        if key not in self._thumbs:
            try:
                im = self.run.load_image(path, image_id)
            except (OSError, ValueError):
                return None
            im = im.resize((size, size)) if square else im  # maps cover the stretched square
            im.thumbnail((size, size))
            if len(self._thumbs) > 800:
                self._thumbs.clear()
            self._thumbs[key] = np.asarray(im)
        return self._thumbs[key]

    def _draw(self, d: _Layer, v: ExplorerView) -> bytes:
        """The neuron's figure as PNG bytes; counts drawn images and map overlays in `v`."""
        k, nc, unit = self.k, self.candidate_images, v.unit
        cols = max(k, nc + 1)
        heights = [1.0, 1.0] + [0.8] * len(v.candidates)
        fig = Figure(figsize=(1.6 * cols, 1.7 * sum(heights) + 0.3))
        FigureCanvasAgg(fig)  # a renderer of its own: no pyplot state, nothing auto-displayed
        grid = fig.add_gridspec(len(heights), cols, height_ratios=heights)
        tops = d.tops.get(unit)
        maps = tops is not None and d.top is not None and unit in d.top.neurons
        if tops is None:
            blank(fig.add_subplot(grid[0, :]), "no top images cached")
        for c, r in enumerate(tops.head(k).itertuples() if tops is not None else []):
            ax = fig.add_subplot(grid[0, c])
            ax.set_axis_off()
            img = self._thumb(r.path, r.image_id, square=maps)
            ax.set_title(f"#{r.image_id}  {float(r.activation):.2f}"
                         + ("" if img is not None else "\nunreadable"), fontsize=7)
            if img is None:
                continue
            ax.imshow(img)
            v.n_images += 1
            m = d.top.spatial_map(unit, int(r.image_id)) if maps else None
            if m is not None and (m := normalise_map(m)) is not None:  # None: a constant map
                ax.imshow(m.numpy(), cmap="jet", alpha=0.4, interpolation="bilinear",
                          extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
                v.n_maps += 1
                v.map_overlay = True
        half = max(cols // 2, 1)
        ax = fig.add_subplot(grid[1, :half])
        if d.acts is not None and unit < d.n_units:
            values = d.acts.activations[:, unit].numpy()
            ax.hist(values, bins=30, color="#4c72b0")
            ax.vlines(tops.activation.head(k) if tops is not None else [], 0, 1, color="tab:red",
                      lw=1, transform=ax.get_xaxis_transform())
            ax.set_title(f"activation over {len(values)} probe images (top {k} red)", fontsize=8)
            ax.tick_params(labelsize=7)
            v.histogram = True
        else:
            blank(ax, "no activation cache")
        ax = fig.add_subplot(grid[1, half:])
        if v.concepts:
            names, scores = zip(*v.concepts)
            y = np.arange(len(names))[::-1]
            ax.barh(y, scores, color="#dd8452")
            for yy, name in zip(y, names):  # names inside the bars: no tick-label margin needed
                ax.text(0.01, yy, name[:30], fontsize=7, va="center",
                        transform=ax.get_yaxis_transform())
            ax.set_yticks([])
            ax.set_title("CLIP-Dissect top concepts (score)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        else:
            blank(ax, "no CLIP-Dissect labels")
        for i, (name, score, paths) in enumerate(v.candidates):
            ax = fig.add_subplot(grid[2 + i, 0])
            ax.set_axis_off()
            ax.text(0.0, 0.5, f"DnD #{i + 1}\n{name[:28]}\nscore {score:.3f}", fontsize=8,
                    va="center", transform=ax.transAxes)
            for j, p in enumerate(paths[:nc]):
                ax = fig.add_subplot(grid[2 + i, 1 + j])
                ax.set_axis_off()
                if (img := self._thumb(p)) is not None:
                    ax.imshow(img)
        inch = fig.get_figheight()  # a fixed layout: tight_layout would cost a second draw
        fig.subplots_adjust(left=0.04, right=0.98, bottom=0.3 / inch, top=1 - 0.25 / inch,
                            hspace=0.45, wspace=0.12)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi, pil_kwargs={"compress_level": 1})
        return buf.getvalue()
