"""The study: a validated configuration expanded into its runs, before any job is submitted.

An engine's section (``embedded:``, ``nemo:``, ``automodel:``) is one mapping of options, or a list of
option sets (``OptionSet``), a sweep axis like the batch lists: every run once per set. Where a study runs
more than one set of an engine, the set's name ends each of its runs' names (``Run.option_set``).

Every error names the file, the key and the value that broke a rule (``ConfigError``); all errors
of a configuration are reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ftscale.engines import DEFAULT_ENGINE, engine, names
from ftscale.study.check import run_errors
from ftscale.study.data import data_errors
from ftscale.study.layout import Layout
from ftscale.study.models import Model, load_model
from ftscale.study.run import TRACKS, Run
from ftscale.study.schema import CONFIG_SCHEMA, ConfigError, load_yaml, shown, validate

#: An option set's name: it ends its runs' names (the workflow's ``name`` wildcard is ``[A-Za-z0-9_]+``).
OPTION_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class OptionSet:
    """One set of an engine's options: its config section when that is one mapping (``name`` ""), or one
    item of the section's list, named by its ``name:`` (else after its options, ``set_name``)."""

    name: str
    options: dict


def set_name(options: dict) -> str:
    """The name of an option set that gives none, from its options in their order ('compile_fused_ce_chunked');
    'defaults' for an empty set."""
    parts = [key if value is True else f"no_{key}" if value is False else f"{key}_{value}"
             for key, value in options.items()]
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))).strip("_") or "defaults"


def option_sets_of(section: object, engine_name: str, source: str) -> list[OptionSet]:
    """The option sets of an engine's section: none or a mapping is one set; a list is one set per item,
    each a mapping with an optional ``name:`` (unique within the list)."""
    if section is None:
        return [OptionSet("", {})]
    if isinstance(section, dict):
        return [OptionSet("", dict(section))]
    if not isinstance(section, list) or not section:
        raise ConfigError(f"{source}: key '{engine_name}' = {shown(section)}: the {engine_name} engine's "
                          "options are a mapping of option: value, or a non-empty list of such mappings (option "
                          "sets, each with an optional name:)")
    sets: list[OptionSet] = []
    for i, item in enumerate(section):
        key = f"{engine_name}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: key '{key}' = {shown(item)}: an option set is a mapping of "
                              "option: value, with an optional name:")
        options = {k: v for k, v in item.items() if k != "name"}
        name = item.get("name", set_name(options))
        if not isinstance(name, str) or not OPTION_SET_NAME.match(name):
            raise ConfigError(f"{source}: key '{key}.name' = {json.dumps(name)}: an option set's name is letters, "
                              "digits and underscores, starting with a letter or digit (it ends its runs' names)")
        if (j := next((j for j, s in enumerate(sets) if s.name == name), None)) is not None:
            raise ConfigError(f"{source}: key '{key}.name' = {json.dumps(name)}: {engine_name}[{j}] has this name "
                              "already; give each option set its own name:")
        sets.append(OptionSet(name, options))
    return sets


def _select_option_sets(sets: dict[str, list[OptionSet]], listed: list[str], chosen: list[str] | None,
                        engines: list[str], source: str) -> dict[str, list[OptionSet]]:
    """The option sets the config's ``option_sets`` selects, by name, of every engine whose section is a list
    (``listed``); all of them where it is not given."""
    if chosen is None:
        return sets
    known = {s.name for name in listed for s in sets[name]}
    for i, name in enumerate(chosen):
        if name not in known:
            raise ConfigError(f"{source}: key 'option_sets[{i}]' = {json.dumps(name)}: no option set of "
                              f"{' or '.join(listed) or 'any engine section'} has this name "
                              f"(the names: {sorted(known)})")
    out = dict(sets)
    for name in listed:
        out[name] = [s for s in sets[name] if s.name in chosen]
        if not out[name] and name in engines:
            raise ConfigError(f"{source}: key 'option_sets' = {json.dumps(chosen)}: selects none of the {name} "
                              f"engine's option sets ({[s.name for s in sets[name]]})")
    return out


def _check_study_options(sets: dict[str, list[OptionSet]], listed: list[str], source: str) -> None:
    """The options an engine reads once per study (``EngineSpec.study_options``) are the same in all its sets."""
    for name in listed:
        first = sets[name][0].options
        for i, option_set in enumerate(sets[name][1:], start=1):
            for key in engine(name).study_options:
                if option_set.options.get(key) != first.get(key):
                    raise ConfigError(
                        f"{source}: key '{name}[{i}].{key}' = {json.dumps(option_set.options.get(key))}: the "
                        f"{name} engine reads {key} once per study, not per run: every option set must have "
                        f"the first set's value ({json.dumps(first.get(key))})")


def engines_of(config: dict) -> list[str]:
    """The config's ``engine``: one name or a list."""
    chosen = config.get("engine", DEFAULT_ENGINE)
    return list(chosen) if isinstance(chosen, list) else [chosen]


@dataclass(frozen=True)
class Study:
    """The validated configuration and the runs it asks for."""

    config: dict
    models: dict[str, Model]
    runs: tuple[Run, ...]
    source: str

    @property
    def engines(self) -> list[str]:
        return engines_of(self.config)

    def option_sets(self, engine_name: str) -> list[OptionSet]:
        """The option sets of an engine that the study runs (one where its section is a mapping)."""
        return option_sets_of(self.config.get(engine_name), engine_name, self.source)

    def engine_section(self, engine_name: str) -> dict:
        """The engine's options as what runs once per study reads them (the checkpoint conversion): its
        first option set, which agrees with the others on ``EngineSpec.study_options``."""
        return self.option_sets(engine_name)[0].options

    def runs_of(self, track: str) -> list[Run]:
        return [r for r in self.runs if r.track == track]

    def run_by_dir(self, directory: str) -> Run:
        for run in self.runs:
            if run.directory == directory:
                return run
        raise KeyError(directory)

    def scaling_groups(self, model: str) -> dict[str, list[Run]]:
        """Data-parallel runs of one model per engine, option set, scaling mode and batch shape (the 1-GPU
        run belongs to every mode), labelled for the tables."""
        dp_cfg = self.config["tracks"]["data_parallel"]
        variants = batch_variants(self.config, "data_parallel")
        runs = [r for r in self.runs_of("data_parallel") if r.model == model]
        groups = {}
        for engine_name in self.engines:
            sets = self.option_sets(engine_name)
            for option_set in (s.name if len(sets) > 1 else "" for s in sets):
                for mode in dp_cfg["scaling"]:
                    for batch in variants:
                        parts = [engine_name] if len(self.engines) > 1 else []
                        parts += [option_set] if option_set else []
                        parts.append(mode)
                        if len(variants) > 1:
                            parts.append(f"micro batch {batch['micro_batch']}, sequence {batch['seq_length']}")
                        groups[", ".join(parts)] = sorted(
                            (r for r in runs if r.engine == engine_name and r.option_set == option_set
                             and r.micro_batch == batch["micro_batch"] and r.seq_length == batch["seq_length"]
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


def _check_engines(cfg: dict, models: dict[str, Model], source: str) -> None:
    chosen = engines_of(cfg)
    for i, name in enumerate(chosen):
        if name not in names():
            key = "engine" if isinstance(cfg.get("engine"), str) else f"engine[{i}]"
            raise ConfigError(f"{source}: key '{key}' = {json.dumps(name)}: must be one of {names()}")
    for spec in map(engine, chosen):
        section = spec.model_section
        for model in models.values():
            if section and section not in model.spec:
                raise ConfigError(
                    f"{model.yaml_path}: key '{section}' is missing: engine '{spec.name}' (from {source}) needs "
                    f"this model's '{section}' section (see models/template/model.yaml)")
    needs = [spec.name for spec in map(engine, chosen) if spec.needs_container]
    if needs and not cfg["container"]:
        raise ConfigError(
            f"{source}: key 'container' = \"\": engine '{needs[0]}' needs the NeMo container image "
            "(e.g. --config container=nvcr.io/nvidia/nemo:TAG), or \"none\" when NeMo is installed on the nodes")


def load_config_file(path: Path | str) -> dict:
    """A config file read as Snakemake reads one, with errors that name it: the file and line of a YAML
    syntax error, the file when it is empty or not a mapping of keys."""
    raw = load_yaml(Path(path))
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: the configuration is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys (key: value), "
                          f"not a {type(raw).__name__}")
    return raw


def load_study(config: dict, source: str = "config", root: Path = Path(".")) -> Study:
    """Validate a configuration (as Snakemake loaded it) and expand it into runs.

    ``source`` names the config file(s) in error messages; ``root`` is the workflow's root directory.
    """
    if not config:
        raise ConfigError(f"{source}: the configuration is empty")
    sections = {name: config[name] for name in names() if name in config}
    cfg = validate({k: v for k, v in config.items() if k not in sections}, CONFIG_SCHEMA, source)
    sets = {name: option_sets_of(config.get(name), name, source) for name in names()}
    listed = [name for name in names() if isinstance(config.get(name), list)]
    sets = _select_option_sets(sets, listed, cfg.get("option_sets"), engines_of(cfg), source)
    _check_study_options(sets, listed, source)
    for name in sections:
        # a list keeps each set's name, so that the study's option sets read back the same (Study.option_sets)
        cfg[name] = [{"name": s.name, **s.options} for s in sets[name]] if name in listed else sets[name][0].options
    tracks = cfg["tracks"]
    models = {name: load_model(name, root) for name in cfg["models"]}
    _check_engines(cfg, models, source)
    if data_problems := data_errors(cfg["data"], source, root):
        raise ConfigError("invalid data:\n  " + "\n  ".join(data_problems))

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
        errors.extend(f"{source}: {e}" for e in run_errors(run, models[run.model].spec))
        runs.setdefault(run.directory, run)

    def add_track_runs(track: str, batch: dict, engine_name: str, option_set: OptionSet, several: bool) -> None:
        common = dict(
            engine=engine_name, micro_batch=batch["micro_batch"], seq_length=batch["seq_length"],
            steps=batch["steps"], warmup_steps=batch["warmup_steps"], learning_rate=batch["learning_rate"],
            seed=cfg["seed"], precision=cfg["precision"], device=cfg["device"],
            engine_options=dict(option_set.options), option_set=option_set.name if several else "",
            data=dict(cfg["data"]),
        )
        if track == "data_parallel":
            dp_cfg = tracks[track]
            for name, model in models.items():
                for mode in dp_cfg["scaling"]:
                    for i, gpus in enumerate(dp_cfg["gpus"]):
                        key = f"{source}: key 'tracks.data_parallel.gpus[{i}]' = {gpus}"
                        ep = gpus if (dp_cfg["moe_expert_parallel"] and model.is_moe) else 1
                        gbs = batch["global_batch"] * (gpus if mode == "weak" else 1)
                        if gbs % (batch["micro_batch"] * gpus):
                            errors.append(f"{key}: global batch {gbs} ({mode} scaling) is not divisible by "
                                          f"micro_batch x data-parallel size = {batch['micro_batch']} x {gpus}")
                            continue
                        layout = Layout(tp=1, ep=ep, dp=gpus // ep)
                        if errs := layout.errors(model.arch):
                            errors.extend(f"{key} (moe_expert_parallel, {name}): {e}" for e in errs)
                            continue
                        add(Run(**common, model=name, track=track, gpus=gpus, tp=1, ep=ep, dp=gpus // ep,
                                sp=False, global_batch=gbs, lora=dict(dp_cfg["lora"]),
                                scaling=mode if gpus > 1 else None, weights=model.spec["weights"]))
        else:
            layouts = tracks[track]["layouts"]
            for name in layouts:
                if name not in models:
                    errors.append(f"{source}: key 'tracks.model_parallel.layouts.{name}': model '{name}' is not in 'models'")
            for name, model in models.items():
                for i, lay in enumerate(layouts.get(name, [])):
                    key = f"{source}: key 'tracks.model_parallel.layouts.{name}[{i}]' = {json.dumps(lay)}"
                    layout = Layout.coerce(lay)
                    errs = layout.errors(model.arch, batch["seq_length"])
                    if layout.world_size < 2:
                        errs.append(f"model-parallel runs need 2 or more GPUs, this one has tp x pp x ep x dp = "
                                    f"{layout.world_size}")
                    if layout.pp > 1 and not engine(engine_name).pipeline_parallel:
                        errs.append(f"pp = {layout.pp}: the {engine_name} engine has no pipeline parallelism "
                                    f"(engines with pp > 1: {[n for n in names() if engine(n).pipeline_parallel]})")
                    if errs:
                        errors.extend(f"{key}: {e}" for e in errs)
                        continue
                    gbs = batch["global_batch"] * layout.data_parallel_size
                    add(Run(**common, model=name, track=track, gpus=layout.world_size, tp=layout.tp, pp=layout.pp,
                            ep=layout.ep, dp=layout.dp, sp=layout.sp, global_batch=gbs, lora=None,
                            weights=model.spec["weights"]))

    for track in TRACKS:
        if not tracks[track]["enabled"]:
            continue
        first = _track_batch(cfg, track)
        if first["warmup_steps"] >= first["steps"]:
            errors.append(f"{source}: key 'batch' (with tracks.{track}.batch): warmup_steps = "
                          f"{first['warmup_steps']} must be less than steps = {first['steps']}")
            continue
        for engine_name in engines_of(cfg):
            for option_set in sets[engine_name]:
                for batch in batch_variants(cfg, track):
                    add_track_runs(track, batch, engine_name, option_set, len(sets[engine_name]) > 1)

    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(dict.fromkeys(errors)))
    if not runs:
        raise ConfigError(f"{source}: no runs: every track is disabled or empty")
    return Study(config=cfg, models=models, runs=tuple(runs.values()), source=source)
