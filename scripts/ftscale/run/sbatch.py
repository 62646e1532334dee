"""Scheduler resources of each job, and the standalone sbatch scripts rendered beside each run/model.

The rendered ``run.sbatch`` runs exactly the command of the workflow's train job, so a participant can
submit one experiment by hand (``sbatch experiments/.../run.sbatch``) and the analysis picks its
output up like any other. Partition, account and QoS are not written into the file: sbatch takes them
from the command line or from SBATCH_PARTITION, SBATCH_ACCOUNT and SBATCH_QOS.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ftscale.run.command import ftscale_cli
from ftscale.study.models import Model
from ftscale.study.run import Run


@dataclass(frozen=True)
class Resources:
    gpus: int
    cpus: int
    mem_mb: int
    runtime_min: int
    nodes: int = 1


def train_resources(run: Run, config: dict, attempt: int = 1) -> Resources:
    res = config["resources"]["train"]
    per_node = run.gpus // run.nodes
    return Resources(gpus=run.gpus, cpus=per_node * res["cpus_per_gpu"], mem_mb=per_node * res["mem_mb_per_gpu"],
                     runtime_min=res["runtime_min"] * attempt, nodes=run.nodes)


def import_resources(config: dict, attempt: int = 1) -> Resources:
    res = config["resources"]["import"]
    return Resources(gpus=res["gpus"], cpus=res["cpus"], mem_mb=res["mem_mb"], runtime_min=res["runtime_min"] * attempt)


def _header(job_name: str, res: Resources, output: str, container: str, repo: Path) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={res.nodes}"]
    if res.gpus:
        lines.append(f"#SBATCH --gpus={res.gpus}")
    lines += [f"#SBATCH --cpus-per-task={res.cpus}", f"#SBATCH --mem={res.mem_mb}M",
              f"#SBATCH --time={res.runtime_min}", f"#SBATCH --output={output}"]
    if container:
        lines += container_lines(container, repo)
    return lines


def container_lines(image: str, repo: Path) -> list[str]:
    """pyxis's options: the job inside ``image``, with the project mounted at its own path and as the working
    directory, so that the script's paths are the same inside and out (#SBATCH lines expand no variables:
    the path is written out)."""
    return ["# Inside the container image (pyxis), the project at the same path; without pyxis, remove these:",
            f"#SBATCH --container-image={image}",
            f"#SBATCH --container-mounts={repo}:{repo}",
            f"#SBATCH --container-workdir={repo}"]


def render_run_sbatch(run: Run, config: dict, repo: Path, container: str = "") -> str:
    res = train_resources(run, config)
    d, p = run.directory, run.paths
    cmd = ["train", str(p.run), "--log", str(p.log), "--launch-record", str(p.launch)]
    return "\n".join([
        *_header(f"ftscale-{run.track}-{run.model}-{run.name}", res, f"{repo}/{d}/slurm-%j.out", container, repo),
        "#",
        f"# The {run.track.replace('_', '-')} run {run.name} of {run.model}, standalone: the same command as the",
        "# workflow's train job. Submit from anywhere: sbatch [-p PARTITION -A ACCOUNT] " + f"{d}/run.sbatch",
        "# Afterwards, `snakemake results/tables.md` picks up its output. Rendered by the workflow: edits are lost.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(repo))}",
        f"{ftscale_cli(bool(container))} {shlex.join(cmd)}",
        "",
    ])


def render_import_sbatch(model: Model, config: dict, repo: Path, container: str = "") -> str:
    res = import_resources(config)
    out = str(model.checkpoint)
    return "\n".join([
        *_header(f"ftscale-import-{model.name}", res, f"{repo}/{model.directory}/import-%j.out", container, repo),
        "#",
        f"# Import {model.name} ({model.spec['source']}) once into {out}, standalone: the workflow's import job.",
        "# A gated hub model needs HF_TOKEN in the environment (never written to a file).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(repo))}",
        f"{ftscale_cli(bool(container))} {shlex.join(['import', model.name, '--out', out])}",
        "",
    ])
