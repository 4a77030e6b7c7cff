"""Each backend family receives its own settings section: a registered backend's extra keys in
`llm:`, `synthesis:`, `vlm:` and `target:` are checked against its loader, passed to it and part of
the keys of the stages that read the section's `name` (as the captioner's, see
test_method_registries.py); configs without extra keys keep their models and keys."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from nd_utils.backends import language_models, synthesizers, targets, vlm
from nd_utils.backends.configured import (language_model_from_config, load_target_from_config,
                                          load_vlm_from_config)
from nd_utils.context import load_config, registered_names
from nd_utils.errors import ConfigError
from nd_utils.backends.families import FAMILIES
from nd_utils.registry import Registry
from nd_utils.stage_cache import STAGES, stage_params
from nd_utils.stages import load_stages
from nd_utils.stages.candidate_concepts import STAGE as CONCEPTS, concepts_key
from nd_utils.stages.image_features import image_feature_key
from nd_utils.stages.synthesis import concept_image_key, load_synthesizer_from_config

CAPTIONS_KEY = "0123abcd0123abcd"
PROBE = SimpleNamespace(fingerprint="f")   # what image_feature_key reads of a ProbeSet


def _config(profile="offline", **sections):
    data = load_config(profile).to_dict()
    for name, values in sections.items():
        data[name].update(values)
    return load_config(data)


# ------------------------------------------------------------------ the generic registry helpers
def test_registry_reads_the_loader_of_exact_prefix_and_fallback_names():
    reg = Registry("thing", fallback=lambda name, device="cpu", size=1: name)
    reg.register("exact", lambda device="cpu", _private=0, width=2: None)
    reg.register("fam", lambda rest, device="cpu", **kwargs: rest, prefix=True)
    assert reg.parameters("exact", exclude=("device",)) == ({"width"}, False)
    assert reg.parameters("fam:a:b", exclude=("device",)) == (set(), True)
    assert reg.parameters("other:x", exclude=("device",)) == ({"size"}, False)
    assert reg.settings("exact", {"name": "exact", "width": 3, "size": 4},
                        exclude=("name",)) == {"width": 3}
    assert reg.settings("fam:x", {"name": "fam:x", "any": 1}, exclude=("name",)) == {"any": 1}
    assert Registry("none").parameters("x") == (set(), True)   # nothing claims it: takes any


def test_builtin_backends_take_the_settings_their_loaders_name():
    assert FAMILIES["vlm"].parameters("conse") == ({"top_t"}, False)
    assert FAMILIES["vlm"].parameters("open_clip:ViT-L-14:laion2b_s32b_b82k")[1]   # **kwargs
    for name in ("efficientnet-lite0", "resnet50:IMAGENET1K_V1", "resnet18:none", "timm:vit"):
        assert FAMILIES["target"].parameters(name) == (set(), False), name
    assert FAMILIES["llm"].parameters("keywords") == (set(), False)
    assert FAMILIES["synthesis"].parameters("diffusers") == ({"dtype"}, False)
    names = registered_names()
    assert names["vlm_parameters"]["conse"] == ({"top_t"}, False)
    assert names["captioner_parameters"]["blip"][0] >= {"model", "checkpoint", "max_new_tokens"}


def test_shipped_profiles_keep_every_stage_key():
    load_stages()
    for profile in ("offline", "paper"):
        cfg = load_config(profile)
        for stage in STAGES.values():
            assert stage_params(cfg, stage) == cfg.select(stage.reads), (profile, stage.name)
    # computed before backend sections took extra keys
    assert concepts_key(load_config("offline"), "fc", CAPTIONS_KEY) == "1db932b6ba41af19"
    assert concepts_key(load_config("paper"), "fc", CAPTIONS_KEY) == "63ab4967e9bd7340"
    assert concept_image_key(load_config("offline"), "dog", "backend") == "a650266038d5e544"
    assert image_feature_key(load_config("paper"), PROBE) == "eb5c52d57031df2c"


# ------------------------------------------------------------------ language models
@pytest.fixture
def mine_lm(monkeypatch):
    """A language model `mine` with its own `style` setting (registered for this test only)."""
    monkeypatch.setattr(language_models.LANGUAGE_MODELS, "entries",
                        dict(language_models.LANGUAGE_MODELS.entries))
    got = []

    @language_models.register_language_model("mine")
    def mine(model=None, device="cpu", max_new_tokens=24, style="terse"):
        got.append({"model": model, "max_new_tokens": max_new_tokens, "style": style})
        return SimpleNamespace(model_id=f"mine:{style}", structured=True)
    return got


def test_a_registered_language_model_gets_its_own_key_and_it_decides_the_04_key(mine_lm):
    cfg = _config(llm={"name": "mine", "style": "plain"})
    lm = language_model_from_config(cfg)
    assert lm.model_id == "mine:plain"
    assert mine_lm == [{"model": cfg["llm.model"], "max_new_tokens": cfg["llm.max_new_tokens"],
                        "style": "plain"}]
    assert stage_params(cfg, CONCEPTS)["llm.style"] == "plain"
    key = concepts_key(cfg, "fc", CAPTIONS_KEY)
    assert key != concepts_key(_config(llm={"name": "mine", "style": "long"}), "fc", CAPTIONS_KEY)
    assert key != concepts_key(_config(llm={"name": "mine"}), "fc", CAPTIONS_KEY)
    language_model_from_config(_config(llm={"name": "mine"}))
    assert mine_lm[-1]["style"] == "terse"   # absent: the loader's default
    assert concepts_key(load_config("offline"), "fc", CAPTIONS_KEY) == "1db932b6ba41af19"


def test_an_extra_key_the_language_model_does_not_take_is_an_unknown_key(mine_lm):
    with pytest.raises(ConfigError, match=r"^llm.stlye: unknown key .*did you mean style"):
        _config(llm={"name": "mine", "stlye": "plain"})
    with pytest.raises(ConfigError, match=r"^llm.style: unknown key \(value 'plain'\); expected "
                                          r"no such key: remove it"):
        _config(llm={"name": "keywords", "style": "plain"})
    # a typo of a known key: today's message, whatever the backend (openai takes **kwargs)
    for name in ("keywords", "openai", "mine"):
        with pytest.raises(ConfigError, match=r"^llm.temprature: unknown key \(value 0.3\); "
                                              r"expected no such key: remove it, or did you mean "
                                              r"temperature"):
            _config(llm={"name": name, "temprature": 0.3})


# ------------------------------------------------------------------ synthesizers, VLMs, targets
def test_a_registered_synthesizer_gets_its_own_key_and_it_decides_the_05_key(monkeypatch):
    monkeypatch.setattr(synthesizers.SYNTHESIZERS, "entries",
                        dict(synthesizers.SYNTHESIZERS.entries))

    @synthesizers.register_synthesizer("paint")
    class Paint:
        def __init__(self, palette="warm"):
            self.backend_id = f"paint:{palette}"

    cfg = _config(synthesis={"name": "paint", "palette": "cold"})
    assert load_synthesizer_from_config(cfg).backend_id == "paint:cold"
    assert load_synthesizer_from_config(_config(synthesis={"name": "paint"})).backend_id == \
        "paint:warm"
    assert concept_image_key(cfg, "dog", "b") != concept_image_key(
        _config(synthesis={"name": "paint", "palette": "warm"}), "dog", "b")
    with pytest.raises(ConfigError, match=r"^synthesis.palete: unknown key .*did you mean palette"):
        _config(synthesis={"name": "paint", "palete": "cold"})
    with pytest.raises(ConfigError, match=r"^synthesis.palette: unknown key"):
        _config(synthesis={"name": "retrieve", "palette": "cold"})


def test_a_vlm_gets_its_own_key_and_it_decides_the_features_keys(monkeypatch):
    got = {}
    monkeypatch.setattr(vlm.VLMS, "entries", dict(vlm.VLMS.entries))
    vlm.VLMS.register("conse", lambda device="cpu", top_t=10: got.update(top_t=top_t) or "vlm")
    cfg = _config(vlm={"top_t": 5})
    assert load_vlm_from_config(cfg) == "vlm" and got == {"top_t": 5}
    assert image_feature_key(cfg, PROBE) != image_feature_key(load_config("offline"), PROBE)
    with pytest.raises(ConfigError, match=r"^vlm.topt: unknown key .*did you mean top_t"):
        _config(vlm={"topt": 5})


def test_a_registered_target_gets_its_own_key_and_it_decides_the_01_key(monkeypatch):
    got = {}
    monkeypatch.setattr(targets.TARGETS, "entries", dict(targets.TARGETS.entries))
    targets.register_target("tiny", lambda device="cpu", width=8: got.update(width=width)
                            or SimpleNamespace(to=lambda device: "target"))
    cfg = _config(target={"name": "tiny", "width": 4})
    assert load_target_from_config(cfg) == "target" and got == {"width": 4}
    stage = STAGES["01_activation_caching"]
    assert stage_params(cfg, stage)["target.width"] == 4
    with pytest.raises(ConfigError, match=r"^target.width: unknown key"):
        _config(target={"width": 4})   # efficientnet-lite0 takes none
    with pytest.raises(ConfigError, match=r"^target.layer: unknown key .*did you mean layers"):
        _config(target={"name": "tiny", "layer": ["fc"]})
