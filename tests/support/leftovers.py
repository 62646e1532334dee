"""Processes a test left behind, found by a mark in their environment and ended by process id.

``mark_session()`` (conftest.py, at import) puts ``FTSCALE_TEST_SESSION=<unique value>`` into this pytest's
environment. Every process the tests start inherits it: Snakemake, the launcher, torchrun's ranks, and
Slurm jobs too (sbatch exports the submitter's environment). After each test, a marked process that is
no longer a descendant of this pytest is a leftover: its parent ended without it (a cancelled job's
step, a training rank of a killed launcher). ``end_leftovers()`` sends it SIGTERM, then SIGKILL.

Descendants of pytest are left alone: they are pytest's own helpers (multiprocessing's resource
tracker, torch's compile workers), which live as long as pytest. Daemons that must outlive a test
(the private Slurm cluster) are started without the mark: ``unmarked(os.environ)``. Another pytest
session on the same machine has another value, so its processes are never touched.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import time
from pathlib import Path

MARK = "FTSCALE_TEST_SESSION"


def mark_session() -> str:
    """Give this pytest (and so every process it starts from now on) a value of its own."""
    os.environ[MARK] = f"{os.getpid()}-{secrets.token_hex(6)}"
    return os.environ[MARK]


def unmarked(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the mark: for processes meant to outlive the test that starts them."""
    return {k: v for k, v in env.items() if k != MARK}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[1])


def _has_mark(pid: int, value: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or another user's process
        return False
    return f"{MARK}={value}".encode() in environ.split(b"\0")


def _descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parents.get(pid, 0)
    return False


def leftovers(value: str | None = None) -> list[int]:
    """Live processes with this session's mark that are not descendants of this process."""
    value = value or os.environ.get(MARK, "")
    if not value:
        return []
    parents, found = {}, []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[0] != "Z":  # a zombie has ended
            parents[int(entry.name)] = st[1]
    me = os.getpid()
    for pid in parents:
        if not _descends_from(pid, me, parents) and _has_mark(pid, value):
            found.append(pid)
    return sorted(found)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _ended(pidfd: int) -> bool:
    """A pidfd turns readable when its process has ended (a zombie included: it runs no more)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def end_leftovers(grace_s: float = 5.0) -> list[str]:
    """SIGTERM to every leftover, SIGKILL to any still running after ``grace_s``; returns what was
    ended ("pid: command"). Signals go through a pidfd opened while the process still carried the mark,
    so a pid reused in between is never hit."""
    value = os.environ.get(MARK, "")
    handles: dict[int, int] = {}
    ended = []
    for pid in leftovers(value):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        if not _has_mark(pid, value):  # the pid was reused before the pidfd was opened
            os.close(fd)
            continue
        handles[pid] = fd
        ended.append(f"{pid}: {_command(pid)}")
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for fd in handles.values():
                try:
                    signal.pidfd_send_signal(fd, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
            while time.monotonic() < deadline and not all(_ended(fd) for fd in handles.values()):
                time.sleep(0.05)
            if all(_ended(fd) for fd in handles.values()):
                break
    finally:
        for fd in handles.values():
            os.close(fd)
    return ended
