from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (workflow.py, slurm_cluster.py, leftovers.py)

from leftovers import end_leftovers, mark_session  # noqa: E402
from slurm_cluster import slurm_cluster  # noqa: E402,F401  (the private Slurm cluster fixture)

mark_session()  # before any test starts a process: every one of them carries the mark


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """After each test, its Slurm jobs cancelled and every process it left behind ended, by process id
    (tests/leftovers.py): an orphaned job step or training rank never outlives the test."""
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
