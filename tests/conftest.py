from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import yaml

# The test helpers (tests/support: paths.py, runs.py, workflow.py, leftovers.py) import by their bare names
# from every folder of tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from leftovers import end_leftovers, mark_session  # noqa: E402
from paths import REPO  # noqa: E402

mark_session()  # before any test starts a process: every one of them carries the mark


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """After each test, its Slurm jobs cancelled and every process it left behind ended, by process id
    (tests/support/leftovers.py): an orphaned job step or training rank never outlives the test."""
    yield
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("slurm_cluster").cancel_jobs()
    if ended := end_leftovers():
        warnings.warn(f"{request.node.nodeid} left {len(ended)} process(es) behind, ended: {'; '.join(ended)}",
                      stacklevel=1)


@pytest.fixture
def default_config() -> dict:
    """The embedded default config (config/config.yaml), a fresh copy per test."""
    return copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))


@pytest.fixture
def repo() -> Path:
    return REPO
