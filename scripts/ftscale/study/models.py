"""Models as data: ``models/<name>/model.yaml``, validated against config/model.schema.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftscale.study.paths import MODELS, ModelPaths, model_paths
from ftscale.study.schema import MODEL_SCHEMA, ConfigError, load_yaml, validate


@dataclass(frozen=True)
class Model:
    """A model described by ``models/<name>/model.yaml``."""

    name: str
    paths: ModelPaths
    spec: dict

    @property
    def arch(self) -> dict:
        return self.spec["architecture"]

    @property
    def is_moe(self) -> bool:
        return self.arch["type"] == "mixtral"

    @property
    def directory(self) -> Path:
        return self.paths.directory

    @property
    def checkpoint(self) -> Path:
        """The imported checkpoint every experiment reads (never writes)."""
        return self.paths.checkpoint

    @property
    def yaml_path(self) -> Path:
        return self.paths.spec

    def source_kind(self) -> str:
        src = self.spec["source"]
        if src == "synthetic":
            return "synthetic"
        if src.startswith("hf://"):
            return "hub"
        return "local"

    def local_source(self, root: Path) -> Path:
        path = Path(self.spec["source"])
        return path if path.is_absolute() else root / path


def known_models(root: Path) -> list[str]:
    return sorted(p.parent.name for p in (Path(root) / MODELS).glob("*/model.yaml"))


def load_model(name: str, root: Path = Path("."), *, check_source: bool = True) -> Model:
    root = Path(root)
    paths = model_paths(name, root)
    path = paths.spec
    if not path.is_file():
        if not (root / MODELS).is_dir():
            raise ConfigError(f"unknown model '{name}': there is no {MODELS}/ directory in {root.resolve()}: "
                              "run from the workflow's root directory (the repository checkout)")
        raise ConfigError(f"unknown model '{name}': {path} does not exist "
                          f"(known models: {', '.join(known_models(root))})")
    raw = load_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty")
    spec = validate(raw, MODEL_SCHEMA, str(path))
    if spec["name"] != name:
        raise ConfigError(f"{path}: key 'name' = {spec['name']!r}: must equal the directory name {name!r}")
    model = Model(name=name, paths=paths, spec=spec)
    if check_source and model.source_kind() == "local" and not model.local_source(root).is_dir():
        raise ConfigError(
            f"{path}: key 'source' = {spec['source']!r}: local Hugging Face directory "
            f"{model.local_source(root)} does not exist"
        )
    return model
