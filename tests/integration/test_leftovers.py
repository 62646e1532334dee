"""The clean-up after each test (tests/support/leftovers.py, tests/conftest.py), on real processes: an orphan a test
left behind is ended by its process id; a process of someone else, or pytest's own child, is not."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from leftovers import end_leftovers, leftovers, unmarked


def orphan(env: dict[str, str]) -> int:
    """A ``sleep`` whose parent shell has already exited, as the step of a cancelled job is."""
    out = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], env=env, capture_output=True,
                         text=True, check=True, timeout=30)
    return int(out.stdout)


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_an_orphan_of_the_tests_is_ended_and_another_process_is_not():
    mine = orphan(dict(os.environ))
    stranger = orphan(unmarked(dict(os.environ)))  # as a process of another session or user
    try:
        assert running(mine) and running(stranger)
        assert mine in leftovers() and stranger not in leftovers()
        ended = end_leftovers()
        assert [line.split(":")[0] for line in ended] == [str(mine)] and "sleep 300" in ended[0]
        assert not running(mine) and running(stranger)
    finally:
        os.kill(stranger, signal.SIGKILL)


def test_a_child_pytest_still_holds_is_not_a_leftover():
    with subprocess.Popen(["sleep", "300"]) as child:
        try:
            assert running(child.pid) and child.pid not in leftovers()
        finally:
            child.kill()
