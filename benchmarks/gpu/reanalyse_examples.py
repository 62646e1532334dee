"""Analyse the committed GPU examples (results/examples/*) again with the current analysis: scaling.csv,
tables.md and plots/ rewritten from the committed logs, as the workflow's tables job writes them.

    PYTHONPATH=scripts python3 benchmarks/gpu/reanalyse_examples.py [EXAMPLE ...]   # default: every example

Each example is analysed as the study of the config it ran (``EXAMPLES``; with Snakemake's --config
overrides where the call had them; several calls with different configs as one study of their runs), from
inside its directory, so that the CSV's ``source`` column names the log lines as ``experiments/...``. Before that, a run
directory under an older name is renamed to the name the study now gives the same run (the engine and
the precision joined the name), with ``name`` and ``run_dir`` in its run.json and ``run`` in its
launch.json to match; the logs and every other field stay as the run wrote them (launch.json's
``command`` still names the directory it ran in). A run no run of the study matches stops the script,
naming its run.json. Running it again renames nothing and writes the same files.

The study-wide provenance (library versions, commit) is what the GPU machine recorded in the example's
provenance.txt (benchmarks/gpu/run_device.sh), not this machine's: the runs did not run here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from ftscale.analyze.provenance import LIBRARIES, environment
from ftscale.analyze.results import write_results
from ftscale.engines import names as engine_names
from ftscale.engines.embedded import spec as embedded_spec
from ftscale.study.paths import RunPaths
from ftscale.study.run import IDENTITY_KEYS
from ftscale.study.sweep import Study, batch_variants, load_config_file
from ftscale.workflow import workflow_study

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "results" / "examples"

#: example directory -> the config its runs were made with (relative to the repository); a run made with
#: Snakemake's --config on top of the file names both, (file, {key: value}); an example made by several device
#: calls with different configs lists them, [file or (file, {key: value}), ...]: its study is theirs together.
EXAMPLES: dict[str, str | tuple[str, dict] | list] = {
    "2026-11-24-h100-llama31_8b-lora": "benchmarks/gpu/llama8b_lora.yaml",
    "2026-11-24-h100-llama31_8b-lora-compile": "benchmarks/gpu/llama8b_lora_compile.yaml",
    "2026-11-24-h100-llama31_8b-lora-compile-ckpt": "benchmarks/gpu/llama8b_lora_compile_ckpt.yaml",
    "2026-11-24-h200-mixtral_8x7b-lora": "benchmarks/gpu/mixtral_lora.yaml",
    "2026-12-01-h200-nemo-tiny_llama": "benchmarks/gpu/nemo_tiny.yaml",
    "2026-12-01-h200-llama31_8b-side-by-side": "benchmarks/gpu/side_by_side_8b.yaml",
    "2026-12-01-h200-llama31_8b-lora-fusedce": "benchmarks/gpu/llama8b_lora_fusedce.yaml",
    "2026-12-01-h200-automodel-anchor": "benchmarks/gpu/automodel_anchor_8b.yaml",
    "2026-12-01-h200-llama31_8b-lora-layers": "benchmarks/gpu/llama8b_lora_layers.yaml",
    "2026-12-01-h200-llama31_8b-head-to-head": "benchmarks/gpu/head_to_head_8b.yaml",
    "2026-12-01-h200-mixtral_8x7b-lora-fast": "benchmarks/gpu/mixtral_lora_fast.yaml",
    "2026-12-01-h200-llama31_8b-lora-bf16lora": "benchmarks/gpu/llama8b_lora_bf16lora.yaml",
    "2026-12-01-h200-llama31_8b-lora-attn-flash": "benchmarks/gpu/llama8b_lora_attn_flash.yaml",
    "2026-12-01-h200-llama31_8b-lora-liger-eager": "benchmarks/gpu/llama8b_lora_liger_eager.yaml",
    "2026-12-01-h200-llama31_8b-head-to-head-mbs2": "benchmarks/gpu/head_to_head_8b_mbs2.yaml",
    "2026-12-02-h200-llama31_8b-lora-autotune": "benchmarks/gpu/llama8b_lora_autotune.yaml",
    "2026-12-07-h100-llama31_8b-head-to-head-mbs2": "benchmarks/gpu/head_to_head_8b_mbs2.yaml",
    "2026-12-07-h100-llama31_8b-nemo-oom": ("benchmarks/gpu/side_by_side_8b.yaml", {"engine": ["nemo"]}),
    "2026-12-07-h100-llama31_8b-three-engines-seq2048": ["benchmarks/gpu/nemo_8b_seq2048.yaml",
                                                         "benchmarks/gpu/h2h_seq2048.yaml"],
}


def example_calls(entry: str | tuple[str, dict] | list) -> list[tuple[str, dict]]:
    """An ``EXAMPLES`` entry as (config file, --config overrides) per device call."""
    if isinstance(entry, str):
        return [(entry, {})]
    if isinstance(entry, tuple):
        return [entry]
    return [call for item in entry for call in example_calls(item)]


def example_study(entry: str | tuple[str, dict] | list) -> Study:
    """The study of an ``EXAMPLES`` entry: one config's as the workflow plans it, or several calls' together."""
    studies = [config_study(config_file, overrides) for config_file, overrides in example_calls(entry)]
    return studies[0] if len(studies) == 1 else joint_study(studies)


def joint_study(studies: list[Study]) -> Study:
    """The runs of several device calls as one study: their engines in the study's order (each engine's section
    of the config from the call that ran it), the runs by engine, the config files named one after the other.
    The tables group the runs by the config's tracks and batch shape: the calls must agree on them."""
    first = studies[0]
    shape = [(s.config["tracks"], [{k: b[k] for k in ("micro_batch", "global_batch", "seq_length")}
                                   for b in batch_variants(s.config, "data_parallel")]) for s in studies]
    if any(x != shape[0] for x in shape[1:]):
        raise SystemExit(f"{', '.join(s.source for s in studies)}: the calls differ in tracks or batch shape")
    names = [e for e in engine_names() if any(e in s.engines for s in studies)]
    config = {**first.config, "engine": names}
    for engine in names:
        ran = next(s for s in studies if engine in s.engines)
        if engine in ran.config:
            config[engine] = ran.config[engine]
    runs = sorted((run for s in studies for run in s.runs), key=lambda run: names.index(run.engine))
    if len({run.identity for run in runs}) != len(runs):
        raise SystemExit(f"{', '.join(s.source for s in studies)}: two calls plan the same run")
    return dataclasses.replace(first, config=config, runs=tuple(runs), source=", ".join(s.source for s in studies),
                               models={name: m for s in studies for name, m in s.models.items()})


def config_study(config_file: str, overrides: dict) -> Study:
    """The study as the workflow plans it (``overrides`` as Snakemake's --config), with the repository's
    references (the example has no config/)."""
    config = {**load_config_file(ROOT / config_file), **overrides}
    config["references"] = str(ROOT / "config" / "references.yaml")
    # The runs ran on the GPU machine, which had liger-kernel; the analysis here needs none of it.
    real, embedded_spec.liger_installed = embedded_spec.liger_installed, lambda: True
    try:
        return workflow_study(config, [config_file], root=ROOT)
    finally:
        embedded_spec.liger_installed = real


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def rename_runs(example: Path, study: Study) -> list[tuple[str, str]]:
    """Give every run directory of ``example`` the name the study gives the same run; returns (old, new)."""
    runs = {run.identity: run for run in study.runs}
    renamed = []
    for run_json in sorted(example.glob("experiments/*/*/*/run.json")):
        recorded = json.loads(run_json.read_text())
        identity = tuple(recorded.get(k) for k in IDENTITY_KEYS)
        if identity not in runs:
            raise SystemExit(f"{run_json}: no run of {study.source} has this identity "
                             f"({', '.join(f'{k}={v}' for k, v in zip(IDENTITY_KEYS, identity))})")
        run = runs[identity]
        old = run_json.parent
        new = example / run.directory
        if old != new:
            if new.exists():
                raise SystemExit(f"{new}: exists already; cannot rename {old} to it")
            old.rename(new)
            renamed.append((str(old.relative_to(example)), run.directory))
        paths = RunPaths(new)
        if (recorded["name"], recorded["run_dir"]) != (run.name, run.directory):
            _write_json(paths.run, {**recorded, "name": run.name, "run_dir": run.directory})
        if paths.launch.is_file() and (launch := json.loads(paths.launch.read_text())).get("run") != run.name:
            _write_json(paths.launch, {**launch, "run": run.name})
    return renamed


def device_environment(example: Path, config: dict) -> dict:
    """The study-wide provenance as the GPU machine recorded it in provenance.txt (run_device.sh): per device
    call, the GPU line, the image's versions ("torch 2.11.0+cu130 cuda 13.0 transformers 5.17.0 ..."), NeMo's
    and AutoModel's where installed ("nemo 2.7.3 megatron-core 0.15.3 ..."), "commit <sha> ..." and the date.
    An example made over several calls holds their records one after the other: the versions are the first
    call's (the image's transformers, not NeMo's pinned one), nemo from its own line, the commits all named."""
    lines = (example / "provenance.txt").read_text().splitlines()

    def pairs(prefix: str) -> dict:
        line = next((ln for ln in lines if ln.startswith(prefix)), "")
        words = line.split()
        return dict(zip(words[::2], words[1::2]))

    versions = {**pairs("nemo "), **pairs("torch ")}  # the image's transformers wins over NeMo's pin
    commits = list(dict.fromkeys(m[1] for ln in lines if (m := re.match(r"commit ([0-9a-f]{7,40})\b", ln))))
    env = environment(config, example)
    env.update(git_commit="+".join(commits) or "unknown",
               versions={name: versions.get(name, "") for name in LIBRARIES})
    return env


def reanalyse(name: str, examples_dir: Path = EXAMPLES_DIR) -> None:
    example = examples_dir / name
    study = example_study(EXAMPLES[name])
    for old, new in rename_runs(example, study):
        print(f"{name}: {old} -> {new}")
    here = Path.cwd()
    os.chdir(example)  # the CSV's sources relative to the example, as the workflow's are to its root
    try:
        records = write_results(study, Path("scaling.csv"), Path("tables.md"), plots_dir=Path("plots"),
                                env=device_environment(Path("."), study.config))
    finally:
        os.chdir(here)
    counts = {s: sum(r.status == s for r in records) for s in sorted({r.status for r in records})}
    print(f"{name}: scaling.csv, tables.md, plots/ written ({', '.join(f'{n} {s}' for s, n in counts.items())})")


if __name__ == "__main__":
    for example_name in sys.argv[1:] or EXAMPLES:
        if example_name not in EXAMPLES:
            raise SystemExit(f"{example_name}: not an example of {EXAMPLES_DIR} (known: {', '.join(EXAMPLES)})")
        reanalyse(example_name)
