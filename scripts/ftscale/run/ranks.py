"""The processes of a job on one node, started by the launcher itself as torchrun --standalone starts them.

torchrun's agent is one more interpreter that imports torch before any rank starts; this module imports
no torch. Each rank is its own fresh interpreter with the environment torchrun's local elastic agent gives
its workers (``rank_env``), so a rank cannot tell the difference: rank 0's ``init_process_group`` (env://)
serves the TCPStore itself (``TORCHELASTIC_USE_AGENT_STORE=False``), the others connect to it.

As under torchrun, each process leads a session of its own (with the kernel's autogroup scheduling, a
session is what shares the CPU fairly with other sessions), and a signal for the job
(``Processes.send``) goes to each one's process group, so that it reaches every rank and what the rank
started. Their stdout and stderr go into one pipe (the run's log). When one of them ends with a non-zero
code or by a signal, the others get SIGTERM, and SIGKILL after ``STOP_GRACE_S``, as torchrun stops its
workers; the job's code is that first failure's.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from typing import IO, Mapping, Sequence

#: Seconds the other ranks of a failed job have between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0


def rank_env(rank: int, world_size: int, port: int, run_id: str) -> dict[str, str]:
    """The variables torchrun --standalone sets for local rank ``rank`` of ``world_size`` processes on one node
    (torch.distributed.elastic's LocalElasticAgent._start_workers), with rank 0 serving the rendezvous store on
    127.0.0.1:``port``. Not set: TORCHELASTIC_ERROR_FILE (read only by torchrun's ``@record``, which no engine
    uses) and TORCHELASTIC_SIGNALS_TO_HANDLE (read only by the agent)."""
    sizes = {name: str(world_size) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_WORLD_SIZE")}
    ranks = {name: str(rank) for name in ("RANK", "LOCAL_RANK", "ROLE_RANK")}
    return {**sizes, **ranks, "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "False",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")}


def job_envs(world_size: int, port: int) -> list[dict[str, str]]:
    """``rank_env`` of each rank of a job, with one run id (torchrun --standalone's: a new UUID)."""
    run_id = str(uuid.uuid4())
    return [rank_env(rank, world_size, port, run_id) for rank in range(world_size)]


@dataclass(frozen=True)
class Ended:
    """How a group of processes ended: ``code`` 0 when all exited 0, else the first failure's exit code
    (-N: signal N) with its index ``rank`` and ``pid``."""

    code: int
    rank: int | None = None
    pid: int | None = None


class Processes:
    """Processes started together (``start``), with one output pipe, stopped together."""

    def __init__(self, procs: list[subprocess.Popen], output: IO[str], grace_s: float):
        self.procs = procs
        self.output = output
        self._grace_s = grace_s
        self._exits: queue.Queue[tuple[int, int]] = queue.Queue()
        self._ended: Ended | None = None
        self._terminated = False  # SIGTERM sent: a rank that handles it is not sent a second one
        for rank, proc in enumerate(procs):
            threading.Thread(target=lambda r=rank, p=proc: self._exits.put((r, p.wait())), daemon=True).start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def send(self, signum: int) -> None:
        """Send ``signum`` to the process group of each process still running (``os.killpg``, as torchrun
        does): an ended one's number may already belong to another process."""
        self._terminated |= signum == signal.SIGTERM
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass  # it has just ended

    def _watch(self) -> None:
        first: Ended | None = None
        deadline = None
        left = len(self.procs)
        while left:
            try:
                rank, code = self._exits.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.send(signal.SIGKILL)  # the grace is over
                deadline = None
                continue
            left -= 1
            if code != 0 and first is None:
                first = Ended(code, rank, self.procs[rank].pid)
                if left:
                    if not self._terminated:
                        self.send(signal.SIGTERM)
                    deadline = time.monotonic() + self._grace_s
        self._ended = first or Ended(0)

    def wait(self) -> Ended:
        """Wait until every process has ended; how they ended."""
        self._watcher.join()
        assert self._ended is not None
        return self._ended


def start(command: Sequence[str], envs: Sequence[Mapping[str, str]], grace_s: float = STOP_GRACE_S) -> Processes:
    """Start ``command`` once per environment of ``envs`` (rank i gets ``envs[i]``, complete), each in a session
    of its own, all writing stdout and stderr into one pipe (``Processes.output``, text, undecodable bytes
    replaced)."""
    read_fd, write_fd = os.pipe()
    procs: list[subprocess.Popen] = []
    try:
        for env in envs:
            procs.append(subprocess.Popen(list(command), stdout=write_fd, stderr=write_fd, env=dict(env),
                                          start_new_session=True))
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return Processes(procs, os.fdopen(read_fd, "r", errors="replace"), grace_s)
