"""The package's layers: each module imports only modules of its own layer or the ones below,
and no two modules import each other, directly or through others.

Every import counts, at the top of a module or inside a function; only imports under
`if TYPE_CHECKING:` (never executed) are left out. A new module must be given a layer here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nd_utils"

# lowest first: a module may import its own layer and those listed before it
LAYERS = {
    # the package root only maps public names to modules, loaded on first use
    "core": ("__init__", "errors", "locks", "store", "jsonl_cache", "tensor_stream", "machine",
             "hooks", "registry", "notices", "run_faults", "plugins"),
    "data": ("probes", "probe_set", "probe_sources", "probe_split", "concept_sets",
             "concept_text", "paper_concept_files", "imagenet_labels", "imagenet_sample", "data"),
    "config": ("config", "config_values", "config_schema"),
    "models and methods": ("backends", "similarity", "similarity_formulas", "similarity_blocks",
                           "cosines", "trust_metrics", "attention_crops",
                           "label_metrics", "scoring"),
    "runtime": ("executors", "context", "stage_cache", "decode_once",
                "runs"),
    "stages": ("stages",),
    "viz": ("viz",),
    # the runner runs the stages' notebooks and writes the report: above both
    "app": ("pipeline", "kernels", "__main__"),
}
ORDER = list(LAYERS)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        out[name] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The nd_utils modules `name` imports (relative and absolute, anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name[len("nd_utils."):] for a in node.names
                       if a.name.startswith("nd_utils.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("nd_utils"):
                mod = node.module[len("nd_utils."):] if node.module != "nd_utils" else ""
            else:
                continue
            targets = [f"{mod}.{a.name}".strip(".") for a in node.names]
            targets = [t if t in known else mod for t in targets]
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
            elif target == "":
                found.add("__init__")
    return found


def _layer(module: str) -> str:
    top = module.split(".")[0]
    for layer, names in LAYERS.items():
        if top in names or module in names:
            return layer
    raise AssertionError(f"nd_utils.{module} has no layer: add it to LAYERS in {__file__}")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        _layer(module)


def test_no_module_imports_a_layer_above_its_own(graph):
    upward = [f"{m} ({_layer(m)}) imports {d} ({_layer(d)})" for m, deps in sorted(graph.items())
              for d in sorted(deps) if ORDER.index(_layer(d)) > ORDER.index(_layer(m))]
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [node, dep]) if dep in stack
                              else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from .store import ArtifactStore\n"
                    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .viz import x\n")
    assert _imports("probes", path, {"store", "viz", "probes"}) == {"store"}
