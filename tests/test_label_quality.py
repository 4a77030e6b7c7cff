"""Stage 08 (label quality): the probe split, split views of cached activations, and the whole
stage on the real offline models (CoSy, simulation, sanity labels, CD vs DnD, caching)."""
import numpy as np
import pandas as pd
import pytest
import torch

import nd_utils as nd
from nd_utils.stages.clip_dissect import load_vlm_from_config
from nd_utils.stages.image_features import load_image_features
from nd_utils.stages.label_quality import quality_config, quality_parts
from nd_utils.stages import image_features, label_quality, quality_statistics
from nd_utils.errors import ConfigError
from nd_utils.probe_split import split_ids, split_part, split_table
from nd_utils.probes import load_probes
from nd_utils.probes import load_probe

PARTS = ("select", "pool", "calibrate", "test")


def test_split_is_seeded_disjoint_and_complete():
    fr = {"select": 0.4, "pool": 0.2, "calibrate": 0.1, "test": 0.3}
    a, b = split_ids(1000, fr, seed=0), split_ids(1000, fr, seed=0)
    assert a == b and split_ids(1000, fr, seed=1) != a
    assert [len(a[p]) for p in PARTS] == [400, 200, 100, 300]
    ids = sorted(i for p in PARTS for i in a[p])
    assert ids == list(range(1000))                       # disjoint and complete
    # the order the fractions are written in does not matter (configs hash as sorted JSON)
    assert split_ids(1000, dict(reversed(list(fr.items()))), seed=0) == a
    with pytest.raises(ConfigError, match="adding up to 1"):
        split_ids(10, {"select": 0.5, "test": 0.4})
    with pytest.raises(ConfigError, match="not one of"):
        split_part(load_probe("offline-sample"), {"part": "train"})


def test_split_parts_are_views_of_the_whole_set():
    whole = load_probe("offline-sample")
    parts = {p: load_probes([{"name": "offline-sample", "split": {"part": p}}]) for p in PARTS}
    assert all(s.root is not None and s.root.fingerprint == whole.fingerprint
               for s in parts.values())
    table = split_table(whole)
    for p, s in parts.items():
        assert list(s.parent_ids) == list(table.id[table.part == p])
        assert [it.sha256 for it in s.items] == [whole.items[i].sha256 for i in s.parent_ids]
        assert s.fingerprint != whole.fingerprint          # so downstream keys differ
    # a part cannot be mixed with other sets (its caches are rows of one whole set)
    with pytest.raises(ConfigError, match="listed alone"):
        load_probes([{"name": "offline-sample", "split": {"part": "test"}},
                     {"name": "offline-sample"}])


@pytest.fixture(scope="module")
def quality_cfg(tmp_path_factory):
    store = tmp_path_factory.mktemp("quality-store")
    return nd.load_config("offline", [
        f"data_dir={store}", "device=cpu", "quality.probe_sets=[{name: offline-sample}]",
        "dnd.layers=[head, fc]", "dnd.neurons=[0, 3, 7]", "dnd.top_k=5",
        "clip_dissect.concept_set=imagenet_classes",   # 1,000 texts to embed, not 20,000
        "activations.top_k=8", "llm.name=keywords", "llm.summaries=3",
        "synthesis.images_per_concept=4", "quality.cosy_images=5", "quality.bootstrap=200"])


@pytest.fixture(scope="module")
def result(quality_cfg):
    return nd.evaluate_label_quality(quality_cfg, progress=False)


def test_part_activations_are_rows_of_the_whole_cache(quality_cfg, result):
    qcfg = quality_config(quality_cfg)
    parts = quality_parts(qcfg)
    whole = parts["test"].root
    full = nd.load_activations(image_features.cfg_for_root(qcfg, parts["test"]), "head",
                               probe=whole)
    for p in ("select", "test"):
        view = nd.load_activations(qcfg, "head", probe=parts[p])
        ids = torch.as_tensor(parts[p].parent_ids)
        assert torch.equal(view.activations, full.activations[ids])
        # top ids are ids within the part, and really the part's best images
        best = view.activations.argmax(0)
        assert torch.equal(view.top_ids[:, 0], best)
    # DnD's D_top is drawn from the select part only: none of its images is a test image
    tops = nd.dnd_top_images(qcfg, progress=False)
    test_sha = {it.sha256 for it in parts["test"].items}
    sel = parts["select"]
    for top in tops.values():
        originals = top.items[top.items.kind == "original"]
        assert len(originals)
        assert not {sel.items[i].sha256 for i in originals.image_id} & test_sha


def test_stage_scores_every_source_on_the_test_part(result):
    t = result.table
    sources = set(t.source)
    assert {"clip_dissect", "dnd", "shuffled clip_dissect", "shuffled dnd", "random concept",
            "constant 'depiction'", "true class"} == sources
    assert set(t[t.source == "true class"].layer) == {"fc"}          # classes only on fc
    n_test = (result.split.part == "test").sum()
    assert (t.n_test == n_test).all()
    assert t.auc.between(0, 1).all() and t.auprc.between(0, 1).all()
    assert t.sim_r.dropna().between(-1, 1).all() and t.sim_r.notna().mean() > 0.9
    # shuffles are derangements: no neuron keeps its own label
    for m in ("clip_dissect", "dnd"):
        own = t[t.source == m].set_index(["layer", "unit"]).label
        shuf = t[t.source == f"shuffled {m}"].set_index(["layer", "unit"]).label
        assert sorted(own) == sorted(shuf) and (own.loc[shuf.index] != shuf).any()
    assert {"a", "b", "n_images"} <= set(result.calibration)
    assert result.calibration["a"] > 0   # higher cosine -> more likely the labelled class


def test_metrics_match_a_direct_computation(quality_cfg, result):
    """One row recomputed from the raw pieces with scikit-learn and scipy."""
    from scipy.stats import pearsonr
    from sklearn.metrics import average_precision_score, roc_auc_score

    from nd_utils.stages import selection, synthesis

    qcfg = quality_config(quality_cfg)
    parts = quality_parts(qcfg)
    row = result.table[(result.table.source == "clip_dissect")].iloc[0]
    a0 = nd.load_activations(qcfg, row.layer, probe=parts["test"]).activations[:, row.unit]
    ccfg = qcfg.with_overrides({"synthesis.prompt": qcfg["quality.cosy_prompt"],
                                "synthesis.images_per_concept": qcfg["quality.cosy_images"]})
    vlm = load_vlm_from_config(qcfg)
    synth = synthesis.load_synthesizer_from_config(ccfg, vlm=vlm)
    images, stats = synthesis.concept_images(ccfg, [row.label], synth, progress=False)
    assert stats["synthesised"] == 0                       # cached by the stage
    # the CoSy images come from the pool part, never from the judged test images
    pool_paths = {it.path for it in parts["pool"].items}
    assert set(images[row.label].table.source) <= pool_paths
    target = nd.load_target(qcfg["target.name"])
    cacts = selection.concept_activations(ccfg, [row.layer], images, target, vlm,
                                          progress=False, features=False)
    assert cacts.features.numel() == 0                    # CoSy needs no VLM features
    a1 = cacts.activations[row.layer][:, row.unit].numpy()
    y = np.r_[np.zeros(len(a0)), np.ones(len(a1))]
    s = np.r_[a0.numpy(), a1]
    assert row.auc == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert row.auprc == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert row.mad == pytest.approx((a1.mean() - a0.numpy().mean()) / a0.numpy().std(), rel=1e-5)
    feats = load_image_features(qcfg, parts["test"]).float()
    cos = (feats @ vlm.encode_texts([row.label]).float().T)[:, 0].numpy()
    c = result.calibration
    pred = 1 / (1 + np.exp(-c["a"] * (cos + c["b"])))
    assert row.sim_r == pytest.approx(pearsonr(pred, a0.numpy())[0], abs=1e-6)


def test_summary_comparison_and_sanity_tables(result):
    s, c, san = result.summary, result.comparison, result.sanity
    assert set(s.layer) == {"head", "fc", "all"}
    assert ((s.ci_low <= s["mean"] + 1e-12) & (s["mean"] <= s.ci_high + 1e-12)).all()
    assert set(c.metric) == set(quality_statistics.METRICS) and set(c.layer) == {"head", "fc", "all"}
    row = c[(c.layer == "all") & (c.metric == "auc")].iloc[0]
    t = result.table
    cd = t[t.source == "clip_dissect"].auc.mean()
    dnd = t[t.source == "dnd"].auc.mean()
    assert row.clip_dissect == pytest.approx(cd) and row["diff"] == pytest.approx(cd - dnd)
    assert row.n == 6
    # the fc checks include the true class, head's do not
    assert ((san.layer == "fc") & (san.higher == "true class")).any()
    assert not ((san.layer == "head") & (san.higher == "true class")).any()
    means = s.set_index(["layer", "source", "metric"])["mean"]
    for r in san.itertuples():
        assert r.ok == (means[(r.layer, r.higher, r.metric)] > means[(r.layer, r.lower, r.metric)])


def test_rerun_is_cached_and_tables_are_written(quality_cfg, result, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("metrics recomputed although the stage is cached")

    monkeypatch.setattr(label_quality, "score_labels", boom)
    again = nd.evaluate_label_quality(quality_cfg, progress=False)
    assert again.key == result.key
    pd.testing.assert_frame_equal(again.table, result.table)
    paths = nd.write_quality_tables(tmp_path, again)
    assert set(paths) == {"08_label_quality", "08_quality_summary", "08_method_comparison",
                          "08_sanity_checks", "08_split"}
    split = pd.read_csv(paths["08_split"])
    assert split.part.value_counts().to_dict() == again.split.part.value_counts().to_dict()
    fig = nd.viz.plot_label_quality(again.summary, again.table, save=tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000 and len(fig.axes) >= 8


def test_bad_quality_config_is_named():
    with pytest.raises(ConfigError, match="quality.split"):
        nd.load_config("offline", ["quality.split={select: 0.5, test: 0.6}"])
    with pytest.raises(ConfigError, match="one probe set"):
        quality_config(nd.load_config("offline", [
            "quality.probe_sets=[{name: offline-sample}, {name: offline-sample}]"]))


def test_run_labels_are_judged_only_when_held_out(quality_cfg, result):
    """08 judges the run's own labels when no image they were chosen on (probe set, retrieval
    pool) is a test or calibration image; otherwise it chooses them again on select."""
    assert result.labels_from == "select"          # probe.sets is the quality set itself
    qcfg = quality_config(quality_cfg)
    parts = quality_parts(qcfg)
    split = {"seed": int(quality_cfg["seed"])}

    def decide(probe_part, pool_part, synthesis="retrieve"):
        spec = lambda part: [{"name": "offline-sample",  # noqa: E731
                              **({"split": {"part": part, **split}} if part else {})}]
        cfg = quality_cfg.with_overrides({"probe.sets": spec(probe_part),
                                          "synthesis.pool": spec(pool_part),
                                          "synthesis.name": synthesis,  # a valid config:
                                          "synthesis.model": "CompVis/stable-diffusion-v1-4"})
        return label_quality.labelling_config(cfg, qcfg, parts)[1]

    assert decide("select", "pool") == "run"
    assert decide("select", None) == "select"      # the whole pool holds test images
    assert decide("select", "calibrate") == "select"
    assert decide(None, "pool") == "select"        # the whole probe holds test images
    assert decide("select", None, synthesis="diffusers") == "run"  # no pool is read
    missing = quality_cfg.with_overrides({"probe.sets": [{"name": "folder",
                                                          "path": "/nonexistent/probe"}]})
    assert label_quality.labelling_config(missing, qcfg, parts)[1] == "select"
