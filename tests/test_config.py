"""Profiles, dotted overrides and their errors."""
import pytest

import nd_utils as nd
from nd_utils.config import REPO_ROOT


def test_profiles_exist_and_share_keys():
    assert {"offline", "paper"} <= set(nd.list_profiles())
    off, paper = nd.load_config("offline"), nd.load_config("paper")
    # every setting is settable in both profiles (only list entries may differ)
    # probe sets and per-layer neuron choices are keyed by the profile's own data and layers
    strip = lambda keys: {k for k in keys if not k.startswith(("probe.sets.", "evaluation.probe_sets.",
                                                               "quality.probe_sets.", "synthesis.pool.",
                                                               "dnd.neurons."))}
    assert strip(off.keys()) == strip(paper.keys())
    assert off["target.name"] == "efficientnet-lite0"
    assert paper["target.name"] == "resnet50:IMAGENET1K_V1"
    assert paper["target.layers"] == ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_overrides_parse_yaml_values():
    cfg = nd.load_config("offline", ["target.layers=[head]", "probe.limit=12", "seed=3"])
    assert cfg["target.layers"] == ["head"]
    assert cfg["probe.limit"] == 12 and cfg["seed"] == 3
    # list entries are addressable by index
    cfg = nd.load_config("paper", ["probe.sets.0.path=/data/val"])
    assert cfg["probe.sets"][0] == {"name": "imagenet-val", "path": "/data/val"}


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(nd.ConfigError) as err:
        nd.load_config("offline", ["tagret.layers=[head]"])
    assert "tagret.layers" in str(err.value) and "target.layers" in str(err.value)
    with pytest.raises(nd.ConfigError, match="key=value"):
        nd.load_config("offline", ["target.layers"])
    with pytest.raises(nd.ConfigError, match="offline"):
        nd.load_config("no-such-profile")


def test_overrides_from_mapping_do_not_mutate_source():
    base = nd.load_config("offline")
    changed = base.with_overrides({"target.pooling": "max"})
    assert base["target.pooling"] == "avg" and changed["target.pooling"] == "max"


def test_effective_config_round_trips(tmp_path):
    cfg = nd.load_config("offline", ["target.layers=[fc]"])
    path = cfg.save(tmp_path / "config.yaml")
    again = nd.load_config(path)
    assert again.to_dict() == cfg.to_dict()
    # data_dir is absolute in the saved copy, so it points at the same store from anywhere
    assert again.data_dir == cfg.data_dir and again.data_dir.is_absolute()


def test_data_dir_env_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path / "env"))
    assert nd.load_config("offline").data_dir == tmp_path / "env"
    cfg = nd.load_config("offline", [f"data_dir={tmp_path / 'explicit'}"])
    assert cfg.data_dir == tmp_path / "explicit"
    monkeypatch.delenv("ND_DATA_DIR")
    assert nd.load_config("offline").data_dir == REPO_ROOT / "data"
