"""The import graph follows docs/architecture.md: no cycles, no forbidden arrows.

Every ``import`` / ``from … import`` in every module of the package (top level and inside
functions alike: a lazy import is still a dependency) is an arrow. Packages are compared
at the first level under ``wbscale`` (``wbscale.ckpt``, ``wbscale.train``, …); the source
folder ``kernels/`` is the package ``wbscale.kernels``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Layers, lowest first (docs/architecture.md, "Layers"). An arrow may point to the same
# layer's other units only where SIBLINGS allows it, and down, never up.
LAYERS: list[set[str]] = [
    {"wbscale", "errors", "io"},  # "wbscale": the package itself (its __version__)
    {"config"},
    {"ranks", "provenance", "hardware", "sizing", "dist", "locks"},
    {"kernels"},
    {"models"},
    {"inference", "data"},
    {"ckpt"},
    {"track"},
    {"slurm", "bimt", "interpret", "runs", "evaluate"},  # runs: the run registry; it resubmits through slurm
    {"train"},
    {"sweep", "bench", "doctor"},
    {"cli"},
]
SIBLINGS = {("sweep", "bench"), ("runs", "slurm")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "wbscale").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        found[("wbscale.kernels." + path.stem).removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` over wbscale's own modules."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "wbscale"


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"wbscale.{unit} is in no layer of tests/test_architecture.py (and docs/architecture.md)")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_files():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for src, targets in import_graph().items():
        for dst in targets:
            if _unit(src) != _unit(dst):
                packages[_unit(src)].add(_unit(dst))
    cycle = _cycle(packages)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_every_arrow_points_down_the_layers():
    bad = []
    for src, targets in sorted(import_graph().items()):
        for dst in sorted(targets):
            a, b = _unit(src), _unit(dst)
            if a == b or (a, b) in SIBLINGS:
                continue
            if _layer(b) >= _layer(a):
                bad.append(f"{src} -> {dst}")
    assert not bad, "arrows that docs/architecture.md forbids:\n" + "\n".join(bad)


def test_only_cli_bench_and_sweep_import_train():
    users = {_unit(src) for src, targets in import_graph().items() for dst in targets
             if _unit(dst) == "train" and _unit(src) != "train"}
    assert users <= {"cli", "bench", "sweep"}, f"wbscale.train imported by {sorted(users)}"


def test_nothing_imports_the_cli():
    users = sorted(src for src, targets in import_graph().items() if "wbscale.cli" in targets)
    assert not users, f"the CLI is imported by {users}"
