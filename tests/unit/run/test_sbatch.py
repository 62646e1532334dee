"""The rendered sbatch scripts hold no absolute path: a study moved or copied elsewhere keeps them valid
(and Snakemake, which reruns a job whose rendered script changed, has nothing to redo). They find the
study's root from their own path when run by hand, and from the directory sbatch was called from under
Slurm, which runs a copy of the script from its spool directory. Executed here with bash, outside Slurm."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from paths import REPO

from ftscale.run.sbatch import (
    render_import_sbatch,
    render_run_sbatch,
    slurm_placement,
    train_resources,
)
from ftscale.study.sweep import load_config_file
from ftscale.workflow import workflow_study


@pytest.fixture
def study(monkeypatch):
    monkeypatch.chdir(REPO)  # where Snakemake loads the study: paths are relative to it
    return workflow_study(load_config_file("config/config.yaml"), ["config/config.yaml"])


def scripts(study) -> dict[Path, str]:
    """Each rendered script by its path relative to the study root, with the file it checks for."""
    run, model = study.runs[0], study.models["tiny_llama"]
    return {run.paths.sbatch: render_run_sbatch(run, study.config, "nvcr.io/nvidia/nemo:25.04"),
            model.paths.import_sbatch: render_import_sbatch(model, study.config, "")}


def test_no_absolute_path_in_the_scripts(study):
    for path, text in scripts(study).items():
        assert str(REPO) not in text and str(Path.cwd()) not in text, path
        output = next(line for line in text.splitlines() if line.startswith("#SBATCH --output="))
        assert output == f"#SBATCH --output={path.parent}/{output.rsplit('/', 1)[1]}"  # relative to the root
        assert not any(line.startswith("cd /") for line in text.splitlines())


def study_tree(root: Path, study) -> Path:
    """A study at ``root``: the rendered scripts, the files they check for, and an ``ftscale`` and a
    ``srun`` (the run script's container step) on PATH that say where they were started and with what."""
    for path, text in scripts(study).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
        (root / path.parent / ("run.json" if path.name == "run.sbatch" else "model.yaml")).write_text("{}\n")
    bin_dir = root.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ftscale").write_text('#!/bin/sh\necho "ftscale in $PWD: $*"\n')
    (bin_dir / "ftscale").chmod(0o755)
    (bin_dir / "srun").write_text('#!/bin/sh\necho "ftscale in $PWD: $*"\n')
    (bin_dir / "srun").chmod(0o755)
    return bin_dir


def bash(script: Path, cwd: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


def test_by_hand_the_root_is_found_from_the_scripts_path_in_a_moved_study(tmp_path, study):
    bin_dir = study_tree(tmp_path / "first", study)
    moved = tmp_path / "moved"
    (tmp_path / "first").rename(moved)
    for path in scripts(study):
        for cwd in (tmp_path, moved / path.parent):  # anywhere: outside the study, or in the run directory
            out = bash(moved / path, cwd, bin_dir)
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(f"ftscale in {moved}: "), out.stdout


def test_under_slurm_the_root_is_the_directory_sbatch_was_called_from(tmp_path, study):
    root = tmp_path / "study"
    bin_dir = study_tree(root, study)
    spool = tmp_path / "spool" / "job1"
    spool.mkdir(parents=True)
    for path in scripts(study):
        shutil.copy(root / path, spool / "slurm_script")  # what slurmd runs: a copy, far from the study
        out = bash(spool / "slurm_script", root, bin_dir)
        assert out.returncode == 0 and out.stdout.startswith(f"ftscale in {root}: "), out.stdout + out.stderr

        elsewhere = bash(spool / "slurm_script", tmp_path, bin_dir)
        assert elsewhere.returncode == 1 and not elsewhere.stdout
        marker = path.parent / ("run.json" if path.name == "run.sbatch" else "model.yaml")
        assert elsewhere.stderr.strip() == f"{path}: no {marker} under {tmp_path}: submit from the study's root directory"


def test_a_run_across_nodes_asks_for_its_gpus_per_node_and_one_task_per_node(study):
    """``--gpus=2 --nodes=2`` may put both GPUs on one node: a job of several nodes asks per node, one task per
    node (its torchrun), and the SLURM executor plugin runs its command unwrapped (the ``mpi`` resource)."""
    run = dataclasses.replace(study.runs[0], gpus=16, nodes=2, dp=16)
    header = render_run_sbatch(run, study.config).splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"} <= set(header)
    assert not any(line.startswith("#SBATCH --gpus=") for line in header)
    assert slurm_placement(train_resources(run, study.config)) == {
        "gpu": None, "gres": "gpu:8", "mpi": "srun", "tasks": 2, "tasks_per_gpu": 0}
    one = train_resources(dataclasses.replace(run, gpus=4, nodes=1, dp=4), study.config)
    assert slurm_placement(one) == {"gpu": 4, "gres": None, "mpi": None, "tasks": None, "tasks_per_gpu": None}
