"""Held-out trust scores (issue 23): the arithmetic against scipy / scikit-learn, and the stage on
a planted probe where three neurons see one colour each and a fourth sees none."""
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision import transforms as T

import nd_utils as nd
from nd_utils import clip_dissect, image_features, synthesis
from nd_utils.backends import configured
from nd_utils import trust_metrics as tm
from nd_utils.backends.vlm import VisionLanguageModel
from nd_utils.image_features import image_feature_jobs_if_missing
from nd_utils.label_trust import layer_trust, trust_layers
from nd_utils.store import ArtifactStore
from nd_utils.trust_scoring import TrustSettings, fit_simulator, trust_split

COLOURS = {"red": 0, "green": 1, "blue": 2}


# ---------------------------------------------------------------- the arithmetic

def _fixture(seed=0, h=80, k=7, d=5, r=40):
    g = torch.Generator().manual_seed(seed)
    feats = nn.functional.normalize(torch.randn(h, d, generator=g), dim=1)
    labels = nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    null = nn.functional.normalize(torch.randn(r, d, generator=g), dim=1)
    acts = feats @ labels.T * torch.linspace(0, 3, k) + torch.randn(h, k, generator=g)
    return feats, labels, null, acts


def test_heldout_and_null_correlations_are_pearson_of_the_simulated_activations():
    feats, labels, null, acts = _fixture()
    a, b = 7.5, -0.2
    r = tm.heldout_correlations(feats, labels, acts, a, b, chunk=3)
    nulls = tm.null_correlations(feats, null, acts, a, b, chunk=3)
    for k in range(acts.shape[1]):
        pred = 1 / (1 + np.exp(-a * ((feats @ labels[k]).double().numpy() + b)))
        assert r[k].item() == pytest.approx(stats.pearsonr(pred, acts[:, k].numpy())[0], abs=1e-6)
        for j in (0, 17, 39):
            pj = 1 / (1 + np.exp(-a * ((feats @ null[j]).double().numpy() + b)))
            assert nulls[k, j].item() == pytest.approx(np.corrcoef(pj, acts[:, k].numpy())[0, 1],
                                                       abs=1e-6)


def test_a_constant_neuron_has_no_r_and_no_p():
    feats, labels, null, acts = _fixture()
    acts[:, 2] = 0.5                                    # a dead neuron
    r = tm.heldout_correlations(feats, labels, acts, 5, 0)
    p = tm.permutation_p(r, tm.null_correlations(feats, null, acts, 5, 0))
    assert torch.isnan(r[2]) and torch.isnan(p[2]) and torch.isfinite(r[[0, 1, 3]]).all()


def test_permutation_p_counts_nulls_at_least_as_large():
    r = torch.tensor([0.3, 0.9, -0.5])
    null = torch.tensor([[0.1, 0.3, 0.5, float("nan")], [0.1, 0.3, 0.5, 0.2], [0.1, 0.3, 0.5, 0.2]])
    # ties count against the label; a NaN null (constant prediction) is no draw
    assert tm.permutation_p(r, null).tolist() == pytest.approx([3 / 4, 1 / 5, 5 / 5])


def test_benjamini_hochberg_matches_scipy():
    p = torch.from_numpy(np.random.default_rng(0).uniform(0, 0.2, 50) ** 2)
    assert np.allclose(tm.benjamini_hochberg(p).numpy(), stats.false_discovery_control(p.numpy()))
    # a NaN p is a test with p = 1 that keeps its NaN
    p[3] = float("nan")
    q = tm.benjamini_hochberg(p)
    filled = p.clone()
    filled[3] = 1.0
    expected = stats.false_discovery_control(filled.numpy())
    assert torch.isnan(q[3]) and np.allclose(np.delete(q.numpy(), 3), np.delete(expected, 3))


def test_cosy_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    control = torch.from_numpy(rng.integers(0, 6, (30, 9)).astype(np.float32))   # many ties
    concept = torch.from_numpy(rng.integers(2, 8, (7, 9)).astype(np.float32))
    auc = tm.cosy_auc(control, concept, chunk=4)
    for k in range(9):
        y = np.r_[np.zeros(30), np.ones(7)]
        s = np.r_[control[:, k].numpy(), concept[:, k].numpy()]
        assert auc[k].item() == pytest.approx(roc_auc_score(y, s))
    assert torch.isnan(tm.cosy_auc(control, concept[:0])).all()


# ---------------------------------------------------------------- the stage, planted

class PlantedVLM(VisionLanguageModel):
    """An image is its mean RGB beside five colour-free texture statistics (differences between
    pixels of one channel); a colour word is that colour's axis, any other word a fixed direction
    (seeded by the text) mostly in the texture part, so the concept set has real distractors that
    predict no colour."""

    def __init__(self):
        self.name, self.backend_id = "planted", "planted-v1"
        self.preprocess = T.Compose([T.Resize((8, 8)), T.ToTensor()])
        self.metadata = {"embed_dim": 8}

    def encode_images(self, batch):
        texture = (batch[:, :, 0, :5] - batch[:, :, 7, :5]).sum(1)
        return nn.functional.normalize(torch.cat([batch.mean((2, 3)), texture], dim=1), dim=1)

    def encode_texts(self, texts, batch_size=256, template=None):
        rows = []
        for t in texts:
            hit = [c for c in COLOURS if c in t.split()]
            if hit:
                rows.append(nn.functional.one_hot(torch.tensor(COLOURS[hit[0]]), 8).float())
            else:
                g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
                v = torch.randn(8, generator=g)
                rows.append(torch.cat([0.15 * v[:3], v[3:]]))
        return nn.functional.normalize(torch.stack(rows), dim=1)

    def to(self, device):
        return self

    @property
    def device(self):
        return torch.device("cpu")


class ColourNeurons(nn.Module):
    """Neurons 0-2: the image's mean red, green, blue; neuron 3: a difference of two pixels
    inside the image, which neither a colour nor the VLM's texture statistics predict."""

    def __init__(self):
        super().__init__()
        self.act = nn.Identity()
        self.gain = nn.Parameter(torch.ones(()), requires_grad=False)   # a model has weights

    def forward(self, x):
        pixel = (x[:, :, 5, 5] - x[:, :, 6, 6]).sum(1, keepdim=True)
        return self.act(self.gain * torch.cat([x.mean((2, 3)), pixel], dim=1))


def _colour_folder(root, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        main = list(COLOURS)[i % 3]
        arr = rng.integers(0, 120, (12, 12, 3), dtype=np.uint8)
        arr[..., COLOURS[main]] = rng.integers(60, 256)
        (root / main).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / main / f"{seed}_{i:03d}.png")
    return root


@pytest.fixture
def planted(tmp_path, monkeypatch):
    probe_dir = _colour_folder(tmp_path / "probe", 90, seed=0)
    pool_dir = _colour_folder(tmp_path / "pool", 45, seed=1)
    words = [f"word{i}" for i in range(60)]
    (tmp_path / "concepts.txt").write_text("\n".join(["red", "green", "blue", *words]) + "\n")
    cfg = nd.load_config("offline", [
        f"data_dir={tmp_path / 'store'}", "target.layers=[act]", "device=cpu",
        "target.name=colours", f"probe.sets=[{{name: folder, path: {probe_dir}}}]",
        f"synthesis.pool=[{{name: folder, path: {pool_dir}}}]", "activations.top_k=4",
        f"clip_dissect.concept_set={tmp_path / 'concepts.txt'}",
        "clip_dissect.similarity=soft_wpmi", "clip_dissect.hyperparameters={top_k: 10}",
        "trust.null_concepts=60", "trust.cosy_images=5"])
    vlm = PlantedVLM()
    for module in (clip_dissect, image_features, synthesis):
        monkeypatch.setattr(module, "load_vlm_from_config", lambda cfg: vlm)
    monkeypatch.setattr(configured, "load_vlm_from_config", lambda cfg: vlm)   # trust's VLM
    target = nd.from_module(ColourNeurons(), T.Compose([T.Resize((12, 12)), T.ToTensor()]),
                            name="colours")
    probe = nd.load_probe_from_config(cfg)
    nd.cache_activations(cfg, target=target, probe=probe,
                         extra_jobs=image_feature_jobs_if_missing(cfg, probe), progress=False)
    return cfg, probe, target


def test_planted_colour_neurons_are_trusted_and_the_pixel_neuron_is_not(planted):
    cfg, probe, target = planted
    labels = nd.dissect_layer(cfg, "act", probe=probe, target=target)
    trust = layer_trust(cfg, "act", probe=probe, target=target)
    assert list(trust.trust_label[:3]) == ["red", "green", "blue"]
    assert (trust.heldout_r[:3] > 0.8).all()
    # at most the neuron's own concept among the 60 random ones predicts it as well (p = 2/61)
    assert (trust.heldout_p[:3] <= 2 / 61 + 1e-12).all()
    assert (trust.cosy_auc[:3] > 0.9).all() and (trust.n_cosy_images[:3] == 5).all()
    assert trust.heldout_p[3] > 0.05 and trust.heldout_q[3] >= trust.heldout_p[3]
    tables, summary = trust_layers(cfg, {"act": labels}, probe=probe, target=target)
    t = tables["act"]
    assert t.trusted.tolist() == [True, True, True, False]
    assert t.trust_label_agrees[:3].all()
    row = summary.iloc[0]
    assert (row.n_trusted, row.n_neurons, row.n_heldout_images, row.n_null_concepts) == (3, 4, 45, 60)
    # the simulator was fitted on the select half's class labels (the folder names)
    assert trust.attrs["calibration"]["fitted"] and trust.attrs["calibration"]["n_concepts"] == 3


def test_trust_settings_recompute_trust_only_and_alpha_recomputes_nothing(planted):
    cfg, probe, target = planted
    store = ArtifactStore(cfg.data_dir)
    labels = nd.dissect_layer(cfg, "act", probe=probe, target=target)
    first = layer_trust(cfg, "act", probe=probe, target=target)
    n_labels = len(list(store.find("02_clip_dissect")))
    layer_trust(cfg.with_overrides({"trust.alpha": 0.2}), "act", probe=probe, target=target)
    assert len(list(store.find("02_label_trust"))) == 1            # alpha decides no cache
    other = cfg.with_overrides({"trust.null_concepts": 30, "trust.cosy": False})
    again = nd.dissect_layer(other, "act", probe=probe, target=target)
    second = layer_trust(other, "act", probe=probe, target=target)
    assert len(list(store.find("02_clip_dissect"))) == n_labels    # no label recomputed
    assert len(list(store.find("02_label_trust"))) == 2
    pd.testing.assert_frame_equal(labels, again)
    assert second.cosy_auc.isna().all() and np.allclose(second.heldout_r, first.heldout_r)
    # the same inputs give the same bytes
    forced = layer_trust(cfg, "act", probe=probe, target=target, force=True)
    pd.testing.assert_frame_equal(forced, first)


def test_dnd_labels_are_scored_without_their_own_top_images(planted):
    from nd_utils.label_trust import dnd_layer_trust

    cfg, probe, target = planted

    class Top:  # the D_top of neuron 0 is three of the held-out images
        key = "0" * 16
        held = trust_split(len(probe), 0.5, 0)[1]

        def d_top(self, unit):
            return pd.DataFrame({"image_id": self.held[:3] if unit == 0 else []})

    labels = pd.DataFrame({"Neuron ID": [0, 3], "Label 1": ["red", "word7"]})
    t = dnd_layer_trust(cfg, "act", labels, Top(), "1" * 16, probe=probe, target=target)
    assert t["n_heldout_images"].tolist() == [42, 45]
    assert t.heldout_r[0] > 0.8 and t.heldout_p[0] <= 2 / 61 + 1e-12
    assert t.cosy_auc[0] > 0.9 and t.heldout_p[1] > 0.05


def test_bad_trust_settings_name_the_key():
    with pytest.raises(nd.ConfigError, match="trust.heldout"):
        nd.load_config("offline", ["trust.heldout=1.5"])
    cfg = nd.load_config("offline")
    cfg.set("trust", {"heldout": 0.5, "nul_concepts": 3})
    with pytest.raises(nd.ConfigError, match="nul_concepts"):
        TrustSettings.from_config(cfg)


def test_fit_simulator_without_two_classes_falls_back_to_the_raw_cosine():
    class Probe:
        labels = ["", "cat", "", "cat"]

    out = fit_simulator(Probe(), [0, 1, 2, 3], torch.eye(4), lambda: pytest.fail("no VLM"))
    assert (out["a"], out["b"], out["fitted"]) == (1.0, 0.0, False)


def test_cosy_images_from_a_registered_synthesizer_go_through_stages_05_and_06(planted,
                                                                               monkeypatch):
    """Any backend other than `retrieve` (diffusers, a user's) makes CoSy's images through the
    stage-05 cache and scores them through stage 06's target pass."""
    from nd_utils.backends import synthesizers
    from nd_utils.registry import _Entry

    class Painter:  # paints the colour its prompt names, with seeded texture
        backend_id, prompts = "painter-v1", []

        def generate(self, prompt, seeds):
            Painter.prompts.append(prompt)
            hit = [c for c in COLOURS if c in prompt.split()]
            out = []
            for s in seeds:
                arr = np.random.default_rng(s).integers(0, 120, (12, 12, 3), dtype=np.uint8)
                if hit:
                    arr[..., COLOURS[hit[0]]] = 250
                out.append((Image.fromarray(arr), "ok", {"seed": s}))
            return out

    monkeypatch.setitem(synthesizers.SYNTHESIZERS.entries, "painter",
                        _Entry(lambda: Painter()))
    cfg, probe, target = planted
    cfg = cfg.with_overrides({"synthesis.name": "painter"})
    nd.dissect_layer(cfg, "act", probe=probe, target=target)
    trust = layer_trust(cfg, "act", probe=probe, target=target)
    assert (trust.n_cosy_images == 5).all()
    assert (trust.cosy_auc[:3] > 0.9).all()
    assert "realistic photo of a close up of red" in Painter.prompts   # quality.cosy_prompt
    assert len(list(ArtifactStore(cfg.data_dir).find("05_concept_images"))) == len(
        set(trust.trust_label))
