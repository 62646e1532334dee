"""The engines, one package each, and their one registry.

Each engine package holds a light ``spec`` module (an ``EngineSpec``: typed options, checks, LoRA target
names, how its checkpoint is prepared, its log's step pattern, its planner terms, how it is launched)
that every stage may import, and its training code beside it, started under torchrun as
``python -m ftscale.engines.<name>.train RUN_DIR/run.json``. Stages ask this registry; they never
spell an engine's name.
"""

from __future__ import annotations

from ftscale.engines.automodel.spec import AutoModelSpec
from ftscale.engines.base import EngineSpec
from ftscale.engines.embedded.spec import EmbeddedSpec
from ftscale.engines.nemo.spec import NemoSpec

_REGISTRY: dict[str, EngineSpec] = {}

#: The engine of a config that names none.
DEFAULT_ENGINE = EmbeddedSpec.name


def register(spec: EngineSpec) -> EngineSpec:
    """Add an engine (a new one, or one a test makes up); its name must be new."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"engine {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """Every registered engine's name, the default first."""
    return list(_REGISTRY)


def engine(name: str) -> EngineSpec:
    """The spec of engine ``name``; KeyError naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown engine {name!r}: the engines are {names()}") from None


for _spec in (EmbeddedSpec(), NemoSpec(), AutoModelSpec()):
    register(_spec)

__all__ = ["DEFAULT_ENGINE", "EngineSpec", "engine", "names", "register", "unregister"]
