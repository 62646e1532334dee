"""Analyse the committed GPU examples (results/examples/*) again with the current analysis: scaling.csv,
tables.md and plots/ rewritten from the committed logs, as the workflow's tables job writes them.

    PYTHONPATH=scripts python3 benchmarks/gpu/reanalyse_examples.py [EXAMPLE ...]   # default: every example

Each example is analysed as the study of the config it ran (``EXAMPLES``: the file, with the --config overrides
that select the part of it the call ran, its option sets, engines and batch; several calls as one study of
their runs), from
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
from typing import NamedTuple

from ftscale.analyze.provenance import LIBRARIES, environment
from ftscale.analyze.results import write_results
from ftscale.engines import names as engine_names
from ftscale.engines.embedded import spec as embedded_spec
from ftscale.study.paths import RunPaths
from ftscale.study.run import IDENTITY_KEYS, Run
from ftscale.study.sweep import Study, batch_variants, load_config_file
from ftscale.workflow import merged_config, workflow_study

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "results" / "examples"

class Call(NamedTuple):
    """One device call of an example: the config file (relative to the repository), Snakemake's --config on top
    of it (``overrides``: which option sets, engines and batch the call ran) and ``ran_as``, the file the call
    named, as the example's tables.md names it, where that file has since been merged into ``config`` (it is in
    the repository at the commit of the example's provenance.txt)."""

    config: str
    overrides: dict = {}  # noqa: RUF012  (never changed: merged_config() makes a new mapping)
    ran_as: str = ""


GPU = "benchmarks/gpu/"
LLAMA, MIXTRAL, H2H = (GPU + name for name in ("llama8b_lora.yaml", "mixtral_lora.yaml", "head_to_head_8b.yaml"))
#: The head to head of the embedded engine (its fast option set) and AutoModel.
H2H_FAST = {"engine": ["embedded", "automodel"], "option_sets": ["fast"]}

#: example directory -> its device call, or the calls whose runs make it up (one study of them all).
EXAMPLES: dict[str, Call | list[Call]] = {
    "2026-11-24-h100-llama31_8b-lora": Call(LLAMA, {"option_sets": ["eager"], "batch": {
        "micro_batch": [1, 2], "seq_length": [2048, 4096], "steps": 6, "warmup_steps": 2}}),
    "2026-11-24-h100-llama31_8b-lora-compile": Call(LLAMA, {"option_sets": ["compile"], "batch": {
        "micro_batch": [1, 2]}}, GPU + "llama8b_lora_compile.yaml"),
    "2026-11-24-h100-llama31_8b-lora-compile-ckpt": Call(LLAMA, {"option_sets": ["compile_ckpt"], "batch": {"micro_batch": [2, 4]}},
                                                         GPU + "llama8b_lora_compile_ckpt.yaml"),
    "2026-11-24-h200-mixtral_8x7b-lora": Call(MIXTRAL, {"option_sets": ["eager"], "batch": {"micro_batch": 1}}),
    "2026-12-01-h200-nemo-tiny_llama": Call(GPU + "nemo_tiny.yaml"),
    "2026-12-01-h200-llama31_8b-side-by-side": Call(H2H, {"option_sets": ["compile_model"], "batch": {
        "micro_batch": 1}}, GPU + "side_by_side_8b.yaml"),
    "2026-12-01-h200-llama31_8b-lora-fusedce": Call(LLAMA, {"option_sets": ["fusedce"], "batch": {"micro_batch": [2, 4]}},
                                                    GPU + "llama8b_lora_fusedce.yaml"),
    "2026-12-01-h200-automodel-anchor": Call(H2H, {"engine": ["automodel"], "batch": {"micro_batch": 2}},
                                             GPU + "automodel_anchor_8b.yaml"),
    "2026-12-01-h200-llama31_8b-lora-layers": Call(LLAMA, {"option_sets": ["layers"], "batch": {"micro_batch": [2, 4]}},
                                                   GPU + "llama8b_lora_layers.yaml"),
    "2026-12-01-h200-llama31_8b-head-to-head": Call(H2H, H2H_FAST),
    "2026-12-01-h200-mixtral_8x7b-lora-fast": Call(MIXTRAL, {"option_sets": ["fast"], "batch": {"micro_batch": 1}},
                                                     GPU + "mixtral_lora_fast.yaml"),
    "2026-12-01-h200-llama31_8b-lora-bf16lora": Call(LLAMA, {"option_sets": ["bf16lora"], "batch": {"micro_batch": [2, 4]}},
                                                     GPU + "llama8b_lora_bf16lora.yaml"),
    "2026-12-01-h200-llama31_8b-lora-attn-flash": Call(LLAMA, {"option_sets": ["flash"], "batch": {"micro_batch": 2}},
                                                       GPU + "llama8b_lora_attn_flash.yaml"),
    "2026-12-01-h200-llama31_8b-lora-liger-eager": Call(LLAMA, {"option_sets": ["liger_eager"], "batch": {
        "micro_batch": 2}}, GPU + "llama8b_lora_liger_eager.yaml"),
    "2026-12-01-h200-llama31_8b-head-to-head-mbs2": Call(H2H, {**H2H_FAST, "batch": {"micro_batch": 2, "steps": 10}},
                                                         GPU + "head_to_head_8b_mbs2.yaml"),
    "2026-12-02-h200-llama31_8b-lora-autotune": Call(LLAMA, {"option_sets": ["autotune"], "batch": {
        "micro_batch": 2, "steps": 10, "warmup_steps": 4}}, GPU + "llama8b_lora_autotune.yaml"),
    "2026-12-07-h100-llama31_8b-head-to-head-mbs2": Call(H2H, {**H2H_FAST, "batch": {"micro_batch": 2, "steps": 10}},
                                                         GPU + "head_to_head_8b_mbs2.yaml"),
    "2026-12-07-h100-llama31_8b-nemo-oom": Call(H2H, {"engine": ["nemo"], "batch": {"micro_batch": 1}},
                                                GPU + "side_by_side_8b.yaml"),
    "2026-12-07-h100-llama31_8b-three-engines-seq2048": [
        Call(H2H, {"engine": ["nemo"], "batch": {"micro_batch": 1, "seq_length": 2048}}, GPU + "nemo_8b_seq2048.yaml"),
        Call(H2H, {**H2H_FAST, "batch": {"micro_batch": 1, "seq_length": 2048, "steps": 10}},
             GPU + "h2h_seq2048.yaml")],
    "2026-12-07-h100-llama31_8b-fp8": Call(LLAMA, {"option_sets": ["bf16lora", "fp8_tensorwise", "fp8_rowwise"]}),
    "2026-12-07-h100-llama31_8b-dgxc": Call(GPU + "dgxc_8b.yaml"),
    "2026-12-07-h100-llama_4l-fp8-numerics": Call(GPU + "fp8_numerics.yaml"),
    "2026-12-07-h100-mixtral_8x7b-oom": Call(MIXTRAL, {"option_sets": ["fast", "fast_loop"]}),
    "2026-12-07-h100-mixtral_16l-experts": Call(MIXTRAL, {"option_sets": ["fast", "fast_loop"],
                                                          "models": ["mixtral_16l_synthetic"]}),
    # Snakemake's --config cannot set a number inside batch: the call ran a copy of mixtral_lora.yaml made on the
    # machine with micro batch 4, global batch 8 (sed, docs/journal/gpu-sessions.md)
    "2026-12-07-h100-mixtral_16l-mbs4": Call(MIXTRAL, {"option_sets": ["fast"], "models": ["mixtral_16l_synthetic"],
                                                       "batch": {"micro_batch": 4, "global_batch": 8}},
                                             GPU + "mixtral_lora_mbs4.yaml"),
    # On the CPU, across the two nodes of the private Slurm test cluster (tests/slurm/test_two_nodes.py)
    "2026-12-07-cpu-two-nodes": Call("tests/config/slurm_two_nodes.yaml"),
}


def example_calls(entry: Call | list[Call]) -> list[Call]:
    """An ``EXAMPLES`` entry as its device calls."""
    return entry if isinstance(entry, list) else [entry]


def example_study(entry: Call | list[Call]) -> Study:
    """The study of an ``EXAMPLES`` entry: one config's as the workflow plans it, or several calls' together."""
    studies = [config_study(call) for call in example_calls(entry)]
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


def config_study(call: Call) -> Study:
    """The study of a device call as the workflow plans it, with the repository's references (the example has
    no config/), named as the call named its config file."""
    config = merged_config(load_config_file(ROOT / call.config), call.overrides)  # as --config on top
    config["references"] = str(ROOT / "config" / "references.yaml")
    # The runs ran on the GPU machine, which had liger-kernel; the analysis here needs none of it.
    real, embedded_spec.liger_installed = embedded_spec.liger_installed, lambda: True
    try:
        return workflow_study(config, [call.ran_as or call.config], root=ROOT)
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
        identity = Run.from_dict(recorded, str(run_json)).identity
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
