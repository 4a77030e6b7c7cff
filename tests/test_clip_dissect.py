"""Stage 02 wiring: cached image/text features, keys, label tables, bad inputs."""
import pytest
import torch
from torchvision import transforms as T

import nd_utils as nd
from nd_utils.stages.activations import activation_key
from nd_utils.stages.clip_dissect import load_concepts_from_config, load_vlm_from_config
from nd_utils.stages.image_features import image_feature_jobs_if_missing, load_image_features
from nd_utils.errors import MissingArtifactError, UnknownNameError
from nd_utils.similarity import get_similarity
from nd_utils.backends.vlm import VisionLanguageModel
from nd_utils.stages import clip_dissect, image_features
from nd_utils.store import ArtifactStore
from test_activations import PRE, Tiny, make_folder


class ColourVLM(VisionLanguageModel):
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
    for module in (clip_dissect, image_features):  # each stage module builds its model
        monkeypatch.setattr(module, "load_vlm_from_config", lambda cfg: vlm)
    torch.manual_seed(0)
    target = nd.from_module(Tiny(), PRE, name="tiny")
    probe = nd.load_probe_from_config(cfg)
    nd.cache_activations(cfg, target=target, probe=probe,
                         extra_jobs=image_feature_jobs_if_missing(cfg, probe), progress=False)
    return cfg, probe, vlm, target


def test_labels_match_a_direct_computation(wired):
    cfg, probe, vlm, target = wired
    concepts = load_concepts_from_config(cfg)
    assert list(concepts) == ["red", "green", "blue"]  # the blank line shifts nothing
    table = nd.dissect_layer(cfg, "act", probe=probe, target=target, concepts=concepts)
    acts = nd.load_activations(cfg, "act", probe=probe, target=target)
    feats = load_image_features(cfg, probe)
    P = feats @ vlm.encode_texts(list(concepts)).T
    sim = get_similarity("soft_wpmi")(P, acts.activations, top_k=3)
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
    concepts = load_concepts_from_config(cfg)
    assert clip_dissect.label_key(other, "act", probe, concepts, target) != \
        clip_dissect.label_key(cfg, "act", probe, concepts, target)
    assert activation_key(other, "act", probe, target) == activation_key(cfg, "act", probe, target)
    nd.dissect_layer(other, "act", probe=probe, target=target)
    assert vlm.text_calls == calls  # text features do not depend on the similarity function


def test_missing_image_features_name_notebook_01(wired, tmp_path):
    cfg, probe, _, target = wired
    fresh = cfg.with_overrides({"data_dir": str(tmp_path / "empty")})
    with pytest.raises(MissingArtifactError, match="01_activation_caching"):
        nd.dissect_layer(fresh, "act", probe=probe, target=target)


def test_unknown_similarity_and_count_mismatch(wired):
    cfg, probe, _, target = wired
    with pytest.raises(UnknownNameError, match="soft_wpmi"):
        nd.dissect_layer(cfg.with_overrides({"clip_dissect.similarity": "soft_wmpi"}), "act",
                         probe=probe, target=target)
    P = torch.rand(12, 3)
    with pytest.raises(nd.NdUtilsError, match="12"):
        get_similarity("soft_wpmi")(P, torch.rand(11, 4))


def test_nonfinite_activations_name_layer_and_neuron():
    A = torch.rand(20, 5)
    A[3, 2] = float("nan")
    with pytest.raises(nd.NdUtilsError) as err:
        get_similarity("wpmi")(torch.rand(20, 4), A, top_k=5, layer="layer4")
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


def test_concept_set_smaller_than_top_n(wired, tmp_path):
    """3 concepts, top_n = 5: concept_1..3 everywhere, no KeyError 'concept_4'."""
    import pandas as pd
    cfg, probe, _, target = wired
    assert cfg["clip_dissect.top_n"] == 5
    table = nd.dissect_layer(cfg, "act", probe=probe, target=target)
    assert clip_dissect.n_concept_columns(table) == 3 and "concept_4" not in table
    paths = nd.write_label_tables(cfg, tmp_path, {"act": table})
    written = pd.read_csv(paths["act"], keep_default_na=False)
    assert [c for c in written.columns if c.startswith(("concept_", "score_"))] == [
        "concept_1", "score_1", "concept_2", "score_2", "concept_3", "score_3"]
    assert (written.score_1 >= written.score_2).all() and (written.score_2 >= written.score_3).all()
    assert {*written.concept_1, *written.concept_2, *written.concept_3} <= {"red", "green", "blue"}
    acts = nd.load_activations(cfg, "act", probe=probe, target=target)
    fig = nd.viz.plot_neuron_labels(acts, probe, table, [0, 1], save=tmp_path / "labels.png")
    assert (tmp_path / "labels.png").stat().st_size > 0
    bars = [len(ax.patches) for ax in fig.axes if ax.patches]
    assert bars == [3, 3]                                       # every concept, no padding


def test_one_concept_set(wired, tmp_path):
    cfg, probe, _, target = wired
    (tmp_path / "one.txt").write_text("\n\ngreen\n")
    one = cfg.with_overrides({"clip_dissect.concept_set": str(tmp_path / "one.txt")})
    table = nd.dissect_layer(one, "act", probe=probe, target=target)
    assert clip_dissect.n_concept_columns(table) == 1 and set(table.description) == {"green"}
    nd.write_label_tables(one, tmp_path, {"act": table})


def test_zero_concepts_after_cleaning_names_the_file(wired, tmp_path):
    cfg, probe, _, target = wired
    (tmp_path / "stop.txt").write_text("the\nof\n")
    bad = cfg.with_overrides({"clip_dissect.concept_set": str(tmp_path / "stop.txt"),
                              "clip_dissect.clean": {"drop_stopwords": True}})
    with pytest.raises(nd.NdUtilsError, match=r"stop\.txt\) is empty after cleaning"):
        nd.dissect_layer(bad, "act", probe=probe, target=target)


def test_rank_reorder_never_labels_a_concept_with_negative_cosines(wired, tmp_path, monkeypatch):
    """'not red' has a negative cosine with every image: its rank_reorder score was NaN, which
    torch.topk ranks first, so it labelled every neuron. Now it scores the floor, last."""
    import math

    import pandas as pd
    cfg, probe, vlm, target = wired
    monkeypatch.setitem(ColourVLM.COLOURS, "not red", [-1.0, -0.2, -0.2])
    (tmp_path / "neg.txt").write_text("not red\nred\ngreen\nblue\n")
    rr = cfg.with_overrides({"clip_dissect.concept_set": str(tmp_path / "neg.txt"),
                             "clip_dissect.similarity": "rank_reorder",
                             "clip_dissect.hyperparameters": {"top_fraction": 0.25}})
    table = nd.dissect_layer(rr, "act", probe=probe, target=target)
    assert "not red" not in set(table.description)
    assert (table.concept_4 == "not red").all()
    assert (table.score_4 == nd.similarity_formulas.RANK_REORDER_FLOOR).all()
    assert all(math.isfinite(s) for c in ("similarity", "score_1", "score_4") for s in table[c])
    written = pd.read_csv(nd.write_label_tables(rr, tmp_path, {"act": table})["act"])
    assert all(math.isfinite(s) for s in written.score_4)     # CSV round trip keeps it finite
    acts = nd.load_activations(rr, "act", probe=probe, target=target)
    fig = nd.viz.plot_neuron_labels(acts, probe, table, [0])
    bar_ax = [ax for ax in fig.axes if ax.patches][0]
    assert len(bar_ax.patches) == 3 and bar_ax.get_xlim()[0] > -100   # floor left out


def test_text_features_reuse_whole_cached_batches_bit_for_bit(tmp_path):
    """A concept list that starts like a cached one (words-10k inside words-20k) reuses the
    cached rows of the whole batches they share and encodes only the rest; the result equals
    encoding the list directly, bit for bit, with the real offline text encoder."""
    words = list(nd.load_concept_set("words-3k"))[:600]
    short = words[:2 * clip_dissect.TEXT_BATCH + 8]
    (tmp_path / "long.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "short.txt").write_text("\n".join(short) + "\n")
    cfg = nd.load_config("offline", [f"data_dir={tmp_path / 'store'}", "device=cpu"])
    vlm = load_vlm_from_config(cfg)
    clip_dissect.cache_text_features(cfg, nd.load_concept_set(str(tmp_path / "long.txt")), vlm)
    encoded = []
    real = vlm.encode_texts
    vlm.encode_texts = lambda texts, **kw: encoded.append(len(texts)) or real(texts, **kw)
    got = clip_dissect.cache_text_features(cfg, nd.load_concept_set(str(tmp_path / "short.txt")),
                                           vlm)
    assert encoded == [8]                                   # two whole batches were reused
    # encoded vlm.batch_size (64 here) at a time; a cached batch of 256 would reuse as much
    assert torch.equal(got, real(short, batch_size=int(cfg["vlm.batch_size"])).float())
    # another template is another encoding: nothing is reused
    encoded.clear()
    clip_dissect.cache_text_features(cfg.with_overrides({"clip_dissect.template": "a photo of {}"}),
                                     nd.load_concept_set(str(tmp_path / "short.txt")), vlm)
    assert encoded == [len(short)]


class SpyVLM(ColourVLM):
    """ColourVLM through the base class's text batching, recording every encoder call's size."""

    def __init__(self):
        super().__init__()
        self.image_batches, self.text_batches = [], []

    def encode_images(self, batch):
        self.image_batches.append(len(batch))
        return super().encode_images(batch)

    encode_texts = VisionLanguageModel.encode_texts

    def _encode_texts(self, texts):
        self.text_batches.append(len(texts))
        return torch.tensor([[1.0, len(t), i] for i, t in enumerate(texts)])


def test_vlm_batch_size_drives_text_and_image_encoder_calls(tmp_path, monkeypatch):
    """vlm.batch_size sets the VLM's batches: texts of stage 02 and images of stage 01's shared
    pass (cut by activations.batch_size, split again for the VLM), and of stage 06's pass
    over concept images; it is in no key."""
    from nd_utils.stages.selection import concept_activation_unit

    folder = make_folder(tmp_path / "imgs", n=12, corrupt=False)
    words = ["red", "green", "blue", "cyan", "pink", "gold", "grey"]
    (tmp_path / "words.txt").write_text("\n".join(words) + "\n")
    cfg = nd.load_config("offline", [
        f"data_dir={tmp_path / 'store'}", "target.layers=[act]", "device=cpu", "target.name=tiny",
        f"probe.sets=[{{name: folder, path: {folder}}}]", "activations.top_k=4",
        f"clip_dissect.concept_set={tmp_path / 'words.txt'}", "vlm.batch_size=3",
        "activations.batch_size=32", "clip_dissect.hyperparameters={top_k: 3}"])
    vlm = SpyVLM()
    for module in (clip_dissect, image_features):
        monkeypatch.setattr(module, "load_vlm_from_config", lambda cfg: vlm)
    target = nd.from_module(Tiny(), PRE, name="tiny")
    probe = nd.load_probe_from_config(cfg)
    nd.cache_activations(cfg, target=target, probe=probe,
                         extra_jobs=image_feature_jobs_if_missing(cfg, probe), progress=False)
    assert vlm.image_batches == [3, 3, 3, 3]       # one pass batch of 12, encoded 3 at a time
    nd.dissect_layer(cfg, "act", probe=probe, target=target)
    assert vlm.text_batches == [3, 3, 1]
    art = ArtifactStore(cfg.data_dir).find(clip_dissect.TEXT_STAGE.name)[0]
    assert art.manifest["text_batch_size"] == 3
    # the trace of stage 06 cuts activations.batch_size; the VLM takes at most vlm.batch_size
    vlm.image_batches.clear()
    files = [it.path for it in probe.items]
    _, feats = concept_activation_unit(cfg.with_overrides({"activations.batch_size": 5}),
                                       ("act",), True, files, target=target, vlm=vlm)
    assert vlm.image_batches == [3, 2, 3, 2, 2] and feats.shape == (12, 3)
    # a batch size changes no key (as activations.batch_size does not)
    other = cfg.with_overrides({"vlm.batch_size": 256})
    concepts = load_concepts_from_config(cfg)
    assert image_features.image_feature_key(other, probe) == \
        image_features.image_feature_key(cfg, probe)
    assert clip_dissect.text_feature_key(other, concepts) == \
        clip_dissect.text_feature_key(cfg, concepts)


def test_vlm_dtype_enters_feature_keys_only_when_not_float32(wired):
    from nd_utils.stage_cache import stage_output

    cfg, probe, _, target = wired
    concepts = load_concepts_from_config(cfg)
    # float32 keys are the keys computed before vlm.dtype existed
    before = stage_output(image_features.IMAGE_STAGE, cfg.select(image_features.IMAGE_STAGE.reads),
                          inputs={"probe_fingerprint": probe.fingerprint}).key
    assert image_features.image_feature_key(cfg, probe) == before
    legacy = cfg.to_dict()
    del legacy["vlm"]["dtype"]  # a config written before the key existed
    old_cfg = type(cfg)(legacy, cfg.source)
    assert old_cfg.get("vlm.dtype") is None
    assert image_features.image_feature_key(old_cfg, probe) == before
    assert clip_dissect.text_feature_key(old_cfg, concepts) == \
        clip_dissect.text_feature_key(cfg, concepts)
    half = cfg.with_overrides({"vlm.dtype": "float16"})
    assert image_features.image_feature_key(half, probe) != before
    assert clip_dissect.text_feature_key(half, concepts) != \
        clip_dissect.text_feature_key(cfg, concepts)
    assert clip_dissect.label_key(half, "act", probe, concepts, target) != \
        clip_dissect.label_key(cfg, "act", probe, concepts, target)


def test_cached_text_batches_are_reused_only_at_the_same_batch_size(tmp_path):
    words = ["red", "green", "blue", "cyan", "pink", "gold", "grey"]
    (tmp_path / "long.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "short.txt").write_text("\n".join(words[:6] + ["teal"]) + "\n")
    cfg = nd.load_config("offline", [f"data_dir={tmp_path / 'store'}", "vlm.batch_size=3"])
    long, short = (nd.load_concept_set(str(tmp_path / f)) for f in ("long.txt", "short.txt"))
    vlm = SpyVLM()
    clip_dissect.cache_text_features(cfg, long, vlm)
    vlm.text_batches.clear()
    clip_dissect.cache_text_features(cfg.with_overrides({"vlm.batch_size": 2}), short, vlm)
    assert vlm.text_batches == [2, 2, 2, 1]           # batches of 3 are not batches of 2
    ArtifactStore(cfg.data_dir).remove(clip_dissect.TEXT_STAGE.name,
                                       clip_dissect.text_feature_key(cfg, short))
    vlm.text_batches.clear()
    got = clip_dissect.cache_text_features(cfg, short, vlm)
    assert vlm.text_batches == [1]                    # two whole batches of 3 reused
    assert torch.equal(got, vlm.encode_texts(list(short), batch_size=3).float())
