"""environment.yml and pyproject.toml declare the same dependencies; the layout is complete."""
import re
import tomllib

import yaml

from nd_utils.config import REPO_ROOT


def _norm(req: str) -> str:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + spec.replace(" ", "")


def test_environment_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {_norm(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_norm(r) for r in extra}
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = [d for d in env["dependencies"] if isinstance(d, str)]
    listed = {_norm(r) for r in pip if not r.startswith("-e")}
    assert listed == declared, (sorted(listed - declared), sorted(declared - listed))
    python = next(d for d in conda_pins if d.startswith("python"))
    lowest = re.search(r">=\s*3\.(\d+)", project["requires-python"]).group(1)
    assert int(python.split("=")[-1].split(".")[1]) >= int(lowest)


def test_layout():
    for name in ["environment.yml", "README.md", "Makefile", "pyproject.toml", "configs",
                 "notebooks", "nd_utils", "figures", "data", "tests", ".ci/run"]:
        assert (REPO_ROOT / name).exists(), name


def test_notebooks_are_committed_without_outputs():
    import nbformat
    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].cell_type == "markdown", path.name
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert "parameters" in first_code.metadata.get("tags", []), path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
        assert any("assert" in c.source for c in nb.cells[-2:]), path.name
