"""How well does each trust score say that a label is right? (issue 23's validation)

On a layer where the truth is known, EfficientNet-Lite0's fc (neuron k is ImageNet class k),
with the 1,000 class names as the concept set and the ImageNet sample (1,000 photos, one per
class) as the probe, every neuron's trust label (chosen on the `select` half) is either its
class or not. Each score ranks the labels; its ROC AUC says how well it separates right labels
from wrong ones (the CLIP-Dissect paper reports this for its raw score with CLIP on ImageNet
val: 0.92 for soft_wpmi, 0.48 for cos). Scores: the raw similarity of the label on `select`
(`trust_similarity`), `heldout_r`, `heldout_p` (lower is better) and `cosy_auc`.

Prints a markdown table and writes, under --out (default data/validate_trust/):
`trust_validation.csv` (one row per similarity function and score), `trust_labels_<fn>.csv`
(every neuron's label, truth and scores) and `trust_calibration.png` (fraction of right labels
per decile of each score).

Usage: python benchmarks/validate_trust.py [--similarities soft_wpmi cos_similarity]
                                           [--set KEY=VALUE ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nd_utils as nd  # noqa: E402
from nd_utils.stages.image_features import image_feature_jobs_if_missing  # noqa: E402
from nd_utils.stages.label_trust import layer_trust  # noqa: E402

# score -> sign that makes higher better
SCORES = {"trust_similarity": 1, "heldout_r": 1, "heldout_p": -1, "cosy_auc": 1}
SETUP = ["probe.sets=[{name: imagenet-sample-1k}]", "target.layers=[fc]",
         "clip_dissect.concept_set=imagenet_classes"]


def roc_auc(score: np.ndarray, right: np.ndarray) -> float:
    """ROC AUC of `score` for `right` (ties count one half; NaN scores rank lowest)."""
    from sklearn.metrics import roc_auc_score

    s = np.where(np.isfinite(score), score, -np.inf)
    if right.all() or not right.any():
        return float("nan")
    return float(roc_auc_score(right, np.nan_to_num(s, neginf=np.nanmin(s[np.isfinite(s)]) - 1)))


def validate(cfg, similarity: str) -> pd.DataFrame:
    """Every fc neuron: its trust label, whether it is the neuron's class, and the scores."""
    cfg = cfg.with_overrides({"clip_dissect.similarity": similarity})
    probe = nd.load_probe_from_config(cfg)
    nd.cache_activations(cfg, probe=probe, progress=True,
                         extra_jobs=image_feature_jobs_if_missing(cfg, probe))
    nd.dissect_layer(cfg, "fc", probe=probe)            # the text features, as stage 02
    t0 = time.time()
    trust = layer_trust(cfg, "fc", probe=probe)
    seconds = time.time() - t0
    classes = list(nd.load_concept_set("imagenet_classes"))
    trust["true_class"] = [classes[u] for u in trust.unit]
    trust["right"] = trust.trust_label == trust.true_class
    trust.attrs["seconds"] = seconds
    return trust


def calibration_plot(tables: "dict[str, pd.DataFrame]", path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.8), squeeze=False)
    for ax, (fn, t) in zip(axes[0], tables.items()):
        for score, sign in SCORES.items():
            s = sign * t[score].to_numpy(float)
            ok = np.isfinite(s)
            ranks = pd.Series(s[ok]).rank(pct=True).to_numpy()
            bins = np.minimum((ranks * 10).astype(int), 9)
            frac = [t["right"].to_numpy()[ok][bins == b].mean() for b in range(10)]
            ax.plot(np.arange(10) * 10 + 5, frac, "o-", label=score + (" (-)" if sign < 0 else ""))
        ax.axhline(t["right"].mean(), color="grey", lw=0.8, ls="--", label="all labels")
        ax.set_xlabel("score percentile (decile)")
        ax.set_ylabel("fraction of labels = true class")
        ax.set_title(f"{fn}: right labels per decile", fontsize=10)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--similarities", nargs="+", default=["soft_wpmi", "cos_similarity"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = nd.load_config("offline", SETUP + args.set)
    out = Path(args.out) if args.out else cfg.data_dir / "validate_trust"
    out.mkdir(parents=True, exist_ok=True)
    tables, rows = {}, []
    for fn in args.similarities:
        t = tables[fn] = validate(cfg, fn)
        t.to_csv(out / f"trust_labels_{fn}.csv", index=False)
        right = t["right"].to_numpy()
        trusted = t.heldout_q.to_numpy() < cfg["trust.alpha"]
        for score, sign in SCORES.items():
            rows.append({"similarity": fn, "score": score, "roc_auc": roc_auc(
                sign * t[score].to_numpy(float), right), "n_labels": len(t),
                "n_right": int(right.sum()), "n_trusted": int(trusted.sum()),
                "right_among_trusted": float(right[trusted].mean()) if trusted.any()
                else float("nan"),
                "trust_seconds": round(t.attrs["seconds"], 1),
                "n_heldout": t.attrs["n_heldout"]})
    table = pd.DataFrame(rows)
    table.to_csv(out / "trust_validation.csv", index=False)
    calibration_plot(tables, out / "trust_calibration.png")
    print(f"\nEfficientNet-Lite0 fc, concept set imagenet_classes (1,000 class names), probe "
          f"imagenet-sample-1k (1,000 images; {table.n_heldout.iloc[0]} held out), VLM "
          f"{cfg['vlm.name']}: ROC AUC of each score for 'the trust label is the true class'\n")
    wide = table.pivot(index="similarity", columns="score", values="roc_auc")[list(SCORES)]
    info = table.groupby("similarity").first()[["n_right", "n_labels", "n_trusted",
                                                "right_among_trusted"]]
    print("| similarity | right labels | raw similarity | heldout_r | heldout_p | cosy_auc | "
          "trusted (q < alpha) | right among trusted |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for fn in args.similarities:
        w, i = wide.loc[fn], info.loc[fn]
        print(f"| {fn} | {int(i.n_right)}/{int(i.n_labels)} | {w.trust_similarity:.3f} | "
              f"{w.heldout_r:.3f} | {w.heldout_p:.3f} | {w.cosy_auc:.3f} | {int(i.n_trusted)} | "
              f"{i.right_among_trusted:.1%} |")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
