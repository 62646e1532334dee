"""The main command redoes a finished run whose outputs were deleted or whose log was damaged, and
only that run (the tests run in order, on one finished workflow)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from workflow import copy_workflow, snakemake

CONFIG = "tests/config/rerun.yaml"
ONE = "experiments/data_parallel/tiny_llama/embedded_gpus1_mbs2_gbs2_seq32"
TWO = "experiments/data_parallel/tiny_llama/embedded_gpus2_mbs2_gbs4_seq32"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work = copy_workflow(tmp_path_factory.mktemp("rerun"))
    snakemake(work, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    return work


def planned_outputs(work: Path) -> list[str]:
    dry = snakemake(work, "results/tables.md", "-n", "--configfile", CONFIG)
    return sorted(line.split(":", 1)[1].strip() for line in (dry.stdout + dry.stderr).splitlines()
                  if line.strip().startswith("output:"))


def launched(out) -> list[str]:  # noqa: ANN001 - a CompletedProcess
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("[ftscale] embedded_gpus") and "(log: " in line]


def statuses(work: Path) -> dict[str, str]:
    return {r["run"]: r["status"] for r in csv.DictReader((work / "results/scaling.csv").open())}


def test_deleted_metrics_are_redone_and_nothing_else(finished):
    (finished / ONE / "metrics.jsonl").unlink()
    assert [p for p in planned_outputs(finished) if p.endswith("metrics.jsonl")] == [f"{ONE}/metrics.jsonl"]
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    assert len(launched(again)) == 1 and ONE in launched(again)[0]
    assert (finished / ONE / "metrics.jsonl").is_file() and set(statuses(finished).values()) == {"ok"}


def test_a_deleted_run_directory_is_redone(finished):
    shutil.rmtree(finished / TWO)
    planned = planned_outputs(finished)
    assert [p for p in planned if p.endswith("metrics.jsonl")] == [f"{TWO}/metrics.jsonl"]
    assert any(p.startswith(f"{TWO}/run.json") for p in planned)  # configured again too
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    assert len(launched(again)) == 1 and TWO in launched(again)[0]


def test_a_damaged_log_is_redone(finished):
    log = finished / ONE / "train.log"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))  # cut after the first step
    assert [p for p in planned_outputs(finished) if p.endswith("metrics.jsonl")] == [f"{ONE}/metrics.jsonl"]
    assert (finished / ONE / "metrics.jsonl.stale").is_file()  # moved aside, not deleted
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    assert len(launched(again)) == 1 and ONE in launched(again)[0]
    assert set(statuses(finished).values()) == {"ok"}


def test_then_nothing_to_do(finished):
    dry = snakemake(finished, "results/tables.md", "-n", "--configfile", CONFIG)
    assert "Nothing to be done" in dry.stdout + dry.stderr
