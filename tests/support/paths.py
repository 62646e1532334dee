"""Where the tests find the repository: its root, the test fixtures and configs, and the architecture of a
model as its models/<name>/model.yaml declares it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"
TEST_CONFIGS = TESTS / "config"


def architecture(model: str) -> dict[str, Any]:
    """The ``architecture`` mapping of models/<model>/model.yaml, a fresh copy on each call."""
    return yaml.safe_load((REPO / "models" / model / "model.yaml").read_text())["architecture"]
