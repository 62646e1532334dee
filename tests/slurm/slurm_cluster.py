"""Pytest plugin: private, real Slurm clusters for tests, of one node or of two.

Enable it in a conftest.py beside the tests that use it, as tests/slurm/conftest.py does::

    from slurm_cluster import slurm_cluster  # noqa: F401

then ask for the session-scoped ``slurm_cluster`` fixture::

    def test_submit(slurm_cluster):
        out = slurm_cluster.run(["sbatch", "--parsable", "--gpus=2", "--wrap", "true"])
        jobid = out.stdout.strip()
        ...
        subprocess.run(["snakemake", "--profile", "profiles/slurm", ...],
                       env=slurm_cluster.environ(), check=True)

The cluster (``.ci/slurm/start-cluster``) has one node ``localhost`` with 16 CPUs
(or nproc, if more), up to 16000 MB, 8 fake GPUs (``--gpus=N`` is scheduled and
sets CUDA_VISIBLE_DEVICES, no real device), a default partition ``gpu``, no
accounting (use squeue, not sacct). ``slurm_two_nodes`` is the same split over two
nodes, ``n1`` and ``n2`` (8 CPUs and 4 GPUs each; one slurmd each, on this host).
Each is stopped at the end of the session (``.ci/slurm/stop-cluster``, by recorded pid).

When the Slurm/munge binaries are missing (or not running as root) the fixture
skips, except when the CI environment variable is set: then it fails, so CI can
never pass silently without the Slurm tests. Install with ``.ci/slurm/install``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pytest
from leftovers import unmarked
from paths import REPO

START = REPO / ".ci" / "slurm" / "start-cluster"
STOP = REPO / ".ci" / "slurm" / "stop-cluster"
REQUIRED = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "srun",
            "slurmctld", "slurmd", "munged", "mungekey")
# squeue --Format fields of squeue_jobs(), in order
SQUEUE_FIELDS = ("JobID", "Name", "State", "Partition", "Reason", "NumCPUs",
                 "MinMemory", "tres-alloc", "WorkDir")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(msg: str) -> None:
    msg += " (install with: sudo .ci/slurm/install)"
    if _in_ci():
        pytest.fail(f"Slurm test cluster unavailable in CI: {msg}", pytrace=False)
    pytest.skip(f"Slurm test cluster unavailable: {msg}")


@dataclass
class SlurmCluster:
    conf_dir: Path
    #: variables to add to a subprocess's environment so Slurm commands (and
    #: Slurm commands inside jobs) use this cluster: SLURM_CONF and PATH.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def slurm_conf(self) -> Path:
        return self.conf_dir / "slurm.conf"

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """os.environ + self.env (+ extra): pass as ``env=`` to subprocess."""
        e = {**os.environ, **self.env}
        if extra:
            e.update(extra)
        return e

    def run(self, cmd: str | Sequence[str], *, check: bool = True,
            cwd: str | os.PathLike | None = None,
            env: Mapping[str, str] | None = None,
            timeout: float | None = 600, **kw) -> subprocess.CompletedProcess:
        """Run cmd (a list, or a str run by bash) against this cluster; text output
        is captured. Raises AssertionError with the output when check and rc != 0."""
        shell = isinstance(cmd, str)
        p = subprocess.run(cmd, shell=shell, executable="/bin/bash" if shell else None,
                           cwd=cwd, env=self.environ(env), text=True,
                           capture_output=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise AssertionError(
                f"command failed (rc={p.returncode}): {cmd}\n"
                f"--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
        return p

    def squeue_jobs(self) -> list[dict[str, str]]:
        """All jobs slurmctld still knows (every state; ended jobs stay 600 s),
        as dicts keyed by SQUEUE_FIELDS (JobID, Name, State, ...)."""
        fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
        out = self.run(["squeue", "--states=all", "--noheader", f"--Format={fmt}"]).stdout
        jobs = []
        for line in out.splitlines():
            if line.strip():
                values = [v.strip() for v in line.split("|")]
                jobs.append(dict(zip(SQUEUE_FIELDS, values)))
        return jobs

    def job(self, jobid: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, TresPerJob, ...)."""
        out = self.run(["scontrol", "--oneliner", "show", "job", str(jobid)]).stdout
        info: dict[str, str] = {}
        key = None
        for tok in out.strip().split(" "):
            k, sep, v = tok.partition("=")
            if sep and k and (k[0].isalpha() and " " not in k):
                key = k
                info[key] = v
            elif key is not None:  # value containing a space
                info[key] += " " + tok
        return info

    def wait_job(self, jobid: str | int, timeout: float = 120,
                 states: Sequence[str] = ("COMPLETED", "FAILED", "CANCELLED",
                                          "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                                          "PREEMPTED", "BOOT_FAIL", "DEADLINE")) -> str:
        """Wait until the job reaches one of states; returns the state."""
        end = time.monotonic() + timeout
        while True:
            state = self.job(jobid).get("JobState", "")
            if state in states:
                return state
            if time.monotonic() > end:
                raise AssertionError(f"job {jobid} still {state!r} after {timeout}s")
            time.sleep(0.5)

    def cancel_jobs(self) -> None:
        """Cancel every job still pending or running (the cluster is this session's alone)."""
        self.run(["scancel", f"--user={getpass.getuser()}"], check=False)

    def logs(self) -> str:
        """Tails of the daemon logs, for assertion messages."""
        parts = []
        for f in sorted((self.conf_dir / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"----- {f}\n" + "\n".join(lines))
        return "\n".join(parts)


def _cluster_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slurm")
    # UNIX socket paths (munge, slurmd spool) must stay short: start-cluster
    # refuses directories longer than 70 characters.
    if len(str(d.resolve())) > 70:
        d = Path(tempfile.mkdtemp(prefix="ftslurm-", dir="/tmp"))
    return d


def _cluster(tmp_path_factory, nodes: int):
    """Start a cluster of ``nodes`` nodes, yield it, stop it."""
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in REQUIRED if shutil.which(b, path=sbin) is None]
    if missing:
        _unavailable("missing binaries: " + " ".join(missing))
    if os.geteuid() != 0:
        _unavailable("start-cluster must run as root")

    d = _cluster_dir(tmp_path_factory)
    # The daemons outlive every test: they must not carry the mark of the processes tests leave behind.
    p = subprocess.run([str(START), str(d)], text=True, capture_output=True, timeout=180,
                       env=unmarked({**os.environ, "FTSCALE_TEST_SLURM_NODES": str(nodes)}))
    if p.returncode != 0:
        pytest.fail(f"start-cluster {d} failed (rc={p.returncode}):\n"
                    f"{p.stdout}\n{p.stderr}", pytrace=False)
    d = d.resolve()
    env = {
        "SLURM_CONF": str(d / "slurm.conf"),
        # wrappers pinning SLURM_CONF, also seen by jobs (see start-cluster)
        "PATH": f"{d / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        yield SlurmCluster(conf_dir=d, env=env)
    finally:
        subprocess.run([str(STOP), str(d)], timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    yield from _cluster(tmp_path_factory, nodes=1)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    yield from _cluster(tmp_path_factory, nodes=2)
