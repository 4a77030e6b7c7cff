"""Stage 01 on a small real pipeline: keys, decode-once, resume, corrupt images."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

import nd_utils as nd
from nd_utils.stages.activations import activation_key
from nd_utils.errors import MissingArtifactError, UnknownNameError
from nd_utils.hooks import count_hooks
from nd_utils.decode_once import CacheJob, SimulatedInterruption, run_decode_once
from nd_utils.store import ArtifactStore


def make_folder(root, n=10, corrupt=True):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("red" if i % 2 else "blue")
        sub.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
        arr[..., 0 if i % 2 else 2] = 255
        Image.fromarray(arr).save(sub / f"img{i:02d}.png")
    if corrupt:
        (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


PRE = T.Compose([T.Resize((16, 16)), T.ToTensor()])


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    folder = make_folder(tmp_path / "imgs")
    cfg = nd.load_config("offline", [f"data_dir={tmp_path / 'store'}", "target.layers=[act, fc]", "target.name=tiny",
                                     f"probe.sets=[{{name: folder, path: {folder}}}]",
                                     "activations.chunk_size=4", "activations.batch_size=3",
                                     "activations.top_k=5", "device=cpu"])
    target = nd.from_module(Tiny(), PRE, name="tiny")
    return cfg, target, folder


def test_cache_shapes_top_ids_and_skipped(setup):
    cfg, target, folder = setup
    with pytest.warns(UserWarning):
        probe = nd.load_probe_from_config(cfg)
    assert len(probe) == 10 and len(probe.skipped) == 1
    arts = nd.cache_activations(cfg, target=target, probe=probe, progress=False)
    assert set(arts) == {"act", "fc"}
    a = nd.load_activations(cfg, "act", probe=probe, target=target)
    assert a.activations.shape == (10, 6) and a.top_ids.shape == (6, 5)
    # reference: the same model run by hand, one image at a time
    with torch.no_grad():
        x = torch.stack([PRE(probe.load_image(i)) for i in range(10)])
        ref = target.model.act(target.model.conv(x)).mean((2, 3))
    assert torch.allclose(a.activations, ref, atol=1e-6)
    # top images: descending activation, equal ones (a dead unit's zeros) by ascending image
    order = torch.sort(a.activations, dim=0, descending=True, stable=True).indices[:5].T
    assert torch.equal(a.top_ids, order)
    assert torch.equal(a.top_values, a.activations.gather(0, order.T).T)
    assert torch.allclose(torch.topk(ref, 5, dim=0).values.T, a.top_values, atol=1e-6)
    assert "broken.jpg" in str(a.manifest["skipped_images"])
    assert a.manifest["weights_id"] == target.weights_id
    assert count_hooks(target.model) == 0


def test_keys_follow_the_fields_a_stage_reads(setup):
    cfg, target, _ = setup
    with pytest.warns(UserWarning):
        probe = nd.load_probe_from_config(cfg)
    key = activation_key(cfg, "act", probe, target)
    assert activation_key(cfg.with_overrides({"activations.batch_size": 7}), "act", probe, target) == key
    assert activation_key(cfg.with_overrides({"seed": 5}), "act", probe, target) == key
    assert activation_key(cfg.with_overrides({"target.pooling": "max"}), "act", probe, target) != key
    assert activation_key(cfg.with_overrides({"activations.top_k": 3}), "act", probe, target) != key
    assert activation_key(cfg, "fc", probe, target) != key
    assert activation_key(cfg, "act", probe.subset(9), target) != key
    # a user module is keyed by its weights: retraining it invalidates the cache
    retrained = Tiny()
    retrained.load_state_dict(target.model.state_dict())
    with torch.no_grad():
        retrained.fc.bias += 1
    assert activation_key(cfg, "act", probe, nd.from_module(retrained, PRE, name="tiny")) != key
    with pytest.raises(nd.NdUtilsError, match="target="):
        activation_key(cfg, "act", probe)  # not a registry name: the Target is required
    pinned = cfg.with_overrides({"target.name": "efficientnet-lite0"})
    assert activation_key(pinned, "act", probe) == activation_key(pinned, "act", probe)


def test_resume_after_interruption(setup, monkeypatch):
    cfg, target, _ = setup
    with pytest.warns(UserWarning):
        probe = nd.load_probe_from_config(cfg)
    store = ArtifactStore(cfg.data_dir)
    with pytest.raises(SimulatedInterruption):
        nd.cache_activations(cfg, target=target, probe=probe, progress=False, stop_after_chunks=2)
    key = activation_key(cfg, "act", probe, target)
    assert not store.exists("01_activation_caching", key)
    with pytest.raises(MissingArtifactError, match="01_activation_caching.ipynb"):
        nd.load_activations(cfg, "act", probe=probe, target=target)
    chunks = sorted(p.name for p in (store.staging_path("01_activation_caching", key) / "chunks").iterdir())
    assert chunks == ["00000.safetensors", "00001.safetensors"]
    # count the images the resumed run decodes: only the last chunk (2 of 10 images)
    seen = []
    original = type(probe).load_image
    monkeypatch.setattr(type(probe), "load_image", lambda self, i: seen.append(i) or original(self, i))
    nd.cache_activations(cfg, target=target, probe=probe, progress=False)
    assert sorted(seen) == [8, 9]
    resumed = nd.load_activations(cfg, "act", probe=probe, target=target).activations
    seen.clear()
    nd.cache_activations(cfg, target=target, probe=probe, progress=False, force=True)
    assert len(seen) == 10
    assert torch.allclose(nd.load_activations(cfg, "act", probe=probe, target=target).activations, resumed)


class Recorder:
    """A second consumer (stand-in for a vision-language image encoder)."""

    name = "recorder"
    outputs = ["mean_rgb"]

    def __init__(self):
        self.preprocess = T.Compose([T.Resize((8, 8)), T.ToTensor()])
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return {"mean_rgb": x.mean((2, 3))}


def test_decode_once_feeds_two_consumers(setup, monkeypatch):
    cfg, target, _ = setup
    with pytest.warns(UserWarning):
        probe = nd.load_probe_from_config(cfg)
    rec = Recorder()
    job = CacheJob(consumer=rec, output="mean_rgb", stage="test_vlm", key="k", version=1, params={})
    decoded = []
    original = type(probe).load_image
    monkeypatch.setattr(type(probe), "load_image", lambda self, i: decoded.append(i) or original(self, i))
    arts = nd.cache_activations(cfg, target=target, probe=probe, extra_jobs=[job], progress=False)
    assert sorted(decoded) == list(range(10))          # each image decoded exactly once
    assert rec.calls == 5                              # chunks of 4/4/2 images, batches of 3: 2+2+1
    assert "mean_rgb" in arts and arts["mean_rgb"].manifest["shape"] == [10, 3]


def test_unknown_layer_and_pooling(setup):
    cfg, target, _ = setup
    with pytest.raises(UnknownNameError, match="act"):
        nd.cache_activations(cfg.with_overrides({"target.layers": ["akt"]}), target=target,
                             progress=False)
    with pytest.raises(nd.NdUtilsError, match="use one of"):
        nd.cache_activations(cfg.with_overrides({"target.pooling": "cls", "target.layers": ["act"]}),
                             target=target, progress=False)
    store = ArtifactStore(cfg.data_dir)
    assert not list((store.root / "artifacts").glob("*/[!.]*"))  # nothing published


def test_stage_version_bump_recomputes(setup, monkeypatch):
    cfg, target, _ = setup
    with pytest.warns(UserWarning):
        probe = nd.load_probe_from_config(cfg)
    old = activation_key(cfg, "fc", probe, target)
    nd.cache_activations(cfg, target=target, probe=probe, progress=False)
    from nd_utils import stage_cache as stages
    from nd_utils.stages import activations
    newer = stages.Stage(**{**activations.STAGE.__dict__, "version": activations.STAGE.version + 1})
    monkeypatch.setattr(activations, "STAGE", newer)
    assert activation_key(cfg, "fc", probe, target) != old
    with pytest.raises(MissingArtifactError):
        nd.load_activations(cfg, "fc", probe=probe, target=target)
