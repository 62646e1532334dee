"""Bad input to the command line and to the analysis: one line, naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO
from workflow import copy_workflow, snakemake

from ftscale import __version__
from ftscale.analyze.results import ResultsError, write_results
from ftscale.study.schema import ConfigError, load_yaml
from ftscale.study.sweep import load_study

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


BROKEN_YAML = "engine: embedded\nmodels: [tiny_llama\nseed: 1\n"  # the list is never closed: line 3 says so


@pytest.mark.parametrize("text, message", [(BROKEN_YAML, "config/config.yaml:3: not valid YAML: expected ',' or ']'"),
                                           ("", "config/config.yaml: the configuration is empty")])
def test_snakemake_names_file_and_line_of_a_broken_default_config(tmp_path, text, message):
    work = copy_workflow(tmp_path)
    (work / "config/config.yaml").write_text(text)
    out = snakemake(work, "-n", "results/tables.md", "--cores", "1", env=ENV, check=False)
    assert out.returncode == 1 and message in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_broken_configfile_is_named_by_check_config(tmp_path):
    """Snakemake's command line reads --configfile before the workflow starts: its own message names no
    file; `snakemake --verbose` shows YAML's position, `ftscale check-config` names file and line."""
    work = copy_workflow(tmp_path)
    (work / "bad.yaml").write_text(BROKEN_YAML)
    (work / "empty.yaml").write_text("")
    plain = snakemake(work, "-n", "--configfile", "bad.yaml", "--cores", "1", env=ENV, check=False)
    assert plain.returncode == 1 and "Config file is not valid JSON or YAML" in plain.stdout + plain.stderr
    verbose = snakemake(work, "-n", "--verbose", "--configfile", "bad.yaml", "--cores", "1", env=ENV, check=False)
    assert verbose.returncode == 1 and 'in "bad.yaml", line 3, column 5' in verbose.stdout + verbose.stderr
    out = ftscale("check-config", "bad.yaml", cwd=work)
    assert out.returncode == 2 and out.stderr.startswith("ftscale: error: bad.yaml:3: not valid YAML")
    out = ftscale("check-config", "empty.yaml", cwd=work)
    assert (out.returncode, out.stderr) == (2, "ftscale: error: empty.yaml: the configuration is empty\n")


def test_check_config_validates_and_plans_as_the_workflow(tmp_path):
    work = copy_workflow(tmp_path)
    out = ftscale("check-config", "config/config.yaml", cwd=work)
    assert (out.returncode, out.stdout) == (0, "config/config.yaml: valid: 11 runs of 2 model(s)\n")
    (work / "gpus.yaml").write_text("tracks: {data_parallel: {gpus: [0]}}\n")  # merged over the default
    out = ftscale("check-config", "config/config.yaml", "gpus.yaml", cwd=work)
    assert out.returncode == 2 and "config/config.yaml, gpus.yaml: key 'tracks.data_parallel.gpus[0]' = 0" in out.stderr


@pytest.mark.parametrize(("targets", "model", "bad"), [
    ("[q_proj, qkv_proj_nonexistent]", "tiny_llama", "['qkv_proj_nonexistent']"),
    ("[gate_proj, up_proj, down_proj]", "tiny_mixtral", "['gate_proj', 'up_proj', 'down_proj']"),
])
def test_check_config_refuses_a_lora_target_the_model_lacks(tmp_path, targets, model, bad):
    """Before any job: one line per engine and model, naming the file, the key, the value and the valid names."""
    work = copy_workflow(tmp_path)
    (work / "lora.yaml").write_text(f"tracks: {{data_parallel: {{lora: {{rank: 8, alpha: 16, targets: {targets}}}}}}}\n")
    out = ftscale("check-config", "config/config.yaml", "lora.yaml", cwd=work)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = next(x for x in out.stderr.splitlines() if f"model {model})" in x)
    value = repr(targets.strip("[]").split(", "))
    assert line.strip().startswith(f"config/config.yaml, lora.yaml: key 'tracks.data_parallel.lora.targets' = "
                                   f"{value} (engine embedded, model {model}): ")
    assert f"has no module(s) {bad} for LoRA: the valid targets are ['q_proj', 'k_proj', 'v_proj', 'o_proj'" in line


def test_a_long_value_in_an_error_is_cut_cleanly():
    """A value too long to show whole ends with an ellipsis after a whole item, never mid-string."""
    with pytest.raises(ConfigError) as err:
        load_study({"models": ["tiny_llama"], "seed": ["x" * 30 + str(i) for i in range(12)]}, "long.yaml", root=REPO)
    shown = str(err.value).split("key 'seed' = ", 1)[1].split(": ", 1)[0]
    assert shown.endswith(", ...]") and len(shown) < 160
    assert all(len(item.strip(' "[]')) in (31, 32, 0, 3) for item in shown.split(","))


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
