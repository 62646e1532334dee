"""Study configuration: validation against the JSON schemas in config/, models as data, the run plan.

Everything here runs before any job is submitted, so every error names the file, the key and the
value that broke a rule (``ConfigError``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from ftscale import REPO_ROOT

CONFIG_SCHEMA = REPO_ROOT / "config" / "config.schema.yaml"
MODEL_SCHEMA = REPO_ROOT / "config" / "model.schema.yaml"

TRACKS = ("data_parallel", "model_parallel")


class ConfigError(ValueError):
    """Bad input, found before any job runs. The message names file, key and value."""


def _key_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fill_defaults(validator_class: type) -> type:
    """A jsonschema validator that also writes schema defaults into the instance (as Snakemake's
    ``validate(..., set_default=True)`` does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _fill_defaults(jsonschema.Draft202012Validator)


def validate(instance: dict, schema_path: Path, source: str) -> dict:
    """Validate ``instance`` (filling defaults) against a YAML JSON schema; raise ConfigError
    naming ``source``, the key path and the offending value."""
    schema = yaml.safe_load(schema_path.read_text())
    instance = copy.deepcopy(instance)
    errors = sorted(_Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"{source}: key '{_key_path(e.absolute_path)}' = {json.dumps(e.instance)[:120]}: {e.message}"
            for e in errors
        ]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return instance


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class Model:
    """A model described by ``models/<name>/model.yaml``."""

    name: str
    directory: Path
    spec: dict

    @property
    def arch(self) -> dict:
        return self.spec["architecture"]

    @property
    def is_moe(self) -> bool:
        return self.arch["type"] == "mixtral"

    @property
    def checkpoint(self) -> Path:
        """The imported checkpoint every experiment reads (never writes)."""
        return self.directory / "model"

    @property
    def yaml_path(self) -> Path:
        return self.directory / "model.yaml"

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


def load_model(name: str, root: Path = REPO_ROOT, *, check_source: bool = True) -> Model:
    directory = root / "models" / name
    path = directory / "model.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in (root / "models").glob("*/model.yaml"))
        raise ConfigError(f"unknown model '{name}': {path} does not exist (known models: {', '.join(known)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    spec = validate(raw, MODEL_SCHEMA, str(path))
    if spec["name"] != name:
        raise ConfigError(f"{path}: key 'name' = {spec['name']!r}: must equal the directory name {name!r}")
    model = Model(name=name, directory=directory, spec=spec)
    if check_source and model.source_kind() == "local" and not model.local_source(root).is_dir():
        raise ConfigError(
            f"{path}: key 'source' = {spec['source']!r}: local Hugging Face directory "
            f"{model.local_source(root)} does not exist"
        )
    return model


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Run:
    """One training job. Its identity (track, model, layout, batch) is its name and its path."""

    track: str
    model: str
    engine: str
    gpus: int
    tp: int
    ep: int
    dp: int
    sp: bool
    micro_batch: int
    global_batch: int
    seq_length: int
    steps: int
    warmup_steps: int
    learning_rate: float
    seed: int
    precision: str
    device: str
    lora: dict | None
    scaling: str | None = None  # data-parallel track: weak or strong
    nodes: int = 1
    weights: str = "pretrained"
    engine_options: dict = field(default_factory=dict)  # the config's `embedded:` options

    @property
    def data_parallel_size(self) -> int:
        """Replicas of the non-expert weights: experts are carved out of the data-parallel ranks
        (as in Megatron), so the attention and dense layers see ep x dp replicas."""
        return self.ep * self.dp

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length

    @property
    def name(self) -> str:
        batch = f"mbs{self.micro_batch}_gbs{self.global_batch}_seq{self.seq_length}"
        if self.track == "data_parallel":
            ep = f"_ep{self.ep}" if self.ep > 1 else ""
            return f"gpus{self.gpus}{ep}_{batch}"
        sp = "_sp" if self.sp else ""
        return f"tp{self.tp}_ep{self.ep}_dp{self.dp}{sp}_{batch}"

    @property
    def directory(self) -> str:
        """Relative to the working directory (the repository root)."""
        return f"experiments/{self.track}/{self.model}/{self.name}"

    @property
    def checkpoint(self) -> str:
        return f"models/{self.model}/model"

    def to_dict(self) -> dict:
        """The resolved configuration written to the run's run.json and read by the engines."""
        out = asdict(self)
        out.update(
            name=self.name,
            run_dir=self.directory,
            checkpoint=self.checkpoint,
            grad_accum=self.grad_accum,
            data_parallel_size=self.data_parallel_size,
            gpus_per_node=self.gpus // self.nodes,
        )
        return out


def layout_errors(model: Model, tp: int, ep: int, dp: int, gpus: int, sp: bool, lora: bool) -> list[str]:
    """Every rule a model-parallel layout breaks (empty when it is valid)."""
    arch = model.arch
    errs = []
    if gpus < 2:
        errs.append(f"model-parallel runs need 2 or more GPUs, this one has tp x ep x dp = {gpus}")
    if arch["num_attention_heads"] % tp or arch["num_key_value_heads"] % tp:
        errs.append(
            f"tp = {tp} must divide the attention heads ({arch['num_attention_heads']}) "
            f"and the key/value heads ({arch['num_key_value_heads']})"
        )
    if arch["intermediate_size"] % tp or arch["vocab_size"] % tp:
        errs.append(f"tp = {tp} must divide intermediate_size ({arch['intermediate_size']}) "
                    f"and vocab_size ({arch['vocab_size']})")
    if ep > 1 and not model.is_moe:
        errs.append(f"ep = {ep} but {model.name} is a dense model: expert parallelism needs experts")
    if model.is_moe and arch["num_local_experts"] % ep:
        errs.append(f"ep = {ep} must divide the number of experts ({arch['num_local_experts']})")
    if sp and tp < 2:
        errs.append("sp = true needs tp > 1 (sequence parallelism shards along the tensor-parallel group)")
    if lora:
        errs.append("LoRA is not used on the model-parallel track (full fine-tuning)")
    return errs


@dataclass(frozen=True)
class Study:
    """The validated configuration and the runs it asks for."""

    config: dict
    models: dict[str, Model]
    runs: tuple[Run, ...]
    source: str

    def runs_of(self, track: str) -> list[Run]:
        return [r for r in self.runs if r.track == track]

    def run_by_dir(self, directory: str) -> Run:
        for run in self.runs:
            if run.directory == directory:
                return run
        raise KeyError(directory)

    def scaling_groups(self, model: str) -> dict[str, list[Run]]:
        """Data-parallel runs of one model per scaling mode and batch shape (the 1-GPU run belongs to
        every mode), labelled for the tables."""
        dp_cfg = self.config["tracks"]["data_parallel"]
        variants = batch_variants(self.config, "data_parallel")
        runs = [r for r in self.runs_of("data_parallel") if r.model == model]
        groups = {}
        for mode in dp_cfg["scaling"]:
            for batch in variants:
                label = mode if len(variants) == 1 else (
                    f"{mode}, micro batch {batch['micro_batch']}, sequence {batch['seq_length']}")
                groups[label] = sorted(
                    (r for r in runs if r.micro_batch == batch["micro_batch"] and r.seq_length == batch["seq_length"]
                     and r.global_batch == batch["global_batch"] * (r.gpus if mode == "weak" else 1)),
                    key=lambda r: r.gpus)
        return groups


def _track_batch(config: dict, track: str) -> dict:
    batch = dict(config["batch"])
    batch.update(config["tracks"].get(track, {}).get("batch", {}) or {})
    return batch


def _as_list(value: int | list[int]) -> list[int]:
    return value if isinstance(value, list) else [value]


def batch_variants(config: dict, track: str) -> list[dict]:
    """The batch settings of a track, one dict per (micro batch, sequence length) of the sweep."""
    batch = _track_batch(config, track)
    return [{**batch, "micro_batch": m, "seq_length": s}
            for s in _as_list(batch["seq_length"]) for m in _as_list(batch["micro_batch"])]


def load_study(config: dict, source: str = "config", root: Path = REPO_ROOT) -> Study:
    """Validate a configuration (as Snakemake loaded it) and expand it into runs.

    ``source`` names the config file(s) in error messages.
    """
    cfg = validate(config, CONFIG_SCHEMA, source)
    tracks = cfg["tracks"]
    models = {name: load_model(name, root) for name in cfg["models"]}
    if cfg["engine"] == "nemo":
        for model in models.values():
            if "nemo" not in model.spec:
                raise ConfigError(
                    f"{model.yaml_path}: key 'nemo' is missing: engine 'nemo' (from {source}) needs "
                    "the NeMo recipe, model_class and config_class of this model"
                )
        if not cfg["container"]:
            raise ConfigError(
                f"{source}: key 'container' = \"\": engine 'nemo' needs the NeMo container image "
                "(e.g. --config container=nvcr.io/nvidia/nemo:TAG), or \"none\" when NeMo is installed on the nodes"
            )

    runs: dict[str, Run] = {}
    errors: list[str] = []

    def add(run: Run) -> None:
        per_node = cfg["gpus_per_node"]
        if run.gpus > per_node:
            if run.gpus % per_node:
                errors.append(f"{source}: run {run.directory}: {run.gpus} GPUs do not fill whole nodes of "
                              f"gpus_per_node = {per_node}")
                return
            run = dataclasses.replace(run, nodes=run.gpus // per_node)
        if cfg["engine"] == "nemo":
            from ftscale.engine.nemo import check_run

            errors.extend(f"{source}: {e}" for e in check_run(run.to_dict(), models[run.model].spec))
        runs.setdefault(run.directory, run)

    def add_track_runs(track: str, batch: dict) -> None:
        common = dict(
            model="", engine=cfg["engine"], micro_batch=batch["micro_batch"], seq_length=batch["seq_length"],
            steps=batch["steps"], warmup_steps=batch["warmup_steps"], learning_rate=batch["learning_rate"],
            seed=cfg["seed"], precision=cfg["precision"], device=cfg["device"],
            engine_options=dict(cfg["embedded"]) if cfg["engine"] == "embedded" else {},
        )
        if track == "data_parallel":
            dp_cfg = tracks[track]
            if dp_cfg["moe_expert_parallel"] and cfg["engine"] != "nemo":
                errors.append(f"{source}: key 'tracks.data_parallel.moe_expert_parallel' = true: only engine 'nemo' "
                              "splits experts on the data-parallel track")
            for name, model in models.items():
                for mode in dp_cfg["scaling"]:
                    for i, gpus in enumerate(dp_cfg["gpus"]):
                        ep = gpus if (dp_cfg["moe_expert_parallel"] and model.is_moe) else 1
                        if ep > 1 and model.arch["num_local_experts"] % ep:
                            errors.append(f"{source}: key 'tracks.data_parallel.gpus[{i}]' = {gpus}: with "
                                          f"moe_expert_parallel, ep = {gpus} must divide the experts of {name} "
                                          f"({model.arch['num_local_experts']})")
                            continue
                        gbs = batch["global_batch"] * (gpus if mode == "weak" else 1)
                        if gbs % (batch["micro_batch"] * gpus):
                            errors.append(
                                f"{source}: key 'tracks.data_parallel.gpus[{i}]' = {gpus}: global batch {gbs} "
                                f"({mode} scaling) is not divisible by micro_batch x data-parallel size = "
                                f"{batch['micro_batch']} x {gpus}"
                            )
                            continue
                        add(Run(**{**common, "model": name}, track=track, gpus=gpus, tp=1, ep=ep, dp=gpus // ep,
                                sp=False, global_batch=gbs, lora=dict(dp_cfg["lora"]),
                                scaling=mode if gpus > 1 else None,
                                weights=model.spec["weights"]))
        else:
            layouts = tracks[track]["layouts"]
            for name in layouts:
                if name not in models:
                    errors.append(f"{source}: key 'tracks.model_parallel.layouts.{name}': model '{name}' is not in 'models'")
            for name, model in models.items():
                for i, lay in enumerate(layouts.get(name, [])):
                    key = f"{source}: key 'tracks.model_parallel.layouts.{name}[{i}]' = {json.dumps(lay)}"
                    tp, ep, dp, sp = lay["tp"], lay["ep"], lay["dp"], lay["sp"]
                    gpus = tp * ep * dp
                    errs = layout_errors(model, tp, ep, dp, gpus, sp, lora=False)
                    if sp and batch["seq_length"] % tp:
                        errs.append(f"sp needs tp = {tp} to divide seq_length = {batch['seq_length']}")
                    gbs = batch["global_batch"] * dp * ep
                    if gbs % (batch["micro_batch"] * dp * ep):
                        errs.append("global batch not divisible by micro_batch x data-parallel size")
                    if errs:
                        errors.extend(f"{key}: {e}" for e in errs)
                        continue
                    add(Run(**{**common, "model": name}, track=track, gpus=gpus, tp=tp, ep=ep, dp=dp,
                            sp=sp, global_batch=gbs, lora=None, weights=model.spec["weights"]))

    for track in TRACKS:
        if not tracks[track]["enabled"]:
            continue
        first = _track_batch(cfg, track)
        if first["warmup_steps"] >= first["steps"]:
            errors.append(f"{source}: key 'batch' (with tracks.{track}.batch): warmup_steps = "
                          f"{first['warmup_steps']} must be less than steps = {first['steps']}")
            continue
        for batch in batch_variants(cfg, track):
            add_track_runs(track, batch)

    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(dict.fromkeys(errors)))
    if not runs:
        raise ConfigError(f"{source}: no runs: every track is disabled or empty")
    return Study(config=cfg, models=models, runs=tuple(runs.values()), source=source)


def write_text(text: str, path: str | Path, log: str | Path | None = None) -> None:
    Path(path).write_text(text)
    if log:
        with open(log, "a") as out:
            out.write(f"wrote {path}\n")


def write_run_files(run: dict, sbatch: str, run_path: str | Path, sbatch_path: str | Path,
                    log: str | Path | None = None) -> None:
    """The run's resolved configuration (read by the engines and the analysis) and its sbatch script."""
    write_text(json.dumps(run, indent=2, sort_keys=True) + "\n", run_path, log)
    write_text(sbatch, sbatch_path, log)
