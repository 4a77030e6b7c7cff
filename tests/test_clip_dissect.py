"""Stage 02 wiring: cached image/text features, keys, label tables, bad inputs."""
import pytest
import torch
from torchvision import transforms as T

import nd_utils as nd
from nd_utils import clip_dissect
from nd_utils.store import ArtifactStore
from test_activations import PRE, Tiny, make_folder


class ColourVLM(nd.VisionLanguageModel):
    """A transparent stand-in VLM: an image is its mean RGB, a concept names a colour."""

    COLOURS = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0]}

    def __init__(self):
        self.name = "colour"
        self.backend_id = "colour-v1"
        self.preprocess = T.Compose([T.Resize((8, 8)), T.ToTensor()])
        self.metadata = {"embed_dim": 3}
        self.text_calls = 0

    def encode_images(self, batch):
        return torch.nn.functional.normalize(batch.mean((2, 3)), dim=1)

    def encode_texts(self, texts, batch_size=256, template=None):
        self.text_calls += 1
        return torch.nn.functional.normalize(torch.tensor([self.COLOURS[t] for t in texts]), dim=1)

    def to(self, device):
        return self

    @property
    def device(self):
        return torch.device("cpu")


@pytest.fixture
def wired(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs", n=12, corrupt=False)
    (tmp_path / "colours.txt").write_text("red\ngreen\n\nblue\n")
    cfg = nd.load_config("offline", [
        f"data_dir={tmp_path / 'store'}", "target.layers=[act]", "device=cpu", "target.name=tiny",
        f"probe.sets=[{{name: folder, path: {folder}}}]", "activations.top_k=4",
        f"clip_dissect.concept_set={tmp_path / 'colours.txt'}",
        "clip_dissect.hyperparameters={top_k: 3}"])
    vlm = ColourVLM()
    monkeypatch.setattr(clip_dissect, "load_vlm_from_config", lambda cfg: vlm)
    torch.manual_seed(0)
    target = nd.from_module(Tiny(), PRE, name="tiny")
    probe = nd.load_probe_from_config(cfg)
    nd.cache_activations(cfg, target=target, probe=probe,
                         extra_jobs=nd.image_feature_jobs_if_missing(cfg, probe), progress=False)
    return cfg, probe, vlm, target


def test_labels_match_a_direct_computation(wired):
    cfg, probe, vlm, target = wired
    concepts = nd.load_concepts_from_config(cfg)
    assert list(concepts) == ["red", "green", "blue"]  # the blank line shifts nothing
    table = nd.dissect_layer(cfg, "act", probe=probe, target=target, concepts=concepts)
    acts = nd.load_activations(cfg, "act", probe=probe, target=target)
    feats = nd.load_image_features(cfg, probe)
    P = feats @ vlm.encode_texts(list(concepts)).T
    sim = nd.SIMILARITY_FUNCTIONS["soft_wpmi"](P, acts.activations, top_k=3)
    assert list(table.description) == [concepts[int(i)] for i in sim.argmax(1)]
    assert torch.allclose(torch.tensor(table.similarity.values, dtype=torch.float32),
                          sim.max(1).values, atol=1e-5)
    assert list(table.columns[:4]) == ["layer", "unit", "description", "similarity"]


def test_text_features_and_labels_are_cached(wired):
    cfg, probe, vlm, target = wired
    nd.dissect_layer(cfg, "act", probe=probe, target=target)
    calls = vlm.text_calls
    nd.dissect_layer(cfg, "act", probe=probe, target=target)
    assert vlm.text_calls == calls  # nothing re-encoded
    with pytest.raises(nd.ConfigError, match="min_norm"):
        nd.dissect_layer(cfg.with_overrides({"clip_dissect.similarity": "cos_similarity_cubed"}),
                         "act", probe=probe, target=target)
    other = cfg.with_overrides({"clip_dissect.similarity": "cos_similarity_cubed",
                                "clip_dissect.hyperparameters": {}})
    concepts = nd.load_concepts_from_config(cfg)
    assert clip_dissect.label_key(other, "act", probe, concepts, target) != \
        clip_dissect.label_key(cfg, "act", probe, concepts, target)
    assert nd.activation_key(other, "act", probe, target) == nd.activation_key(cfg, "act", probe, target)
    nd.dissect_layer(other, "act", probe=probe, target=target)
    assert vlm.text_calls == calls  # text features do not depend on the similarity function


def test_missing_image_features_name_notebook_01(wired, tmp_path):
    cfg, probe, _, target = wired
    fresh = cfg.with_overrides({"data_dir": str(tmp_path / "empty")})
    with pytest.raises(nd.MissingArtifactError, match="01_activation_caching"):
        nd.dissect_layer(fresh, "act", probe=probe, target=target)


def test_unknown_similarity_and_count_mismatch(wired):
    cfg, probe, _, target = wired
    with pytest.raises(nd.UnknownNameError, match="soft_wpmi"):
        nd.dissect_layer(cfg.with_overrides({"clip_dissect.similarity": "soft_wmpi"}), "act",
                         probe=probe, target=target)
    P = torch.rand(12, 3)
    with pytest.raises(nd.NdUtilsError, match="12"):
        nd.SIMILARITY_FUNCTIONS["soft_wpmi"](P, torch.rand(11, 4))


def test_nonfinite_activations_name_layer_and_neuron():
    A = torch.rand(20, 5)
    A[3, 2] = float("nan")
    with pytest.raises(nd.NdUtilsError) as err:
        nd.SIMILARITY_FUNCTIONS["wpmi"](torch.rand(20, 4), A, top_k=5, layer="layer4")
    assert "layer4" in str(err.value) and "2" in str(err.value)


def test_label_table_writes_top_n(wired, tmp_path):
    cfg, probe, _, target = wired
    table = nd.dissect_layer(cfg, "act", probe=probe, target=target)
    paths = nd.write_label_tables(cfg.with_overrides({"clip_dissect.top_n": 2}), tmp_path,
                                  {"act": table})
    import pandas as pd
    written = pd.read_csv(paths["act"])
    assert list(written.columns) == ["layer", "unit", "description", "similarity", "concept_1",
                                     "score_1", "concept_2", "score_2"]
