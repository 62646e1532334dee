"""The package shows the pipeline: imports run forward only (study -> estimate -> importing -> run ->
analyze, then the command line on top), and no module imports another that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scripts" / "ftscale"
STAGES = ["study", "estimate", "importing", "run", "analyze"]
TOP = len(STAGES)  # ftscale/cli.py, ftscale/dag.py, ftscale/__init__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else TOP


def imports() -> dict[str, set[str]]:
    """Every ftscale module and the ftscale modules it imports (at any depth of its code)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftscale"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("ftscale"))
        out[name] = {m for m in found if m in modules and m != name}
    return out


def test_there_is_a_package_per_stage():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(STAGES)


def test_imports_only_run_forward():
    backward = [(a, b) for a, deps in imports().items() for b in deps if stage(b) > stage(a)]
    assert backward == []


def test_no_import_cycle():
    graph = imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, dep]))
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_engine_entry_points_are_imported_by_nobody():
    """They run as __main__ under torchrun: a module importing one would load it twice."""
    entries = {"ftscale.run.engine.embedded", "ftscale.run.engine.nemo", "ftscale.run.engine.automodel"}
    assert [(a, b) for a, deps in imports().items() for b in deps if b in entries] == []


def test_the_walk_sees_the_imports():
    graph = imports()
    assert "ftscale.study.layout" in graph["ftscale.study.sweep"]
    assert "ftscale.run.engine.training" in graph["ftscale.run.engine.embedded"]
