"""Where every run of a study stands now (``ftscale status``): one row per run, its state, and for a running
run its step and the time left.

The states, in the order the summary counts them:

- ``planned``: nothing of it has started (no log yet);
- ``skipped``: the plan skips it (``plan.skip_predicted_oom``), with the plan's reason;
- ``queued``: a Slurm job for it is waiting (squeue's reason: Priority, Resources, ...);
- ``running``: its job runs: Slurm says so, or, without Slurm, its launcher process is alive on this host;
  the step is the last one its log shows, the time left is the median step time so far (after the warm-up
  steps, where there are any) times the steps left;
- ``ok``, ``failed`` (with the analysis' reason: ``oom: out of GPU memory``, ``failed: NCCL timeout`` ...),
  ``cancelled``: how it ended, as ``ftscale.analyze.parse.parse_run`` reads its files (the tables' words);
- ``interrupted``: it stopped without an error or an end (the analysis' ``incomplete``: killed outright,
  or the job is gone while its launch record has no end);
- ``unknown``: its launch record has no end and nothing here can tell whether it still runs (a Slurm job
  with no squeue on this host, a local run on another host).

Slurm is asked first (``ftscale.analyze.jobs``), the run's files read after: a job that ends in between
shows its end, never a job that vanished.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ftscale.analyze.jobs import SlurmJob, SlurmView, jobs_of_run
from ftscale.analyze.parse import ParseError, parse_run
from ftscale.analyze.tables import LABELS, fmt_number, markdown
from ftscale.run.logformat import parse_steps
from ftscale.study.paths import RunPaths
from ftscale.study.run import Run, RunFileError
from ftscale.study.sweep import Study

STATES = ("planned", "skipped", "queued", "running", "ok", "failed", "cancelled", "interrupted", "unknown")
#: The analysis' status (``parse_run``) -> the state of a run that has ended.
ENDED = {"ok": "ok", "skipped": "skipped", "not_run": "planned", "cancelled": "cancelled", "incomplete": "interrupted",
         "oom": "failed", "failed": "failed"}


@dataclass(frozen=True)
class RunState:
    """One run's state now; ``step`` is the last step its log shows, ``elapsed_s`` the time since its launch
    (a run that ended: its wall time), ``left_s`` the time its remaining steps take at ``step_time_s``."""

    run: Run
    state: str
    reason: str = ""
    job_id: str = ""
    nodes: str = ""
    step: int | None = None
    elapsed_s: float | None = None
    step_time_s: float | None = None
    left_s: float | None = None

    def to_dict(self) -> dict:
        return {"run": self.run.name, "track": self.run.track, "model": self.run.model,
                "directory": self.run.directory, "state": self.state, "reason": self.reason,
                "job_id": self.job_id or None, "nodes": self.nodes or None, "step": self.step,
                "steps": self.run.steps, "elapsed_s": _rounded(self.elapsed_s),
                "step_time_s": self.step_time_s, "left_s": _rounded(self.left_s)}


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def read_launch(path: Path) -> dict:
    """The run's launch record, or {} where there is none (or it is half-written: it is replaced whole)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def progress(run: Run, log: Path) -> tuple[int, float | None, float | None]:
    """(last step the log shows, median step time, time left) of a run in progress: the median over the
    steps after the warm-up when there are any, else over every step so far."""
    try:
        steps, _, _ = parse_steps(log.read_text(errors="replace"))
    except OSError:
        return 0, None, None
    if not steps:
        return 0, None, None
    times = [s["step_time_s"] for s in steps if s.get("step_time_s") is not None]
    timed = [s["step_time_s"] for s in steps if s.get("step_time_s") is not None and s["step"] > run.warmup_steps]
    step = steps[-1]["step"]
    if not (timed or times):
        return step, None, None
    median = statistics.median(timed or times)
    return step, median, median * max(0, run.steps - step)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive and still an ftscale launcher (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"ftscale" in cmdline.read_bytes()
    except OSError:
        return True  # no /proc to check it against: the pid is alive


def _in_progress(run: Run, paths: RunPaths, launch: dict, now: float, state: str, reason: str = "",
                 job_id: str = "", nodes: str = "") -> RunState:
    step, step_time, left = progress(run, paths.log)
    start = launch.get("start")
    return RunState(run, state, reason=reason, job_id=job_id, nodes=nodes, step=step,
                    elapsed_s=now - start if isinstance(start, (int, float)) else None, step_time_s=step_time,
                    left_s=left)


def _slurm_job_state(run: Run, paths: RunPaths, launch: dict, job: SlurmJob, now: float) -> RunState:
    if job.waiting:
        # squeue's reason (Priority, Resources, ...; none before the scheduler has looked), or its state
        reason = job.reason if job.state == "PENDING" else ", ".join(filter(None, (job.state.lower(), job.reason)))
        return RunState(run, "queued", reason=reason, job_id=job.job_id)
    if launch.get("end") is None and str(launch.get("slurm_job_id")) == job.job_id:
        return _in_progress(run, paths, launch, now, "running", job_id=job.job_id, nodes=job.nodes)
    return RunState(run, "running", reason="starting: its launch record is not written yet", job_id=job.job_id,
                    nodes=job.nodes)


def _unended_state(run: Run, paths: RunPaths, launch: dict, view: SlurmView, host: str, now: float) -> RunState | None:
    """The state of a run whose launch record has no end and whose job Slurm does not list: running (its
    local launcher is alive), unknown (nothing here can tell), or None: it has stopped."""
    job_id = str(launch.get("slurm_job_id") or "")
    where = str(launch.get("slurm_nodelist") or launch.get("host") or "")
    if job_id:
        if view.asked:
            return None  # squeue lists every job that has not ended
        return _in_progress(run, paths, launch, now, "unknown", job_id=job_id, nodes=where,
                            reason=f"Slurm job {job_id} with no end recorded; {view.note}")
    pid = launch.get("pid")
    if where == host and isinstance(pid, int):
        if process_alive(pid):
            return _in_progress(run, paths, launch, now, "running", nodes=where)
        return None
    why = f"its launcher (pid {pid}) ran on {where}, not on this host" if where != host else "no pid recorded"
    return _in_progress(run, paths, launch, now, "unknown", nodes=where,
                        reason=f"no end recorded and {why}: cannot tell whether it still runs")


def _ended_state(run: Run, directory: Path, root: Path, launch: dict) -> RunState:
    """The state of a run that is not running, from the analysis of its files; the Slurm job that ran it (its
    logs are named by it), and the measured median step time of a run that is ok."""
    try:
        record = parse_run(directory, root=root)
    except (ParseError, RunFileError, OSError, ValueError) as err:
        return RunState(run, "failed", reason=str(err))
    state = ENDED.get(record.status, "failed")
    if state == "planned":
        return RunState(run, state)
    reason = record.reason if record.status in (state, "incomplete") else f"{record.status}: {record.reason}"
    return RunState(run, state, reason="" if reason == state else reason.rstrip(": "),
                    job_id=str(launch.get("slurm_job_id") or ""), nodes=str(launch.get("slurm_nodelist") or ""),
                    step=record.steps_done, elapsed_s=record.wall_s,
                    step_time_s=record.step_time_s)


def run_state(run: Run, root: Path, view: SlurmView, host: str | None = None, now: float | None = None) -> RunState:
    """Where ``run`` of the study in ``root`` stands: its Slurm job (``view``) first, then the plan's skip,
    then a launch record with no end, then the analysis of its files."""
    host = host or socket.gethostname()
    now = time.time() if now is None else now
    directory = root / run.directory
    paths = RunPaths(directory)
    launch = read_launch(paths.launch)
    launched = str(launch.get("slurm_job_id") or "") if launch.get("end") is None else ""
    jobs = jobs_of_run(run, view, root, launched or None)
    if jobs:
        started = [job for job in jobs if not job.waiting]
        return _slurm_job_state(run, paths, launch, (started or jobs)[-1], now)
    if run.skip_reason:
        return RunState(run, "skipped", reason=run.skip_reason)
    if not paths.run.is_file() or not paths.log.is_file():
        return RunState(run, "planned")
    if launch and launch.get("end") is None:
        unended = _unended_state(run, paths, launch, view, host, now)
        if unended is not None:
            return unended
    return _ended_state(run, directory, root, launch)


def study_states(study: Study, root: Path, view: SlurmView, host: str | None = None,
                 now: float | None = None) -> list[RunState]:
    """Every run of the study, in the study's order."""
    now = time.time() if now is None else now
    return [run_state(run, root, view, host, now) for run in study.runs]


def summary(states: list[RunState]) -> str:
    """'11 runs: 8 planned, 1 running, 2 ok' (the states present, in ``STATES`` order)."""
    counts = {state: sum(s.state == state for s in states) for state in STATES}
    parts = [f"{n} {state}" for state, n in counts.items() if n]
    return f"{len(states)} run{'s' if len(states) != 1 else ''}" + (": " + ", ".join(parts) if parts else "")


def fmt_duration(seconds: float | None) -> str:
    """A duration to read at a glance: '45s', '12m05s', '3h04m', '2d03h'; blank for none."""
    if seconds is None:
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_status(states: list[RunState], view: SlurmView) -> str:
    """The table (a column that is blank in every row left out), the summary line and, where Slurm was not
    asked, why."""
    rows = [{"track": s.run.track, "model": s.run.model, "run": s.run.name, "state": s.state, "job": s.job_id,
             "nodes": s.nodes, "step": "" if s.step is None else f"{s.step}/{s.run.steps}",
             "elapsed": fmt_duration(s.elapsed_s), LABELS["step_time_s"]: fmt_number(s.step_time_s),
             "left": fmt_duration(s.left_s), "reason": s.reason} for s in states]
    table = pd.DataFrame(rows)
    table = table[[c for c in table.columns if (table[c] != "").any()]] if rows else table
    lines = [markdown(table) if rows else "(the study has no runs)", "", summary(states)]
    if view.note:
        lines.append(f"({view.note})")
    return "\n".join(lines)
