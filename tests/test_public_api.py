"""The top level: a small public surface, lazy imports, moved names that still resolve."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import nd_utils as nd
from nd_utils.config import REPO_ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_is_light_and_submodules_load_only_what_they_use():
    assert not {"torch", "pandas", "matplotlib"} & _modules_after("import nd_utils")
    loaded = _modules_after("import nd_utils.similarity")
    assert "torch" in loaded
    assert not {"pandas", "matplotlib", "torchvision"} & loaded


def test_public_names_resolve_and_are_listed():
    assert 35 <= len(nd.__all__) <= 45
    for name in nd.__all__:
        assert getattr(nd, name) is not None, name
    assert set(nd.__all__) <= set(dir(nd))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        nd.no_such_name  # noqa: B018


def test_names_moved_out_of_the_top_level_are_gone():
    # 0.2.0 dropped the deprecated top-level names (e.g. nd.activation_key, nd.pool)
    for name in ("activation_key", "pool", "ArtifactStore", "SIMILARITY_FUNCTIONS"):
        with pytest.raises(AttributeError, match=f"no attribute {name!r}"):
            getattr(nd, name)
    assert nd.stages.__name__ == "nd_utils.stages"  # a submodule by attribute


def test_notebooks_use_only_public_names():
    import nd_utils.viz

    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        source = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                           if c["cell_type"] == "code")
        used = set(re.findall(r"\bnd\.([A-Za-z_]\w*)\s*\(", source))
        assert used <= set(nd.__all__), (path.name, sorted(used - set(nd.__all__)))
        used = set(re.findall(r"\bnd\.viz\.([A-Za-z_]\w*)\s*\(", source))
        assert used <= set(nd_utils.viz.__all__), (path.name, used - set(nd_utils.viz.__all__))


def test_viz_is_lazy():
    assert "matplotlib" not in _modules_after("import nd_utils.viz")
    assert "plot_evaluation" in dir(nd.viz) and nd.viz.plot_evaluation.__module__ == (
        "nd_utils.viz.label_plots")
