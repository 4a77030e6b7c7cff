"""`plugins:` makes a user's own backend usable by name in every process of a run.

The plugin here is a module written to a temporary folder: a tiny network whose weights it
saves next to itself and loads in its loader (as a user's own model would), registered with
`register_target`. The test process never imports it where a child process has to: the runner,
its stage kernel and an unpickling worker each import it from `plugins:` alone.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nd_utils as nd
from nd_utils import plugins
from nd_utils.config import REPO_ROOT, Config

PLUGIN = "nd_test_tiny_net_plugin"
TARGET = "nd-test-tiny-net"

ARCH = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv (6 channels) -> pooled -> fc (7 units)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(6, 7)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.conv(x))))
'''

REGISTER = f'''
from pathlib import Path

from torchvision import transforms as T

from nd_utils.backends.target_network import from_module
from nd_utils.backends.targets import register_target

WEIGHTS = Path(__file__).with_name("tiny_net_weights.pt")


@register_target("{TARGET}")
def load_tiny_net(device="cpu"):
    model = TinyNet()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    preprocess = T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor()])
    return from_module(model, preprocess, name="{TARGET}").to(device)
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """A folder holding the plugin module and the weights it loads (seeded, not the default
    initialisation, so the test can tell they were loaded)."""
    import torch

    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{PLUGIN}.py").write_text(ARCH + REGISTER)
    arch = {}
    exec(ARCH, arch)  # the same class, without importing the plugin in this process
    torch.manual_seed(1234)
    net = arch["TinyNet"]()
    torch.save(net.state_dict(), folder / "tiny_net_weights.pt")
    return folder


def env_with(folder: Path, **extra) -> dict:
    path = os.pathsep.join(p for p in (str(folder), str(REPO_ROOT),
                                       os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def restore_registries():
    """Leave the test session's registries and plugin record as they were."""
    from nd_utils.backends import captioners, targets

    saved = (dict(targets.TARGETS.entries), dict(captioners.CAPTIONERS.entries),
             dict(plugins._IMPORTED))
    yield
    targets.TARGETS.entries.clear()
    targets.TARGETS.entries.update(saved[0])
    captioners.CAPTIONERS.entries.clear()
    captioners.CAPTIONERS.entries.update(saved[1])
    plugins._IMPORTED.clear()
    plugins._IMPORTED.update(saved[2])
    for name in [m for m in sys.modules if m.startswith("nd_test_")]:
        del sys.modules[name]


def test_runner_uses_a_plugin_target_by_name(plugin_dir, tmp_path):
    """`python -m nd_utils run ... --set plugins=[...]`: the runner and stage 01's (warm)
    kernel import the plugin, and the cached activations are the plugin network's."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "nd_utils", "run", "offline", "--stages", "01",
           "--set", f"data_dir={store}", "--set", f"plugins=[{PLUGIN}]",
           "--set", f"target.name={TARGET}", "--set", "target.layers=[conv, fc]",
           "--set", "probe.limit=4", "--set", "activations.top_k=2", "--set", "device=cpu"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=env_with(plugin_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    run = Path(done.stdout.strip().splitlines()[-1]).parent
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == [PLUGIN]
    manifests = {m["layer"]: m for m in (json.loads(p.read_text()) for p in store.glob(
        "artifacts/01_activation_caching/*/manifest.json"))}
    assert {layer: m["shape"] for layer, m in manifests.items()} == {"conv": [4, 6],
                                                                      "fc": [4, 7]}
    # the weights the plugin loaded from its own file, not a fresh initialisation
    import torch
    from nd_utils.backends.target_network import _state_dict_hash

    arch = {}
    exec(ARCH, arch)
    net = arch["TinyNet"]()
    net.load_state_dict(torch.load(plugin_dir / "tiny_net_weights.pt", weights_only=True))
    assert {m["weights_id"] for m in manifests.values()} == {_state_dict_hash(net)}


def test_an_unpickled_config_imports_its_plugins(plugin_dir):
    """How a Ray task gets its config: a fresh process that unpickles it can load the plugin's
    target by name (its registrations ran on unpickling)."""
    data = nd.load_config("offline").to_dict()
    data.update(plugins=[PLUGIN], target={**data["target"], "name": TARGET})
    blob = pickle.dumps(Config(data, "<test>"))  # Config() alone imports nothing here
    assert PLUGIN not in sys.modules
    code = ("import pickle, sys\n"
            "from nd_utils.backends.targets import load_target\n"
            "cfg = pickle.loads(sys.stdin.buffer.read())\n"
            "from nd_utils.plugins import imported_plugins\n"
            "print(imported_plugins(), load_target(cfg['target.name']).layer_names())")
    done = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                          timeout=300, env=env_with(plugin_dir), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().strip() == (
        f"['{PLUGIN}'] ['conv', 'conv.0', 'conv.1', 'pool', 'flatten', 'fc']")


def test_plugin_names_validate(plugin_dir, monkeypatch, restore_registries):
    """Names a plugin registers are valid config values (imported before validation)."""
    (plugin_dir / "nd_test_captioner_plugin.py").write_text(
        "from nd_utils.backends.captioners import register_captioner\n"
        "register_captioner('nd-test-constant', lambda device='cpu': None)\n")
    monkeypatch.syspath_prepend(str(plugin_dir))
    with pytest.raises(nd.ConfigError, match="captioner.name: got 'nd-test-constant'"):
        nd.load_config("offline", ["captioner.name=nd-test-constant"])
    cfg = nd.load_config("offline", [f"plugins=[{PLUGIN}, nd_test_captioner_plugin]",
                                     f"target.name={TARGET}", "captioner.name=nd-test-constant"])
    assert cfg["target.name"] == TARGET and cfg["captioner.name"] == "nd-test-constant"
    assert plugins.imported_plugins()[-2:] == [PLUGIN, "nd_test_captioner_plugin"]
    # once per process: loading again does not import (register) again
    module = sys.modules[PLUGIN]
    nd.load_config("offline", [f"plugins=[{PLUGIN}]"])
    assert sys.modules[PLUGIN] is module


def test_a_missing_plugin_names_the_module_and_the_fix(tmp_path):
    with pytest.raises(nd.ConfigError) as err:
        nd.load_config("offline", ["plugins=[nd_test_no_such_plugin]"])
    msg = str(err.value)
    assert "plugin 'nd_test_no_such_plugin' could not be imported" in msg
    assert "ModuleNotFoundError: No module named 'nd_test_no_such_plugin'" in msg
    assert "install it or put its folder on PYTHONPATH" in msg and "plugins:" in msg
    # a plugin that fails while registering is named with its own error
    (tmp_path / "nd_test_broken_plugin.py").write_text("raise RuntimeError('no weights here')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(nd.ConfigError, match=r"plugin 'nd_test_broken_plugin' could not "
                                                 r"be imported \(RuntimeError: no weights here\)"):
            plugins.import_plugins(["nd_test_broken_plugin"])
    finally:
        sys.path.remove(str(tmp_path))
    assert "nd_test_broken_plugin" not in plugins.imported_plugins()


def test_the_cli_reports_a_missing_plugin(tmp_path):
    done = subprocess.run([sys.executable, "-m", "nd_utils", "run", "offline", "--stages", "01",
                           "--set", "plugins=[nd_test_no_such_plugin]"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ND_DATA_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert "error: plugin 'nd_test_no_such_plugin' could not be imported" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_plugins_are_in_no_cache_key():
    from nd_utils.stages import STAGES

    assert not [s.name for s in STAGES.values()
                if any(r == "plugins" or r.startswith("plugins.") for r in s.reads)]
    assert nd.load_config("offline")["plugins"] == [] == nd.load_config("paper")["plugins"]


def test_a_ray_worker_imports_the_plugins(plugin_dir, monkeypatch):
    """A Ray task receives its config pickled (`partial(fn, cfg)`): the worker process knows
    the plugin's target although only the config names the plugin."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[cluster]'")
    if ray.is_initialized():
        pytest.skip("a Ray instance of another test is running")
    from functools import partial

    from nd_utils import executors
    from nd_utils.stages.activations import target_identity

    monkeypatch.setenv("PYTHONPATH", env_with(plugin_dir)["PYTHONPATH"])  # the workers' too
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        # the executor sets a fresh token (require_ray_token); the session's is restored after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    data = nd.load_config("offline").to_dict()
    data.update(plugins=[PLUGIN], target={**data["target"], "name": TARGET})
    cfg = Config(data, "<test>")
    ex = executors.load_executor("ray", num_cpus=1, threads=1)
    try:
        # target_identity knows a registered name (keyed by it) and fails on an unknown one
        assert ex.map(partial(target_identity, cfg), [None], progress=False) == [TARGET]
    finally:
        ray.shutdown()
    assert PLUGIN not in sys.modules  # the driver never needed it
