"""Methods and backends register through one `Registry`: similarity functions, scorings and
captioners (with their own settings in `captioner:`, passed to them and part of the 03 key)."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from nd_utils.backends import captioners
from nd_utils.backends.captioners import captioner_settings, register_captioner
from nd_utils.backends.configured import load_captioner_from_config
from nd_utils.stages.captions import caption_key
from nd_utils.context import load_config
from nd_utils.errors import ConfigError, NdUtilsError, UnknownNameError
from nd_utils.registry import Registry
from nd_utils import scoring, similarity

TOP = SimpleNamespace(layer="fc", key="0123abcd0123abcd")   # what caption_key reads of a TopImages


def test_registry_get_keeps_order_when_asked_and_names_the_valid_ones():
    reg = Registry("thing", sort=False)
    reg.register("b", len)
    reg.register("a", max)
    assert reg.names() == ["b", "a"] and reg.get("a") is max and "b" in reg
    assert [] not in reg   # unhashable: not a name, no TypeError
    with pytest.raises(UnknownNameError, match="unknown thing 'c'.*Valid names: b, a"):
        reg.get("c")
    assert Registry("thing", entries=dict(reg.entries)).names() == ["a", "b"]   # sorted default


def test_registered_similarity_is_listed_last_and_validated_by_the_config(monkeypatch):
    monkeypatch.setattr(similarity.SIMILARITIES, "entries", dict(similarity.SIMILARITIES.entries))

    @similarity.register_similarity("dot")
    def dot(clip_feats, target_feats, *, scale=1.0, chunk_size=None, device=None, layer=None):
        return scale * torch.as_tensor(target_feats).T @ torch.as_tensor(clip_feats)

    assert similarity.list_similarities() == ["cos_similarity", "cos_similarity_cubed",
                                              "rank_reorder", "wpmi", "soft_wpmi", "dot"]
    assert similarity.get_similarity("dot") is dot
    cfg = load_config("offline", ["clip_dissect.similarity=dot",
                                  "clip_dissect.hyperparameters={scale: 2.0}"])
    assert cfg["clip_dissect.similarity"] == "dot"
    with pytest.raises(ConfigError, match="clip_dissect.hyperparameters.top_k"):
        load_config("offline", ["clip_dissect.similarity=dot",
                                "clip_dissect.hyperparameters={top_k: 2}"])


def test_registered_scoring_ranks_and_is_validated(monkeypatch):
    monkeypatch.setattr(scoring.SCORINGS, "entries", dict(scoring.SCORINGS.entries))
    assert scoring.list_scorings() == ["mean", "topk-sq-mean", "image-products",
                                       "topk-compare"]
    scoring.register_scoring("most-images", lambda t: t["n_images"], higher=True)
    table = pd.DataFrame({"candidate": ["a", "b"], "n_images": [1, 3]})
    ranked = scoring.rank_by(table, "most-images")
    assert ranked.candidate.tolist() == ["b", "a"] and ranked.score.tolist() == [3, 1]
    assert load_config("offline", ["selection.scoring=most-images"])
    with pytest.raises(NdUtilsError, match="use one of mean, .*, most-images"):
        scoring.check_scoring("fewest")


def test_builtin_captioners_get_what_they_got_before():
    for profile in ("offline", "paper"):
        section = load_config(profile)["captioner"]
        assert captioner_settings("blip", section) == {
            k: section[k] for k in ("model", "checkpoint", "max_new_tokens")}
        assert captioner_settings("classifier", section) == {}


def test_builtin_caption_keys_are_unchanged():
    # computed before captioner sections took extra keys
    assert caption_key(load_config("offline"), TOP) == "9e9c2185f6d562cb"
    assert caption_key(load_config("paper"), TOP) == "58d85dd9424d9497"
    assert caption_key(load_config("offline", ["captioner.name=blip",
                                               "captioner.max_new_tokens=20"]),
                       TOP) == "87c92d528f563c04"


@pytest.fixture
def mine(monkeypatch):
    """A captioner `mine` with its own `prefix` setting (registered for this test only)."""
    monkeypatch.setattr(captioners.CAPTIONERS, "entries", dict(captioners.CAPTIONERS.entries))

    @register_captioner("mine")
    class Mine(captioners.Captioner):
        name = "mine"

        def __init__(self, device="cpu", prefix="a photo of"):
            self.device, self.prefix = device, prefix
            self.backend_id = f"mine:{prefix}"

        def caption(self, images):
            return [self.prefix for _ in images]
    return Mine


def _config(**section):
    data = load_config("offline").to_dict()
    data["captioner"].update(section)
    return load_config(data)


def test_a_registered_captioner_gets_its_own_keys_and_they_decide_the_key(mine):
    cfg = _config(name="mine", prefix="x")
    cap = load_captioner_from_config(cfg)
    assert isinstance(cap, mine) and cap.prefix == "x" and cap.device.type == "cpu"
    assert caption_key(cfg, TOP) != caption_key(_config(name="mine", prefix="y"), TOP)
    assert caption_key(cfg, TOP) != caption_key(_config(name="mine"), TOP)   # default prefix
    # a key the captioner does not take is still an error, with the closest one named
    with pytest.raises(ConfigError, match=r"captioner.prefx: unknown key .*did you mean prefix"):
        _config(name="mine", prefx="x")
    with pytest.raises(ConfigError, match="captioner.prefix: unknown key"):
        _config(name="classifier", prefix="x")
    assert caption_key(load_config("offline"), TOP) == "9e9c2185f6d562cb"


def test_a_captioner_with_kwargs_gets_every_key_but_its_name(monkeypatch):
    monkeypatch.setattr(captioners.CAPTIONERS, "entries", dict(captioners.CAPTIONERS.entries))
    got = {}

    @register_captioner("any")
    def any_captioner(device="cpu", **kwargs):
        got.update(kwargs)
        return SimpleNamespace(backend_id="any")

    load_captioner_from_config(_config(name="any", style="short"))
    # None values (model, checkpoint) are left to the loader's defaults, as for every captioner
    assert got == {"max_new_tokens": 30, "batch_size": 16, "style": "short"}
