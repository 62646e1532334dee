"""Scheduler resources of each job, and the standalone sbatch scripts rendered beside each run/model.

The rendered ``run.sbatch`` runs exactly the command of the workflow's train job, so a participant can
submit one experiment by hand (``sbatch experiments/.../run.sbatch`` from the study's root directory) and
the analysis picks its output up like any other. The scripts hold no absolute path: a study moved or
copied elsewhere keeps working, and Snakemake (which reruns a job whose rendered script changed) sees
nothing to redo. Partition, account and QoS are not written into the file: sbatch takes them
from the command line or from SBATCH_PARTITION, SBATCH_ACCOUNT and SBATCH_QOS.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ftscale.run.command import PROJECT_PYTHONPATH
from ftscale.study.models import Model
from ftscale.study.run import Run


@dataclass(frozen=True)
class Resources:
    """What one job asks of Slurm. ``gpus`` is the whole job's; ``cpus`` and ``mem_mb`` are per node (one task
    per node: the launcher, or one torchrun per node)."""

    gpus: int
    cpus: int
    mem_mb: int
    runtime_min: int
    nodes: int = 1

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


def slurm_placement(res: Resources) -> dict[str, int | str | None]:
    """The rule's placement resources for the SLURM executor plugin, by name. A job of one node asks for its GPUs
    (``gpu``: ``--gpus``) and nothing else. A job of several nodes asks for its GPUs per node (``gres``:
    ``--gres=gpu:N``; ``--gpus=2 --nodes=2`` may put both on one node), and its command starts its own tasks,
    one torchrun per node, with srun: the plugin calls that an MPI job. Given the ``mpi`` resource, the plugin's
    job step runs the rule's command as it is (without it, the command is wrapped in a one-task srun on one node,
    where a second srun would not get the other nodes); ``tasks`` = one per node; ``tasks_per_gpu`` 0 keeps the
    plugin from adding --ntasks-per-gpu. None leaves a resource unset (Snakemake passes nothing for it)."""
    if res.nodes == 1:
        return {"gpu": res.gpus, "gres": None, "mpi": None, "tasks": None, "tasks_per_gpu": None}
    return {"gpu": None, "gres": f"gpu:{res.gpus_per_node}" if res.gpus else None, "mpi": "srun",
            "tasks": res.nodes, "tasks_per_gpu": 0}


def train_resources(run: Run, config: dict, attempt: int = 1) -> Resources:
    res = config["resources"]["train"]
    per_node = run.gpus // run.nodes
    return Resources(gpus=run.gpus, cpus=per_node * res["cpus_per_gpu"], mem_mb=per_node * res["mem_mb_per_gpu"],
                     runtime_min=res["runtime_min"] * attempt, nodes=run.nodes)


def import_resources(config: dict, attempt: int = 1) -> Resources:
    res = config["resources"]["import"]
    return Resources(gpus=res["gpus"], cpus=res["cpus"], mem_mb=res["mem_mb"], runtime_min=res["runtime_min"] * attempt)


#: A job that a node failure ends is not started again by Slurm: a second start would overwrite the log that says
#: why the first one ended, and the workflow decides what to redo (``--retries``; the SLURM executor plugin then
#: leaves the failed node out). The profile asks the same (``slurm-no-requeue``).
NO_REQUEUE = "#SBATCH --no-requeue"


def _header(job_name: str, res: Resources, output: str) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={res.nodes}"]
    if res.nodes > 1:
        lines.append("#SBATCH --ntasks-per-node=1")
    if res.gpus:
        lines.append(f"#SBATCH --gpus={res.gpus}" if res.nodes == 1 else f"#SBATCH --gpus-per-node={res.gpus_per_node}")
    lines += [f"#SBATCH --cpus-per-task={res.cpus}", f"#SBATCH --mem={res.mem_mb}M",
              f"#SBATCH --time={res.runtime_min}", f"#SBATCH --output={output}", NO_REQUEUE]
    return lines


def job_command(words: list[str], container: str) -> list[str]:
    """The job's ftscale command (``words``: the subcommand and its arguments). With a container image, one
    pyxis step of ``srun`` runs it inside the image, with the study mounted at its own path and as the working
    directory (``$PWD``, expanded when the job runs: the script holds no absolute path), on the study's own
    sources (the image need not have ftscale)."""
    if not container:
        return [shlex.join(["ftscale", *words])]
    return [
        "# Inside the container image (pyxis): the study at its own path, ftscale from its sources.",
        f"export {PROJECT_PYTHONPATH}",
        f'srun --ntasks=1 --container-image={shlex.quote(container)} --container-mounts="$PWD:$PWD" '
        f'--container-workdir="$PWD" python3 -m ftscale.cli {shlex.join(words)}',
    ]


def _cd_study_root(script: Path, marker: Path) -> list[str]:
    """Lines that make the study's root directory the current one, for ``script`` and ``marker`` (a file
    beside it that must be there), both relative to the root. Run by hand (``bash .../run.sbatch``), the
    root is found from the script's own path; under Slurm, which runs a copy of the script from its spool
    directory, it is the directory sbatch was called from (the job's working directory, where the relative
    ``--output`` path points too)."""
    up = "/".join([".."] * len(script.parent.parts))
    return [
        f'if [ -f "$(dirname "$0")/{shlex.quote(marker.name)}" ]; then cd "$(dirname "$0")/{up}"; fi',
        f"if [ ! -f {shlex.quote(str(marker))} ]; then",
        f'  echo "{script}: no {marker} under $PWD: submit from the study\'s root directory" >&2',
        "  exit 1",
        "fi",
    ]


def run_job_name(run: Run) -> str:
    """The Slurm job name of a run's standalone ``run.sbatch`` (``ftscale status`` finds the job by it)."""
    return f"ftscale-{run.track}-{run.model}-{run.name}"


def render_run_sbatch(run: Run, config: dict, container: str = "") -> str:
    res = train_resources(run, config)
    d, p = run.directory, run.paths
    cmd = ["train", str(p.run), "--log", str(p.log), "--launch-record", str(p.launch)]
    return "\n".join([
        *_header(run_job_name(run), res, f"{d}/slurm-%j.out"),
        "#",
        f"# The {run.track.replace('_', '-')} run {run.name} of {run.model}, standalone: the same command as the",
        "# workflow's train job. From the study's root directory: sbatch [-p PARTITION -A ACCOUNT] "
        + f"{d}/run.sbatch",
        "# Afterwards, `snakemake results/tables.md` picks up its output. Rendered by the workflow: edits are lost.",
        "set -euo pipefail",
        *_cd_study_root(p.sbatch, p.run),
        *job_command(cmd, container),
        "",
    ])


def render_import_sbatch(model: Model, config: dict, container: str = "") -> str:
    res = import_resources(config)
    out = str(model.checkpoint)
    return "\n".join([
        *_header(f"ftscale-import-{model.name}", res, f"{model.directory}/import-%j.out"),
        "#",
        f"# Import {model.name} ({model.spec['source']}) once into {out}, standalone: the workflow's import job.",
        "# From the study's root directory: sbatch [-p PARTITION -A ACCOUNT] " + f"{model.directory}/import.sbatch",
        "# A gated hub model needs HF_TOKEN in the environment (never written to a file).",
        "set -euo pipefail",
        *_cd_study_root(model.paths.import_sbatch, model.yaml_path),
        *job_command(["import", model.name, "--out", out], container),
        "",
    ])
