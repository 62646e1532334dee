"""The main command redoes a finished run whose outputs were deleted or whose log was damaged, and
only that run; a dry run says so and changes nothing (the tests run in order, on one finished workflow)."""

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


def dry_run_lists(work: Path) -> list[str]:
    """The runs a dry run says the main command will do again; it changes nothing."""
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.rglob("*") if p.is_file() and ".snakemake" not in p.parts}
    dry = snakemake(work, "results/tables.md", "-n", "--configfile", CONFIG)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.rglob("*") if p.is_file() and ".snakemake" not in p.parts}
    assert after == before, "a dry run changed files"
    out = (dry.stdout + dry.stderr).splitlines()
    start = next((i for i, line in enumerate(out) if "to do again by the next command without -n" in line), None)
    listed = []
    for line in out[start + 1:] if start is not None else []:
        if not line.startswith("  experiments/"):
            break
        listed.append(line.strip().split(":")[0])
    return listed


def launched(out) -> list[str]:  # noqa: ANN001 - a CompletedProcess
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("[ftscale] embedded_gpus") and "(log: " in line]


def statuses(work: Path) -> dict[str, str]:
    return {r["run"]: r["status"] for r in csv.DictReader((work / "results/scaling.csv").open())}


def test_deleted_metrics_are_redone_and_nothing_else(finished):
    (finished / ONE / "metrics.jsonl").unlink()
    assert dry_run_lists(finished) == [ONE]
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    assert len(launched(again)) == 1 and ONE in launched(again)[0]
    assert (finished / ONE / "metrics.jsonl").is_file() and set(statuses(finished).values()) == {"ok"}


def test_a_deleted_run_directory_is_redone(finished):
    shutil.rmtree(finished / TWO)
    assert dry_run_lists(finished) == [TWO]
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    assert len(launched(again)) == 1 and TWO in launched(again)[0]
    assert (again.stdout + again.stderr).count("rule configure_run:") == 1  # configured again too


def test_a_damaged_log_is_redone(finished):
    log = finished / ONE / "train.log"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))  # cut after the first step
    assert dry_run_lists(finished) == [ONE]
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    assert (finished / ONE / "metrics.jsonl.stale").is_file()  # moved aside, not deleted
    assert len(launched(again)) == 1 and ONE in launched(again)[0]
    assert set(statuses(finished).values()) == {"ok"}


def test_then_nothing_to_do(finished):
    dry = snakemake(finished, "results/tables.md", "-n", "--configfile", CONFIG)
    assert "Nothing to be done" in dry.stdout + dry.stderr
