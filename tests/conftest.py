from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (workflow.py, slurm_cluster.py)

from slurm_cluster import slurm_cluster  # noqa: E402,F401  (the private Slurm cluster fixture)


@pytest.fixture
def default_config() -> dict:
    """The embedded default config (config/config.yaml), a fresh copy per test."""
    return copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))


@pytest.fixture
def repo() -> Path:
    return REPO
