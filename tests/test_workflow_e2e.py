"""The whole workflow, for real, on the tiny models in a temporary copy of the repository."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from workflow import copy_workflow, snakemake

CONFIG = "tests/config/e2e.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work = copy_workflow(tmp_path_factory.mktemp("e2e"))
    snakemake(work, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    return work


def test_every_row_comes_from_its_runs_log(finished):
    rows = list(csv.DictReader((finished / "results" / "scaling.csv").open()))
    # 2 models x (1, 2 GPUs weak, 2 GPUs strong): the 1-GPU run serves both modes
    assert len(rows) == 6
    for row in rows:
        assert row["status"] == "ok", row
        run_dir = finished / "experiments" / row["track"] / row["model"] / row["run"]
        lines = [line for line in (run_dir / "train.log").read_text().splitlines() if "step_time_s=" in line]
        assert len(lines) == 5
        times = [float(line.split("step_time_s=")[1].split()[0]) for line in lines[1:]]
        assert float(row["step_time_s"]) == pytest.approx(statistics.median(times), rel=1e-9)
        assert float(row["peak_mem_mib"]) == max(float(line.split("peak_mem_mib=")[1].split()[0]) for line in lines)
        assert float(row["wall_s"]) == json.loads((run_dir / "launch.json").read_text())["wall_s"]
        assert (finished / row["source"].split(":")[0]).resolve() == (run_dir / "train.log").resolve()
        assert json.loads((run_dir / "run.json").read_text())["global_batch"] == int(row["global_batch"])


def test_tables_have_both_scaling_modes_per_model(finished):
    md = (finished / "results" / "tables.md").read_text()
    for model in ("tiny_llama", "tiny_mixtral"):
        assert f"#### {model}: weak scaling" in md
        assert f"#### {model}: strong scaling" in md
    assert "E = T(1) / T(N)" in md and "E = T(1) / (N x T(N))" in md


def test_checkpoints_are_read_only_after_import(finished):
    ckpt = finished / "models" / "tiny_llama" / "model"
    assert (ckpt / "IMPORT.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert not any(p.stat().st_mode & 0o222 for p in [ckpt, *ckpt.iterdir()])


def test_second_run_has_nothing_to_do(finished):
    out = snakemake(finished, "results/tables.md", "-n", "--configfile", CONFIG)
    assert "Nothing to be done" in out.stdout + out.stderr


def test_lint_is_clean(finished):
    out = snakemake(finished, "--lint", "--configfile", CONFIG, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr
