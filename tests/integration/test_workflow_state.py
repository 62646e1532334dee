"""Nothing that decides a rerun depends on where the study lies, on a dry run or on another config; the plan
follows its config; the tables follow their runs' files (the tests run in order, on one finished workflow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from paths import REPO
from workflow import copy_workflow, snakemake

from ftscale.study.sweep import load_config_file
from ftscale.workflow import config_source, plan_inputs, workflow_study

CONFIG = "tests/config/rerun.yaml"
ONE = "experiments/data_parallel/tiny_llama/embedded_gpus1_mbs2_gbs2_seq32"


def test_config_files_are_named_relative_to_the_study(tmp_path):
    assert config_source([tmp_path / "tests/config/a.yaml", "/elsewhere/b.yaml"], root=tmp_path) == \
        "tests/config/a.yaml, /elsewhere/b.yaml"


def test_the_plans_inputs_name_the_config_file_and_its_values(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config_file(CONFIG)
    one = plan_inputs(workflow_study(config, [Path.cwd() / CONFIG]))
    assert CONFIG in one and str(Path.cwd()) not in one
    assert one != plan_inputs(workflow_study(config, ["tests/config/same_models.yaml"]))
    assert one != plan_inputs(workflow_study({**config, "plan": {"gpu_memory_gib": 40}}, [CONFIG]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work = copy_workflow(tmp_path_factory.mktemp("state") / "study")
    snakemake(work, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    return work


def nothing_to_do(work: Path, *args: str) -> bool:
    dry = snakemake(work, "results/tables.md", "-n", "--configfile", CONFIG, *args)
    return "Nothing to be done" in dry.stdout + dry.stderr


def files(work: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(work)): (p.stat().st_mtime_ns, p.read_bytes()) for p in work.rglob("*")
            if p.is_file() and ".snakemake" not in p.parts}


def test_a_copy_of_the_study_has_nothing_to_do(finished):
    copy = finished.parent / "copy"
    shutil.copytree(finished, copy, symlinks=True)  # contents, modes and times, as cp -a
    assert nothing_to_do(copy)
    assert nothing_to_do(finished)


def test_a_dry_run_of_another_config_changes_nothing(finished):
    before = files(finished)
    snakemake(finished, "results/tables.md", "-n", "--configfile", "tests/config/e2e.yaml")
    assert files(finished) == before
    assert nothing_to_do(finished)


def test_the_plan_follows_its_config(finished):
    snakemake(finished, "results/plan.md", "--cores", "1", "--configfile", CONFIG)
    plan = snakemake(finished, "results/plan.md", "-n", "--configfile", CONFIG)
    assert "Nothing to be done" in plan.stdout + plan.stderr
    config = yaml.safe_load((finished / CONFIG).read_text())
    (finished / "tests/config/same_models.yaml").write_text(yaml.safe_dump(config))
    (finished / "tests/config/other_gpu.yaml").write_text(yaml.safe_dump({**config, "plan": {"gpu_memory_gib": 40}}))
    for other in ("tests/config/same_models.yaml", "tests/config/other_gpu.yaml"):
        dry = snakemake(finished, "results/plan.md", "-n", "--configfile", other)
        assert "rule plan:" in dry.stdout + dry.stderr and "Params have changed" in dry.stdout + dry.stderr, other
    snakemake(finished, "results/plan.md", "--cores", "1", "--configfile", "tests/config/other_gpu.yaml")
    assert "tests/config/other_gpu.yaml" in (finished / "results/plan.md").read_text()
    assert nothing_to_do(finished)  # the tables do not read the plan


def test_run_files_changed_after_the_tables_rebuild_them_and_nothing_else(finished):
    launch = finished / ONE / "launch.json"
    launch.write_text(json.dumps({**json.loads(launch.read_text()), "host": "elsewhere"}, indent=2) + "\n")
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    out = again.stdout + again.stderr
    assert "localrule tables:" in out and "rule train:" not in out
    assert nothing_to_do(finished)


def ro_mount(path: Path) -> bool:
    """``path`` bind-mounted read-only onto itself (as root); False where that is not possible."""
    if os.geteuid() != 0:
        return False
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode:
        return False
    subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
    return True


def test_read_only_results_end_in_one_line_then_the_next_command_completes(finished):
    (finished / ONE / "metrics.jsonl").unlink()
    if not ro_mount(finished / "results"):
        pytest.skip("needs root to mount results/ read-only")
    try:
        failed = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG, check=False)
    finally:
        subprocess.run(["umount", str(finished / "results")], check=True)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Traceback" not in out
    assert "results: cannot write: Read-only file system" in out
    assert not (finished / ONE / "metrics.jsonl").exists()  # nothing ran
    again = snakemake(finished, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    assert "localrule tables:" in again.stdout + again.stderr
    assert (finished / ONE / "metrics.jsonl").is_file() and nothing_to_do(finished)
