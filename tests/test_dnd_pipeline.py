"""Describe-and-Dissect stages 03-06 on real offline models, and the blip/diffusers backends."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import nd_utils as nd
from nd_utils.backends.captioners import list_captioners
from nd_utils.errors import UnknownNameError
from nd_utils.backends.language_models import list_language_models
from nd_utils.store import ArtifactStore
from nd_utils.stages.synthesis import load_synthesizer_from_config
from nd_utils.stages.top_images import build_top_images, choose_neurons
from nd_utils.backends.captioners import BlipCaptioner
from nd_utils.stages.captions import caption_images
from nd_utils.errors import MissingArtifactError, NdUtilsError
from nd_utils.jsonl_cache import JsonlCache
from nd_utils.backends.synthesizers import DiffusersSynthesizer, image_status
from nd_utils.stages.synthesis import concept_images

ODD = 'a "quoted"\nconcept ' + "x" * 190  # quotes, a newline, 200+ characters


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    store = tmp_path_factory.mktemp("dnd-store")
    cfg = nd.load_config("offline", [
        f"data_dir={store}", "device=cpu", "probe.limit=24", "target.layers=[head, fc]",
        "dnd.layers=[head, fc]", "dnd.neurons=[0, 3]", "dnd.top_k=5", "activations.top_k=8",
        "llm.name=keywords", "llm.summaries=3", "synthesis.images_per_concept=4",
        "synthesis.pool=[{name: offline-sample}]"])
    nd.cache_activations(cfg, progress=False)
    return cfg


def test_whole_chain_writes_reference_schema(small_cfg, tmp_path):
    cfg = small_cfg
    tops = nd.dnd_top_images(cfg, progress=False)
    head, fc = tops["head"], tops["fc"]
    assert head.neurons == [0, 3]
    assert (head.items.kind == "crop").any() and not (fc.items.kind == "crop").any()
    for unit in head.neurons:
        d = head.d_top(unit)
        assert len(d) == 5 and d.activation.is_monotonic_decreasing
    sel = nd.dnd_selection(cfg, progress=False)
    paths = nd.write_dnd_tables(tmp_path, sel)
    for layer, s in sel.items():
        labels = pd.read_csv(paths[layer], keep_default_na=False)
        assert list(labels.columns) == ["Neuron ID", "Label 1", "Label 2", "Label 3"]
        assert list(labels["Neuron ID"]) == [0, 3]
        assert (labels["Label 1"] != "").all()
        cand = pd.read_csv(tmp_path / f"06_dnd_candidates_{layer}.csv", keep_default_na=False)
        assert {"mean", "topk_sq_mean", "image_products", "topk_compare", "images"} <= set(
            cand.columns)
    # one target pass covers every usable image of every distinct candidate of both layers
    keys = {s.manifest["upstream"]["06_concept_activations"] for s in sel.values()}
    assert len(keys) == 1
    acts = ArtifactStore(cfg.data_dir).open("06_concept_activations", keys.pop())
    index = pd.read_csv(acts.file("index.csv"), keep_default_na=False)
    ranked = pd.concat([s.candidates[s.candidates["rank"] > 0] for s in sel.values()])
    assert set(index.concept) == set(ranked.candidate)
    assert len(index) == ranked.drop_duplicates("candidate").n_images.sum()
    assert acts.manifest["params"]["layers"] == ["head", "fc"]


def test_rerun_reads_everything_from_the_cache(small_cfg, monkeypatch):
    nd.dnd_selection(small_cfg, progress=False)

    def boom(*a, **k):
        raise AssertionError("a model was loaded although every stage is cached")

    monkeypatch.setattr("nd_utils.stages.top_images.load_target_from_config", boom)
    monkeypatch.setattr("nd_utils.stages.dnd.load_captioner_from_config", boom)
    monkeypatch.setattr("nd_utils.stages.dnd.language_model_from_config", boom)
    first = nd.dnd_concepts(small_cfg, progress=False)
    again = nd.dnd_concepts(small_cfg, progress=False)
    assert first["head"].key == again["head"].key


def test_concepts_are_synthesised_once_across_neurons(small_cfg):
    class Counting:
        backend_id = "counting-v1"

        def __init__(self):
            self.prompts = []

        def generate(self, prompt, seeds):
            self.prompts.append(prompt)
            return [(Image.new("RGB", (32, 32), (s * 40 % 255, 90, 30)).point(
                lambda v, s=s: (v + 7 * s) % 255), "ok", {"seed": s}) for s in seeds]

    synth = Counting()
    images, stats = concept_images(small_cfg, ["dog", "cat", "dog", ODD], synth,
                                   progress=False)
    assert stats == {"concepts": 3, "synthesised": 3, "reused": 0, "requested": 4,
                     "backend": "counting-v1", "pool_source": None}
    assert len(synth.prompts) == 3 and synth.prompts[0] == "One realistic image of dog"
    images2, stats2 = concept_images(small_cfg, ["dog", ODD], synth, progress=False)
    assert stats2["synthesised"] == 0 and len(synth.prompts) == 3
    assert images2[ODD].key == images[ODD].key and len(images2[ODD].files()) == 4


def test_blank_and_nsfw_images_are_excluded(small_cfg):
    class Bad:
        backend_id = "bad-v1"

        def generate(self, prompt, seeds):
            blank = Image.new("RGB", (32, 32), (128, 128, 128))
            noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3),
                                                                       dtype=np.uint8))
            return [(blank, image_status(blank), {}), (noisy, image_status(noisy, nsfw=True),
                                                       {}), (noisy, image_status(noisy), {})]

    images, _ = concept_images(small_cfg, ["grey"], Bad(), progress=False)
    table = images["grey"].table
    assert list(table.status) == ["blank", "nsfw", "ok"]
    assert len(images["grey"].files()) == 1 and len(images["grey"].files(usable=False)) == 3


def test_neurons_per_layer(small_cfg):
    cfg = small_cfg.with_overrides({"dnd.neurons": {"head": 2, "fc": [7, 1, 7]}})
    assert choose_neurons(cfg, "head", 1280) == [0, 1]
    assert choose_neurons(cfg, "fc", 1000) == [1, 7]
    with pytest.raises(NdUtilsError, match="not 'blocks.10'"):
        choose_neurons(cfg, "blocks.10", 112)


def test_bad_neurons_and_missing_stage_01(small_cfg):
    with pytest.raises(NdUtilsError, match=r"outside layer 'fc'.*0\.\.999"):
        build_top_images(small_cfg, "fc", neurons=[1000], progress=False)
    other = small_cfg.with_overrides({"probe.limit": 23})
    with pytest.raises(MissingArtifactError, match="01_activation_caching"):
        build_top_images(other, "fc", progress=False)


def test_missing_openai_key_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(nd.ConfigError, match="OPENAI_API_KEY"):
        nd.run_pipeline("offline", [f"data_dir={tmp_path}", "llm.name=openai"],
                        stages=["04"], log=lambda *a, **k: None)
    assert not (tmp_path / "runs").exists()  # no run folder, no work


# ------------------------------------------------------------------ real backends, tiny weights
def test_blip_captioner_runs_and_caches_by_image(tiny_blip_dir, tmp_path):
    cap = BlipCaptioner(model=str(tiny_blip_dir), max_new_tokens=6)
    calls = []
    real = cap.caption
    cap.caption = lambda ims: calls.append(len(ims)) or real(ims)
    images = [Image.new("RGB", (50 + 10 * i, 40), (30 * i, 60, 90)) for i in range(3)]
    cache = JsonlCache(tmp_path / "captions.jsonl")
    first = caption_images(cap, images, ["h0", "h1", "h0"], cache)
    assert all(isinstance(t, str) for t in first) and first[0] == first[2]
    assert calls == [2]  # the repeated image was captioned once
    assert caption_images(cap, images[:2], ["h0", "h1"], cache) == first[:2]
    assert calls == [2]


def test_diffusers_images_do_not_depend_on_batching(tiny_sd_dir):
    one = DiffusersSynthesizer(str(tiny_sd_dir), steps=2, height=64, width=64, batch_size=1)
    three = DiffusersSynthesizer(str(tiny_sd_dir), steps=2, height=64, width=64, batch_size=3)
    assert type(one.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    a = one.generate("One realistic image of a dog", [5, 6, 7])
    b = three.generate("One realistic image of a dog", [6, 7])
    assert [im.size for im, _, _ in a] == [(64, 64)] * 3
    diff = np.abs(np.asarray(a[1][0], dtype=int) - np.asarray(b[0][0], dtype=int)).max()
    assert diff <= 2, "image of seed 6 changed with the batch it was made in"
    assert np.abs(np.asarray(a[0][0], dtype=int) - np.asarray(a[1][0], dtype=int)).max() > 10
    assert [info["seed"] for _, _, info in a] == [5, 6, 7]


def test_diffusers_nsfw_flag_is_recorded(tiny_sd_dir, small_cfg, monkeypatch):
    synth = DiffusersSynthesizer(str(tiny_sd_dir), steps=2, height=64, width=64, batch_size=2)
    real = synth.pipe.__call__

    class Flagged:
        def __init__(self, res):
            self.images, self.nsfw_content_detected = res.images, [True] + [False] * (
                len(res.images) - 1)

    monkeypatch.setattr(synth, "pipe", lambda **kw: Flagged(real(**kw)))
    synth.backend_id = "tiny-sd-flagged"
    images, _ = concept_images(small_cfg.with_overrides({"synthesis.images_per_concept": 3}),
                               ["a dog"], synth, progress=False)
    # batches of 2: the first image of each batch is flagged
    assert list(images["a dog"].table.status) == ["nsfw", "ok", "nsfw"]
    assert [p.name for p in images["a dog"].files()] == ["01.png"]


def test_synthesis_backends_are_registered():
    from nd_utils.backends.synthesizers import list_synthesizers

    assert list_synthesizers() == ["diffusers", "retrieve"]
    with pytest.raises(UnknownNameError, match="retrieve"):
        # with_overrides skips load_config's validation, so the backend's own error shows
        load_synthesizer_from_config(nd.load_config("offline").with_overrides(
            {"synthesis.name": "retreive"}))
    assert list_captioners() == ["blip", "classifier"]
    assert list_language_models() == ["keywords", "openai", "transformers"]


def test_a_registered_backend_is_listed_loaded_and_accepted_by_the_config(tmp_path):
    from nd_utils.backends import captioners

    @captioners.register_captioner("constant")
    class Constant(captioners.Captioner):
        name = backend_id = "constant"

        def __init__(self, device="cpu"):
            self.device = device

        def caption(self, images):
            return ["a photo"] * len(images)

    try:
        assert "constant" in captioners.list_captioners()
        assert captioners.load_captioner("constant").caption([None, None]) == ["a photo"] * 2
        cfg = nd.load_config("offline", [f"data_dir={tmp_path}", "captioner.name=constant"])
        assert cfg["captioner.name"] == "constant"
    finally:
        captioners.CAPTIONERS.entries.pop("constant")
    with pytest.raises(nd.ConfigError, match="captioner"):
        nd.load_config("offline", [f"data_dir={tmp_path}", "captioner.name=constant"])
