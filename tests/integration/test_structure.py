"""The package shows the pipeline, and each engine lives in one place.

- Imports run forward only: the engines' specs (light, any stage may ask them) -> study -> estimate ->
  importing -> run (with each engine's training code) -> analyze, then the command line on top; no
  module imports another that imports it back. Imports only a type checker sees are not counted.
- Outside ``ftscale/engines/``, no library module spells an engine's name: stages ask the registry.
- run.json is read in one place (``Run.load``): no library module looks a key up in a run's dict.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from paths import REPO

from ftscale import engines

PACKAGE = REPO / "scripts" / "ftscale"
#: The stages in import order; an engine's spec layer comes first, its training code with the run stage.
STAGES = ["engine specs", "study", "estimate", "importing", "run", "analyze"]
TOP = len(STAGES)  # ftscale/cli.py, ftscale/dag.py, ftscale/workflow.py, ftscale/__init__.py
SPEC_MODULES = {"spec", "base"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "engines":
        light = len(parts) <= 3 or parts[-1] in SPEC_MODULES
        return STAGES.index("engine specs") if light else STAGES.index("run")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else TOP


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of import nodes under ``if TYPE_CHECKING:``."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports() -> dict[str, set[str]]:
    """Every ftscale module and the ftscale modules it imports (at any depth of its code)."""
    modules = library_modules()
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        found = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftscale"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("ftscale"))
        out[name] = {m for m in found if m in modules and m != name}
    return out


def test_there_is_a_package_per_stage_and_one_per_engine():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == {"engines", *STAGES[1:]}
    engine_dirs = {p.name for p in (PACKAGE / "engines").iterdir() if (p / "spec.py").exists()}
    assert engine_dirs == set(engines.names())


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
    entries = {engines.engine(name).entry_module for name in engines.names()}
    assert entries <= set(library_modules())
    assert [(a, b) for a, deps in imports().items() for b in deps if b in entries] == []


def test_engine_specs_import_no_training_code():
    """A spec is light: the registry and the specs import nothing but each other (no torch, no stage)."""
    heavy = {"torch", "transformers", "peft", "nemo", "nemo_run", "nemo_automodel", "pandas"}
    for name, path in library_modules().items():
        if stage(name) != 0:
            continue
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            roots = ([a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else
                     [node.module.split(".")[0]] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not set(roots) & heavy, f"{name} imports {roots}"
        assert all(stage(dep) == 0 for dep in imports()[name]), (name, imports()[name])


def test_no_engine_name_is_spelled_outside_the_engines():
    names = set(engines.names())
    spelled = []
    for name, path in library_modules().items():
        if name.startswith("ftscale.engines"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
    assert spelled == []


RUN_NAMES = {"run", "run_json"}


def _run_dict_lookups(tree: ast.AST) -> list[int]:
    """Lines where a run's dict is looked up: ``run["key"]``, ``run.get("key")``, ``json.loads(<paths>.run...)``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in RUN_NAMES:
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Name) and node.func.value.id in RUN_NAMES):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("loads", "load")
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"
              and any(isinstance(n, ast.Attribute) and n.attr == "run" for a in node.args for n in ast.walk(a))):
            lines.append(node.lineno)
    return lines


def test_run_json_is_read_only_by_its_loader():
    found = [f"{path.relative_to(PACKAGE)}:{line}" for name, path in library_modules().items()
             if name != "ftscale.study.run" for line in _run_dict_lookups(ast.parse(path.read_text()))]
    assert found == []


def test_the_walks_see_what_they_look_for():
    graph = imports()
    assert "ftscale.study.layout" in graph["ftscale.study.sweep"]
    assert "ftscale.engines.embedded.training" in graph["ftscale.engines.embedded.train"]
    assert stage("ftscale.engines.nemo.spec") < stage("ftscale.study.run") < stage("ftscale.engines.nemo.train")
    bad = ast.parse('run["steps"]\nrun_json.get("lora")\njson.loads(paths.run.read_text())\nRun.load(paths.run)\n')
    assert _run_dict_lookups(bad) == [1, 2, 3]


# --------------------------------------------------------------------------- a fourth engine, added in one place


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    speed: str = engines.base.choice("slow", "fast")


class ToySpec(engines.EngineSpec):
    name = "toy"
    entry_module = "toy_engine.train"
    Options = ToyOptions
    step_pattern = "embedded_step"

    def planner_terms(self, run, dtype_bytes, built=None):
        fast = self.options(run).speed == "fast"
        return engines.base.PlannerTerms(adapter_bytes=dtype_bytes, step_efficiency=0.8 if fast else 0.4)

    def options_label(self, run, built=None):
        return f"speed={self.options(run).speed}"


@pytest.fixture
def toy_engine():
    spec = engines.register(ToySpec())
    yield spec
    engines.unregister(spec.name)


def test_a_toy_engine_registered_in_one_place_is_planned_run_and_labelled(toy_engine, default_config, repo):
    from ftscale.estimate.plan import plan_rows
    from ftscale.run.launch import launch_command
    from ftscale.study.schema import ConfigError
    from ftscale.study.sweep import load_study

    config = {**default_config, "engine": ["embedded", "toy"], "toy": {"speed": "fast"}}
    study = load_study(config, "toy.yaml", repo)
    toys = [r for r in study.runs if r.engine == "toy"]
    assert toys and len(toys) == len(study.runs) // 2
    assert all(r.name.startswith("toy_") and r.options == ToyOptions("fast") for r in toys)
    rows = {row["run_dir"]: row for row in plan_rows(study)}
    toy_row, same = rows[toys[0].directory], rows[toys[0].directory.replace("toy_", "embedded_")]
    assert toy_row["predicted_step_time_s"] < same["predicted_step_time_s"]  # its own planner terms
    assert launch_command(toys[0], "r/run.json", python="py")[-2:] == ["toy_engine.train", "r/run.json"]
    assert toys[0].spec.options_label(toys[0]) == "speed=fast"
    with pytest.raises(ConfigError, match=r"toy.yaml: run \S+: toy.speed = 'warp': must be one of \['slow', 'fast'\]"):
        load_study({**config, "toy": {"speed": "warp"}}, "toy.yaml", repo)
    with pytest.raises(ConfigError, match=r"toy.yaml: key 'engine\[1\]' = \"toy2\": must be one of"):
        load_study({**config, "engine": ["embedded", "toy2"]}, "toy.yaml", repo)
