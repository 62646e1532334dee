"""Configuration validation: the good config and every kind of bad input, each error naming file, key, value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ftscale.study.models import load_model
from ftscale.study.schema import ConfigError
from ftscale.study.sweep import load_study
from ftscale.workflow import container_image, conversion_command, model_files, run_files, workflow_study


def study(cfg, root):
    return load_study(cfg, source="config/config.yaml", root=root)


def test_default_config_plans_both_tracks(default_config, repo):
    s = study(default_config, repo)
    dp = [r for r in s.runs if r.track == "data_parallel"]
    assert sorted((r.model, r.gpus) for r in dp) == [(m, g) for m in ("tiny_llama", "tiny_mixtral") for g in (1, 2, 4)]
    assert {r.gpus for r in dp} == {1, 2, 4}
    assert all(r.lora and r.tp == 1 and r.dp == r.gpus for r in dp)
    # weak scaling: global batch grows with GPUs, gradient accumulation stays
    by_gpus = {r.gpus: r for r in dp if r.model == "tiny_llama"}
    assert by_gpus[4].global_batch == 4 * by_gpus[1].global_batch
    assert by_gpus[4].grad_accum == by_gpus[1].grad_accum
    assert by_gpus[4].directory == "experiments/data_parallel/tiny_llama/embedded_gpus4_mbs4_gbs32_seq128"
    mp = [r for r in s.runs if r.track == "model_parallel"]
    assert {r.name.split("_mbs")[0] for r in mp} == {"embedded_tp2_ep1_dp1_sp", "embedded_tp4_ep1_dp1_sp", "embedded_tp1_ep2_dp1", "embedded_tp2_ep2_dp1_sp"}
    assert all(r.lora is None for r in mp)


def test_strong_scaling_keeps_global_batch_and_dedups_one_gpu_run(default_config, repo):
    default_config["tracks"]["data_parallel"]["scaling"] = ["weak", "strong"]
    default_config["batch"]["global_batch"] = 16
    s = study(default_config, repo)
    groups = s.scaling_groups("tiny_llama")
    assert [r.global_batch for r in groups["strong"]] == [16, 16, 16]
    assert [r.global_batch for r in groups["weak"]] == [16, 32, 64]
    assert groups["weak"][0] is groups["strong"][0]  # the same 1-GPU run serves both
    assert [r.grad_accum for r in groups["strong"]] == [4, 2, 1]


def test_defaults_are_filled(default_config, repo):
    del default_config["seed"]
    del default_config["tracks"]["data_parallel"]["gpus"]
    s = study(default_config, repo)
    assert s.config["seed"] == 1234
    assert {r.gpus for r in s.runs_of("data_parallel")} == {1, 2, 4, 8}


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.update(models=["no_such_model"]), "unknown model 'no_such_model'"),
        (lambda c: c["tracks"]["data_parallel"].update(gpus=[1, 0]), "key 'tracks.data_parallel.gpus[1]' = 0"),
        (lambda c: c["tracks"]["data_parallel"].update(gpus=[1, 2.5]), "key 'tracks.data_parallel.gpus[1]' = 2.5"),
        (lambda c: c["tracks"]["data_parallel"].update(gpus=[1, "two"]), "key 'tracks.data_parallel.gpus[1]' = \"two\""),
        (lambda c: c["batch"].update(global_batch=6), "global batch 6 (weak scaling) is not divisible by micro_batch x data-parallel size = 4 x 1"),
        (lambda c: c["batch"].update(steps=2, warmup_steps=2), "warmup_steps = 2 must be less than steps = 2"),
        (lambda c: c["batch"].update(micro_batch=0), "key 'batch.micro_batch' = 0"),
        (lambda c: c.update(engine="deepspeed"), "key 'engine' = \"deepspeed\""),
        (lambda c: c.update(typo_key=1), "typo_key"),
    ],
    ids=["unknown-model", "zero-gpus", "float-gpus", "string-gpus", "indivisible-batch", "warmup", "micro0",
         "engine", "unknown-key"],
)
def test_bad_config_is_rejected_naming_file_key_value(default_config, repo, edit, expected):
    edit(default_config)
    with pytest.raises(ConfigError) as err:
        study(default_config, repo)
    assert expected in str(err.value)
    if "unknown model" not in expected:
        assert "config/config.yaml" in str(err.value)


@pytest.mark.parametrize(
    "model, layout, expected",
    [
        ("tiny_llama", {"tp": 1}, "need 2 or more GPUs"),
        ("tiny_llama", {"tp": 3, "dp": 1}, "tp = 3 must divide the attention heads (8) and the key/value heads (4)"),
        ("tiny_llama", {"tp": 8}, "tp = 8 must divide"),
        ("tiny_llama", {"tp": 1, "ep": 2}, "tiny_llama[0]' = {\"tp\": 1, \"ep\": 2, \"dp\": 1, \"sp\": false}: ep = 2 but the model is dense"),
        ("tiny_mixtral", {"tp": 1, "ep": 8}, "ep = 8 must divide the number of experts (4)"),
        ("tiny_mixtral", {"tp": 1, "ep": 2, "sp": True}, "sp = true needs tp > 1"),
        ("tiny_llama", {"tp": 1, "pp": 4}, "pp = 4 must divide the decoder layers (num_hidden_layers = 2)"),
        ("tiny_llama", {"tp": 1, "pp": 2}, "pp = 2: the embedded engine has no pipeline parallelism "
                                           "(engines with pp > 1: ['nemo'])"),
        ("tiny_mixtral", {"tp": 1, "pp": 0}, "tiny_mixtral[0].pp' = 0: 0 is less than the minimum of 1"),
    ],
)
def test_bad_layouts_are_rejected(default_config, repo, model, layout, expected):
    default_config["tracks"]["model_parallel"]["layouts"] = {model: [layout]}
    with pytest.raises(ConfigError) as err:
        study(default_config, repo)
    msg = str(err.value)
    assert expected in msg
    assert f"tracks.model_parallel.layouts.{model}[0]" in msg


def test_layouts_for_unlisted_model_rejected(default_config, repo):
    default_config["tracks"]["model_parallel"]["layouts"]["ghost"] = [{"tp": 2}]
    with pytest.raises(ConfigError, match="model 'ghost' is not in 'models'"):
        study(default_config, repo)


def _model_tree(tmp_path: Path, repo: Path, name: str, spec: dict) -> Path:
    shutil.copytree(repo / "config", tmp_path / "config")
    (tmp_path / "models" / name).mkdir(parents=True)
    (tmp_path / "models" / name / "model.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_model_yaml_missing_required_field(tmp_path, repo):
    spec = yaml.safe_load((repo / "models/tiny_llama/model.yaml").read_text())
    del spec["architecture"]["hidden_size"]
    root = _model_tree(tmp_path, repo, "tiny_llama", spec)
    with pytest.raises(ConfigError) as err:
        load_model("tiny_llama", root)
    assert f"{root}/models/tiny_llama/model.yaml: key 'architecture'" in str(err.value)
    assert "'hidden_size' is a required property" in str(err.value)


def test_mixtral_needs_experts(tmp_path, repo):
    spec = yaml.safe_load((repo / "models/tiny_mixtral/model.yaml").read_text())
    del spec["architecture"]["num_local_experts"]
    root = _model_tree(tmp_path, repo, "tiny_mixtral", spec)
    with pytest.raises(ConfigError, match="num_local_experts"):
        load_model("tiny_mixtral", root)


def test_local_source_must_exist(tmp_path, repo):
    spec = yaml.safe_load((repo / "models/tiny_llama/model.yaml").read_text())
    spec["source"] = "checkpoints/nowhere"
    root = _model_tree(tmp_path, repo, "tiny_llama", spec)
    with pytest.raises(ConfigError) as err:
        load_model("tiny_llama", root)
    assert "key 'source' = 'checkpoints/nowhere'" in str(err.value)
    assert "does not exist" in str(err.value)


def test_name_must_match_directory(tmp_path, repo):
    spec = yaml.safe_load((repo / "models/tiny_llama/model.yaml").read_text())
    root = _model_tree(tmp_path, repo, "other_name", spec)
    with pytest.raises(ConfigError, match="key 'name' = 'tiny_llama': must equal the directory name 'other_name'"):
        load_model("other_name", root)


def test_every_shipped_model_and_the_template_validate(repo):
    for path in sorted((repo / "models").glob("*/model.yaml")):
        model = load_model(path.parent.name, repo, check_source=False)
        assert model.arch["hidden_size"] > 0


def test_minimal_config_gets_every_default(repo):
    s = load_study({"models": ["tiny_llama"], "batch": {"micro_batch": 1, "global_batch": 1, "seq_length": 16,
                                                         "steps": 2, "warmup_steps": 1}}, "min.yaml", repo)
    run = s.runs_of("data_parallel")[0]
    assert run.lora == {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert s.config["resources"]["train"]["runtime_min"] == 30 and s.config["engine"] == "embedded"


def test_batch_lists_sweep_every_combination(default_config, repo):
    default_config["batch"].update(micro_batch=[1, 2], seq_length=[64, 128])
    default_config["tracks"]["data_parallel"]["gpus"] = [1, 2]
    s = study(default_config, repo)
    groups = s.scaling_groups("tiny_llama")
    assert sorted(groups) == sorted(f"weak, micro batch {m}, sequence {q}" for m in (1, 2) for q in (64, 128))
    assert all(len(runs) == 2 for runs in groups.values())
    assert len({r.name for r in s.runs_of("data_parallel") if r.model == "tiny_llama"}) == 8


def test_the_workflow_lists_each_runs_files_and_names_the_config(default_config, repo):
    s = workflow_study(default_config, [Path("config/config.yaml")], root=repo)
    assert s.source == "config/config.yaml"
    assert run_files(s, "run") == [f"{r.directory}/run.json" for r in s.runs]
    mp = run_files(s, "metrics", "model_parallel")
    assert mp == [f"{r.directory}/metrics.jsonl" for r in s.runs if r.track == "model_parallel"] and len(mp) == 5
    assert model_files(s, "spec") == ["models/tiny_llama/model.yaml", "models/tiny_mixtral/model.yaml"]
    assert container_image(s) is None  # embedded: no image
    assert "exit 1" in conversion_command(s, "nemo_checkpoint")  # and no conversion


@pytest.mark.parametrize("container, image", [("nvcr.io/nvidia/nemo:25.09", "docker://nvcr.io/nvidia/nemo:25.09"),
                                              ("docker://my/nemo:1", "docker://my/nemo:1"), ("none", None)])
def test_the_nemo_jobs_image_and_command(repo, container, image):
    cfg = yaml.safe_load((repo / "config" / "workshop.yaml").read_text())
    cfg.update(container=container, nemo={"python": "/opt/nemo/bin/python"})
    s = workflow_study(cfg, ["config/workshop.yaml"], root=repo)
    assert container_image(s) == image
    assert conversion_command(s, "nemo_checkpoint") == (  # the engine's Python on the project's sources
        'PYTHONPATH="$PWD/scripts${{PYTHONPATH:+:$PYTHONPATH}}" /opt/nemo/bin/python -m ftscale.cli import-nemo '
        "{wildcards.model} --hf {input} --out {output} --transformer-impl transformer_engine")
