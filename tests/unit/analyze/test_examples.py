"""The committed GPU examples (results/examples/) are what the current analysis makes of their committed
logs: benchmarks/gpu/reanalyse_examples.py, run on a copy, writes the same scaling.csv and tables.md."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from paths import REPO

EXAMPLES = REPO / "results" / "examples"


def reanalyse_module():
    spec = importlib.util.spec_from_file_location("reanalyse_examples",
                                                  REPO / "benchmarks" / "gpu" / "reanalyse_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_a_committed_example_is_current(tmp_path, monkeypatch, name):
    monkeypatch.delenv("FTSCALE_PARTICIPANT", raising=False)
    copy = tmp_path / name
    shutil.copytree(EXAMPLES / name, copy, ignore=shutil.ignore_patterns("scaling.csv", "tables.md", "plots"))
    reanalyse_module().reanalyse(name, tmp_path)
    for output in ("scaling.csv", "tables.md"):
        assert (copy / output).read_text() == (EXAMPLES / name / output).read_text(), (
            f"results/examples/{name}/{output} is not what its logs give now: "
            "run PYTHONPATH=scripts python3 benchmarks/gpu/reanalyse_examples.py")
