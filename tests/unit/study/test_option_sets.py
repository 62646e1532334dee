"""An engine section that lists option sets: a sweep axis (ftscale.study.sweep). Each set gets its own runs;
where a study runs more than one set of an engine, the set's name is part of each run's identity and name."""

from __future__ import annotations

import json

import pytest

from ftscale.study.run import Run
from ftscale.study.schema import ConfigError
from ftscale.study.sweep import load_study, set_name

SETS = [{"name": "eager"}, {"name": "ckpt", "activation_checkpointing": True}]


def one_model(cfg: dict) -> dict:
    """The default config on tiny_llama only, data-parallel track at 1 and 2 processes."""
    cfg["models"] = ["tiny_llama"]
    cfg["tracks"]["data_parallel"]["gpus"] = [1, 2]
    cfg["tracks"]["model_parallel"] = {"enabled": False}
    return cfg


def test_each_option_set_gets_its_own_runs_named_after_it(default_config, repo):
    study = load_study({**one_model(default_config), "embedded": SETS}, "my.yaml", repo)
    names = sorted(r.name for r in study.runs)
    assert names == ["embedded_gpus1_mbs4_gbs8_seq128_ckpt", "embedded_gpus1_mbs4_gbs8_seq128_eager",
                     "embedded_gpus2_mbs4_gbs16_seq128_ckpt", "embedded_gpus2_mbs4_gbs16_seq128_eager"]
    assert len({r.identity for r in study.runs}) == len({r.directory for r in study.runs}) == 4
    by_name = {r.name: r for r in study.runs}
    assert by_name["embedded_gpus1_mbs4_gbs8_seq128_ckpt"].engine_options == {"activation_checkpointing": True}
    assert by_name["embedded_gpus1_mbs4_gbs8_seq128_ckpt"].options.activation_checkpointing is True
    assert by_name["embedded_gpus1_mbs4_gbs8_seq128_eager"].engine_options == {}
    assert by_name["embedded_gpus1_mbs4_gbs8_seq128_eager"].directory == (
        "experiments/data_parallel/tiny_llama/embedded_gpus1_mbs4_gbs8_seq128_eager")


def test_one_option_set_keeps_the_plain_name(default_config, repo):
    one_model(default_config)
    as_mapping = load_study({**default_config, "embedded": {"activation_checkpointing": True}}, "my.yaml", repo)
    as_list = load_study({**default_config, "embedded": SETS[1:]}, "my.yaml", repo)
    selected = load_study({**default_config, "embedded": SETS, "option_sets": ["ckpt"]}, "my.yaml", repo)
    for study in (as_mapping, as_list, selected):
        assert sorted(r.name for r in study.runs) == ["embedded_gpus1_mbs4_gbs8_seq128",
                                                      "embedded_gpus2_mbs4_gbs16_seq128"]
        assert all(r.option_set == "" and r.options.activation_checkpointing for r in study.runs)


def test_a_set_without_a_name_is_named_after_its_options(default_config, repo):
    assert set_name({"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}) == (
        "compile_compile_mode_max_autotune_no_cudagraphs")
    assert set_name({"activation_checkpointing": False}) == "no_activation_checkpointing"
    assert set_name({}) == "defaults"
    study = load_study({**one_model(default_config), "embedded": [{}, {"fused_ce": "chunked"}]}, "my.yaml", repo)
    assert {r.option_set for r in study.runs} == {"defaults", "fused_ce_chunked"}


def test_the_option_set_travels_in_run_json(default_config, repo):
    study = load_study({**one_model(default_config), "embedded": SETS}, "my.yaml", repo)
    run = study.runs[0]
    assert Run.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    # a run.json written before option sets existed reads as a run of a single set
    old = {k: v for k, v in run.to_dict().items() if k != "option_set"}
    assert Run.from_dict(old).option_set == "" and Run.from_dict(old).identity != run.identity


def test_scaling_groups_keep_option_sets_apart(default_config, repo):
    study = load_study({**one_model(default_config), "embedded": SETS}, "my.yaml", repo)
    groups = study.scaling_groups("tiny_llama")
    assert list(groups) == ["eager, weak", "ckpt, weak"]
    for label, runs in groups.items():
        assert [r.gpus for r in runs] == [1, 2]
        assert {r.option_set for r in runs} == {label.split(", ")[0]}


def test_several_engines_each_with_their_sets(default_config, repo):
    """An engine whose section is a mapping keeps its plain names beside one that lists sets."""
    cfg = {**one_model(default_config), "engine": ["embedded", "nemo"], "container": "none", "device": "cuda",
           "precision": "bf16", "models": ["tiny_llama_files"], "embedded": SETS,
           "nemo": {"transformer_impl": "local"}}
    study = load_study(cfg, "my.yaml", repo)
    assert {r.name for r in study.runs if r.engine == "nemo" and r.gpus == 1} == {"nemo_gpus1_mbs4_gbs8_seq128_bf16"}
    assert {r.name for r in study.runs if r.engine == "embedded" and r.gpus == 1} == {
        "embedded_gpus1_mbs4_gbs8_seq128_bf16_eager", "embedded_gpus1_mbs4_gbs8_seq128_bf16_ckpt"}
    assert list(study.scaling_groups("tiny_llama_files")) == ["embedded, eager, weak", "embedded, ckpt, weak",
                                                              "nemo, weak"]


@pytest.mark.parametrize("section, extra, expected", [
    ([], {}, r"my.yaml: key 'embedded' = \[\]: the embedded engine's options are a mapping of option: value, or a "
             r"non-empty list"),
    ([{"name": "a"}, "compile"], {}, r"my.yaml: key 'embedded\[1\]' = \"compile\": an option set is a mapping"),
    ([{"name": "a-b"}], {}, r"my.yaml: key 'embedded\[0\].name' = \"a-b\": an option set's name is letters, digits"),
    ([{"name": 3}], {}, r"my.yaml: key 'embedded\[0\].name' = 3: an option set's name"),
    ([{"name": "a"}, {"name": "a", "compile": False}], {},
     r"my.yaml: key 'embedded\[1\].name' = \"a\": embedded\[0\] has this name already"),
    ([{}, {}], {}, r"my.yaml: key 'embedded\[1\].name' = \"defaults\": embedded\[0\] has this name already"),
    (SETS, {"option_sets": ["eager", "fast"]},
     r"my.yaml: key 'option_sets\[1\]' = \"fast\": no option set of embedded has this name \(the names: "
     r"\['ckpt', 'eager'\]\)"),
    ({"compile": False}, {"option_sets": ["eager"]}, r"key 'option_sets\[0\]' = \"eager\": no option set of any engine"),
    ([{"name": "a", "attention": "fast"}, {"name": "b"}], {},
     r"my.yaml: run embedded_gpus1_mbs4_gbs8_seq128_a: embedded.attention = 'fast': must be one of"),
])
def test_bad_option_sets_name_file_key_and_value(default_config, repo, section, extra, expected):
    with pytest.raises(ConfigError, match=expected):
        load_study({**one_model(default_config), "embedded": section, **extra}, "my.yaml", repo)


def test_option_sets_selecting_none_of_an_engines_sets_is_an_error(default_config, repo):
    cfg = {**one_model(default_config), "engine": ["embedded", "nemo"], "container": "none", "device": "cuda",
           "precision": "bf16", "models": ["tiny_llama_files"], "embedded": SETS,
           "nemo": [{"name": "local", "transformer_impl": "local"}], "option_sets": ["eager"]}
    with pytest.raises(ConfigError, match=r"key 'option_sets' = \[\"eager\"\]: selects none of the nemo engine's "
                                          r"option sets \(\['local'\]\)"):
        load_study(cfg, "my.yaml", repo)


def test_options_read_once_per_study_must_agree(default_config, repo):
    """NeMo converts the checkpoint once per model, with one interpreter and layer spec: its sets must agree."""
    cfg = {**one_model(default_config), "engine": "nemo", "container": "none", "device": "cuda", "precision": "bf16",
           "models": ["tiny_llama_files"],
           "nemo": [{"name": "local", "transformer_impl": "local"}, {"name": "te"}]}
    with pytest.raises(ConfigError, match=r"my.yaml: key 'nemo\[1\].transformer_impl' = null: the nemo engine reads "
                                          r"transformer_impl once per study"):
        load_study(cfg, "my.yaml", repo)


def test_the_conversion_reads_the_sets_shared_options(default_config, repo):
    from ftscale.workflow import conversion_command

    cfg = {**one_model(default_config), "engine": "nemo", "container": "none", "device": "cuda", "precision": "bf16",
           "models": ["tiny_llama_files"], "nemo": [{"name": "a", "transformer_impl": "local", "python": "/x/py"},
                                                    {"name": "b", "transformer_impl": "local", "python": "/x/py"}]}
    study = load_study(cfg, "my.yaml", repo)
    assert {r.option_set for r in study.runs} == {"a", "b"}
    command = conversion_command(study, "nemo_checkpoint")
    assert "/x/py -m ftscale.cli import-nemo" in command and "--transformer-impl local" in command
