"""Bad input to the command line and to the analysis: one line, naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftscale import __version__
from ftscale.analyze.results import ResultsError, write_results
from ftscale.study.schema import ConfigError, load_yaml
from ftscale.study.sweep import load_study

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'scripts'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def ftscale(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftscale.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_version(tmp_path):
    out = ftscale("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"ftscale {__version__}"


def test_train_of_a_missing_run_file_names_it(tmp_path):
    out = ftscale("train", "/no/such/run.json", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("ftscale: error: /no/such/run.json: no such run file (a run directory's run.json, "
                                  "written by the workflow)")


def test_train_of_a_broken_run_file_names_file_and_line(tmp_path):
    (tmp_path / "run.json").write_text('{"name": "x",\n  "gpus": }\n')
    out = ftscale("train", "run.json", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("ftscale: error: run.json:2: not valid JSON")


def test_import_outside_the_repository_says_why(tmp_path):
    out = ftscale("import", "tiny_llama", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"there is no models/ directory in {tmp_path}" in out.stderr and "known models: \n" not in out.stderr


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: embedded\nmodels: [tiny_llama\nseed: 1\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:\d+: not valid YAML"):
        load_yaml(bad)


def test_empty_config_names_the_file():
    with pytest.raises(ConfigError, match=r"^my\.yaml: the configuration is empty"):
        load_study({}, "my.yaml", REPO)


def test_results_that_cannot_be_written_name_the_file(tmp_path):
    """As with a read-only results/ (which root, running the tests in CI, could write anyway): the
    plots directory is a file here, so it cannot be created."""
    cfg = {"models": ["tiny_llama"], "engine": "embedded",
           "batch": {"micro_batch": 1, "global_batch": 2, "seq_length": 32, "steps": 3, "warmup_steps": 1},
           "tracks": {"data_parallel": {"gpus": [1]}, "model_parallel": {"enabled": False}}}
    results = tmp_path / "results"
    results.mkdir()
    (results / "plots").write_text("not a directory")
    with pytest.raises(ResultsError, match=rf"^{results}/plots: cannot create the results directory: File exists$"):
        write_results(load_study(cfg, "test", REPO), results / "scaling.csv", results / "tables.md", root=tmp_path)
