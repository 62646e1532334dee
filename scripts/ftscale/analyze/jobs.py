"""Slurm's own view of the study's jobs that have not ended (``squeue``), for ``ftscale status``.

squeue answers with or without Slurm accounting (sacct needs it) and lists exactly the jobs still pending
or running; a job that has ended is read from the run's own files (``ftscale.analyze.parse``), which also
hold Slurm's words for a time limit or a node failure. A training job is known by the study's root directory
(its working directory) and either the comment the SLURM executor plugin gives it or the name of the
rendered ``run.sbatch`` (``ftscale.run.sbatch.run_job_name``); a job that has started is also named by its
run's ``launch.json`` (``slurm_job_id``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftscale.run.sbatch import run_job_name
from ftscale.study.run import Run

#: squeue --Format fields read, in order; each ends with SEPARATOR (no padding, no truncation).
SQUEUE_FIELDS = ("JobID", "Name", "State", "NodeList", "Reason", "WorkDir", "Comment")
SEPARATOR = "|"
#: Job states in which nothing of the job has started yet.
WAITING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED")
#: The train rule's name in the Snakefile: the plugin's comment starts ``rule_train_wildcards_``.
TRAIN_RULE = "train"


@dataclass(frozen=True)
class SlurmJob:
    """One job as squeue shows it."""

    job_id: str
    name: str
    state: str
    nodes: str
    reason: str
    work_dir: str
    comment: str

    @property
    def waiting(self) -> bool:
        return self.state in WAITING


@dataclass(frozen=True)
class SlurmView:
    """The jobs squeue listed, or why Slurm was not asked (``note``; then ``asked`` is false)."""

    jobs: tuple[SlurmJob, ...] = ()
    note: str = ""
    asked: bool = True

    def job(self, job_id: str) -> SlurmJob | None:
        return next((job for job in self.jobs if job.job_id == job_id), None)


def plugin_comment(run: Run) -> str:
    """The comment snakemake-executor-plugin-slurm gives a run's train job: ``rule_<rule>_wildcards_`` and the
    job's wildcard values (track, model, name, in the rule's pattern order) joined by ``_``."""
    return f"rule_{TRAIN_RULE}_wildcards_{run.track}_{run.model}_{run.name}"


def parse_squeue(text: str) -> list[SlurmJob]:
    """The jobs of ``squeue --noheader --Format=<SQUEUE_FIELDS, each with SEPARATOR>`` output."""
    jobs = []
    for line in text.splitlines():
        values = line.split(SEPARATOR)
        if len(values) < len(SQUEUE_FIELDS):
            continue
        job = dict(zip(SQUEUE_FIELDS, (v.strip() for v in values)))
        jobs.append(SlurmJob(job_id=job["JobID"], name=job["Name"], state=job["State"], nodes=job["NodeList"],
                             reason="" if job["Reason"] == "None" else job["Reason"], work_dir=job["WorkDir"],
                             comment="" if job["Comment"] == "(null)" else job["Comment"]))
    return jobs


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def query_squeue(runner: Runner = _run) -> SlurmView:
    """This user's jobs that have not ended, as squeue lists them; without squeue on this host, or when it
    fails (no cluster configured here), an empty view that says why."""
    if shutil.which("squeue") is None:
        return SlurmView(note="no squeue on this host: Slurm not asked", asked=False)
    fmt = ",".join(f"{name}:{SEPARATOR}" for name in SQUEUE_FIELDS)
    command = ["squeue", "--me", "--noheader", f"--Format={fmt}"]
    try:
        proc = runner(command)
    except (OSError, subprocess.TimeoutExpired) as err:
        return SlurmView(note=f"squeue failed ({err}): Slurm not asked", asked=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return SlurmView(note=f"squeue failed ({last}): Slurm not asked", asked=False)
    return SlurmView(jobs=tuple(parse_squeue(proc.stdout)))


def jobs_of_run(run: Run, view: SlurmView, root: Path, launched_job: str | None = None) -> list[SlurmJob]:
    """The jobs of ``view`` that train ``run`` of the study in ``root``: by the plugin's comment or the
    run.sbatch job name, in that directory; or the job its launch.json names. Oldest first."""
    here = _resolved(str(root))
    names = {plugin_comment(run), run_job_name(run)}
    found = [job for job in view.jobs
             if (job.comment in names or job.name in names) and _resolved(job.work_dir) == here]
    launched = view.job(launched_job) if launched_job else None
    if launched is not None and launched not in found:
        found.append(launched)
    return sorted(found, key=lambda job: _job_number(job.job_id))


@functools.cache
def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return os.path.abspath(path)


def _job_number(job_id: str) -> tuple[int, str]:
    head = job_id.split("_")[0].split("+")[0]
    return (int(head), job_id) if head.isdigit() else (0, job_id)
