"""Start one training job from its run.json: build the launcher command, run it, record what happened.

On one node the launcher starts the ranks itself (``ftscale.run.ranks``), on several srun starts one torchrun
per node. The same function serves the Snakemake rule and the standalone run.sbatch, so both run the same
command. Output of every rank goes to the run's log; ``launch.json`` beside it records the command,
the host, start and end times, the wall-clock, the exit code and any signal that stopped the job.
It is written once at the start (with ``end: null``), so a job killed outright is recognisable.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Mapping

from ftscale.run.logformat import error_line, parse_steps, skipped_line
from ftscale.run.ranks import job_envs
from ftscale.run.ranks import start as start_processes
from ftscale.study.paths import RunPaths
from ftscale.study.run import Run

#: How long the torchrun of each node waits for the others at the rendezvous (its ``join_timeout``, and
#: ``read_timeout`` for reaching the rendezvous' store), unless FTSCALE_RENDEZVOUS_TIMEOUT_S says otherwise: a node
#: that never arrives, or a rendezvous host no node can reach, ends the run with torchrun's RendezvousTimeoutError
#: or RendezvousConnectionError after about this long, not a hang.
RENDEZVOUS_TIMEOUT_S = 120


def rendezvous_timeout_s(env: Mapping[str, str]) -> int:
    value = env.get("FTSCALE_RENDEZVOUS_TIMEOUT_S", "").strip()
    if not value:
        return RENDEZVOUS_TIMEOUT_S
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FTSCALE_RENDEZVOUS_TIMEOUT_S={value!r}: must be a whole number of seconds, 1 or more")
    return int(value)


def launch_command(run: Run, run_json: str, python: str | None = None, rendezvous: str = "HOST:PORT",
                   rendezvous_timeout: int = RENDEZVOUS_TIMEOUT_S) -> list[str]:
    """On one node, the command of each rank: the engine's module, which the launcher starts once per rank
    with the environment torchrun --standalone would give it (``ftscale.run.ranks``): torchrun would add an
    interpreter that imports torch to start them. On several nodes, srun starts one torchrun per node, which
    meet at the c10d rendezvous ``rendezvous`` (host:port of the launching node, ``rendezvous_endpoint``);
    srun's --kill-on-bad-exit ends every node's torchrun when one fails, so no node waits for a dead peer.
    The interpreter is the engine's ``python`` option when set (an engine in its own environment),
    else this one."""
    module = run.spec.entry_module
    python = python or run.spec.python(run.engine_options) or sys.executable
    per_node = run.gpus_per_node
    torchrun = [python, "-m", "torch.distributed.run"]
    if run.nodes == 1:
        return [python, "-u", "-m", module, run_json]  # torchrun's command for each of its workers
    return [
        "srun", f"--nodes={run.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *torchrun,
        f"--nnodes={run.nodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rendezvous}", f"--rdzv-conf=join_timeout={rendezvous_timeout},read_timeout={rendezvous_timeout}",
        "-m", module, run_json,
    ]


def launched_processes(run: Run) -> int:
    """How many processes the launcher starts with ``launch_command``: each rank on one node, srun on several."""
    return run.gpus_per_node if run.nodes == 1 else 1


def rendezvous_endpoint(env: dict[str, str]) -> str:
    """host:port of the rendezvous of a run across nodes: MASTER_ADDR and MASTER_PORT where the job sets them,
    else this host (the launcher runs on the job's first node, where srun starts the first torchrun, which
    serves the rendezvous) and a port free on it now."""
    return f"{env.get('MASTER_ADDR') or socket.gethostname()}:{env.get('MASTER_PORT') or free_port()}"


def slurm_nodelist(env: dict[str, str]) -> str | None:
    """The job's nodes (Slurm's hostlist, ``n[1-2]``): SLURM_JOB_NODELIST, which the SLURM executor plugin's job
    step does not pass on, else squeue's answer for SLURM_JOB_ID; None outside Slurm or when squeue fails."""
    if env.get("SLURM_JOB_NODELIST"):
        return env["SLURM_JOB_NODELIST"]
    if not env.get("SLURM_JOB_ID"):
        return None
    try:
        out = subprocess.run(["squeue", "--noheader", "--jobs", env["SLURM_JOB_ID"], "--format", "%N"],
                             capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_model() -> str:
    """This machine's CPU model (Linux /proc/cpuinfo), or 'unknown'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def free_port() -> int:
    """A TCP port free on this host now (the kernel's choice, as torchrun --standalone makes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def killed_line(code: int, pid: int, rank: int = 0) -> str:
    """What the log says of a rank that a signal ended (exit code -N), in torchrun's words, which the analysis
    reads (``Signal 9 (SIGKILL)``: out of host memory)."""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    return f"[ftscale] launcher: rank {rank} exitcode : {code} (Signal {-code} ({name}) received by PID {pid})"


def exited_line(code: int, pid: int, rank: int) -> str:
    """What the log says of the rank that failed first with exit code ``code`` > 0, as torchrun's summary names it."""
    return f"[ftscale] launcher: rank {rank} exitcode : {code} (PID {pid}), the first rank to fail"


PROGRESS_EVERY_S = 30.0


def copy_with_progress(lines: IO[str], out: IO[str], name: str, every_s: float = PROGRESS_EVERY_S) -> None:
    """Copy the job's output into its log; show the first step line and then one every ``every_s``
    seconds on our own stdout, so that a long job shows progress in Snakemake's (or Slurm's) output."""
    last_shown = None
    for line in lines:
        out.write(line)
        out.flush()
        if line.startswith("[ftscale] step=") or line.startswith("Training epoch"):
            now = time.monotonic()
            if last_shown is None or now - last_shown >= every_s:
                print(f"[ftscale] {name}: {line.strip()[:200]}", flush=True)
                last_shown = now


def write_metrics_from_log(log: Path, metrics: Path) -> None:
    """metrics.jsonl for an engine that only prints (NeMo): one record per parsed step line."""
    steps, _, _ = parse_steps(log.read_text(errors="replace"))
    metrics.write_text("".join(json.dumps({k: v for k, v in s.items() if k != "line"}) + "\n" for s in steps))


class LaunchRecordError(OSError):
    """launch.json cannot be written (disk full, read-only, no permission): names the file and the error."""


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LaunchRecordError(f"{path}: cannot write the launch record: {err.strerror}") from None


def record_failure(name: str, log: Path, err: OSError) -> int:
    """A job that cannot write its own files: one line on stderr, the same as the log's error line (so
    the run's row says failed, and why, if the log can still be written), and exit code 1."""
    print(f"[ftscale] {name}: {err}", file=sys.stderr, flush=True)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(error_line("io", str(err)) + "\n")
    except OSError:
        pass  # the same disk: the message above is all there is
    return 1


def available_cpus() -> int:
    """CPUs this process may use (a Slurm allocation restricts the affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def skip_job(run: Run, log: Path, launch_record: Path, metrics: Path) -> int:
    """A run the plan skipped (predicted OOM): the run's files, written without training, so that it keeps
    its row (status ``skipped``, the plan's reason): a log line, a launch record, an empty metrics.jsonl."""
    now = time.time()
    try:
        _write(launch_record, {"run": run.name, "command": None, "host": socket.gethostname(), "start": now,
                               "end": now, "wall_s": 0.0, "returncode": 0, "signal": None,
                               "skipped": run.skip_reason})
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(skipped_line(run.skip_reason) + "\n")
        metrics.write_text("")
    except LaunchRecordError as err:
        return record_failure(run.name, log, err)
    except OSError as err:
        return record_failure(run.name, log, OSError(f"{err.filename}: cannot write: {err.strerror}"))
    print(f"[ftscale] {run.name}: skipped ({run.skip_reason})", flush=True)
    return 0


def cannot_start(run: Run, log: Path, message: str) -> int:
    """A job that cannot start its processes: the reason on stderr and in its log (the run's row says failed,
    and why), and exit code 1."""
    print(f"[ftscale] {run.name}: {message}", file=sys.stderr, flush=True)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(error_line("failed", message) + "\n")
    except OSError:
        pass  # the message above is all there is
    return 1


def run_job(run_json: Path, log: Path, launch_record: Path, cpus: int | None = None) -> int:
    """Run the job of ``run_json`` on ``cpus`` CPUs (default: all available) and return its exit code: on one
    node the first failing rank's (128 + N for a rank ended by signal N, as a shell reports it), 128 + N when
    the launcher was stopped by signal N. Each rank gets an equal share of the CPUs, at least one."""
    run = Run.load(run_json)
    if run.skip_reason:
        return skip_job(run, log, launch_record, RunPaths(Path(run_json).parent).metrics)
    env = dict(os.environ)
    if run.nodes > 1:
        try:
            timeout = rendezvous_timeout_s(env)
        except ValueError as err:
            return cannot_start(run, log, str(err))
        if shutil.which("srun", path=env.get("PATH")) is None:
            # inside a container image, or outside Slurm
            return cannot_start(run, log, f"a torchrun on each of its {run.nodes} nodes needs srun, which this job "
                                "lacks (in a container, or outside Slurm): runs across nodes need ftscale on the "
                                "nodes (container: none)")
        command = launch_command(run, str(run_json), rendezvous=rendezvous_endpoint(env), rendezvous_timeout=timeout)
    else:
        command = launch_command(run, str(run_json))
    cpus = cpus or available_cpus()
    per_rank = max(1, cpus // run.gpus_per_node)
    env.update(FTSCALE_THREADS_PER_RANK=str(per_rank), OMP_NUM_THREADS=str(per_rank))
    count = launched_processes(run)
    ranks = run.nodes == 1  # the launcher starts the ranks itself (else srun starts one torchrun per node)
    envs = [{**env, **variables} for variables in job_envs(count, free_port())] if ranks else [env]
    record = {
        "run": run.name, "command": shlex.join(command) + (f"  # {count} ranks" if count > 1 else ""),
        "host": socket.gethostname(), "pid": os.getpid(), "cpu_model": cpu_model(), "cpus": cpus,
        "threads_per_rank": per_rank,
        "slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_nodelist": slurm_nodelist(env),
        "start": time.time(), "end": None, "wall_s": None,
        "returncode": None, "signal": None,
    }
    try:
        _write(launch_record, record)
    except LaunchRecordError as err:
        return record_failure(run.name, log, err)  # nothing started: a job with no record is not run
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[ftscale] {run.name}: {record['command']}  (log: {log})", flush=True)
    received: list[int] = []
    with log.open("w") as out:
        processes = start_processes(command, envs)

        def forward(signum: int, _frame: object) -> None:
            received.append(signum)
            processes.send(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, forward)
        with processes.output:
            copy_with_progress(processes.output, out, run.name)
        ended = processes.wait()
        code = ended.code
        if received:
            name = signal.Signals(received[0]).name
            out.write(f"[ftscale] error=cancelled the job received {name} (scancel, time limit or Ctrl-C)\n")
        elif ranks and code < 0:
            out.write(killed_line(code, ended.pid, ended.rank) + "\n")
        elif ranks and code > 0:
            out.write(exited_line(code, ended.pid, ended.rank) + "\n")
    record.update(end=time.time(), returncode=code, signal=signal.Signals(received[0]).name if received else None)
    record["wall_s"] = round(record["end"] - record["start"], 3)
    metrics = RunPaths(Path(run_json).parent).metrics
    try:
        _write(launch_record, record)
        if code == 0 and not metrics.exists():
            write_metrics_from_log(log, metrics)
    except LaunchRecordError as err:
        return record_failure(run.name, log, err)  # the run is failed: its record does not say how it ended
    except OSError as err:
        return record_failure(run.name, log, OSError(f"{err.filename}: cannot write: {err.strerror}"))
    status = "ok" if code == 0 else f"FAILED (exit {code})"
    print(f"[ftscale] {run.name}: {status} after {record['wall_s']:.1f} s", flush=True)
    if received:
        return 128 + received[0]
    return 128 - code if code < 0 else code  # a signal's number, as a shell reports it
