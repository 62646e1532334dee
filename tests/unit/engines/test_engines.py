"""What each engine accepts (ftscale.study.check and each ftscale.engines.<name>.spec): the pure checks run
before any job, in the main suite. Model dicts are the real models/*.yaml; runs are ftscale.study.run.Run."""

from __future__ import annotations

import dataclasses

import pytest
from runs import make_run

from ftscale.engines import names
from ftscale.engines.base import HF_LINEAR, LORA_MODULES, hf_lora_targets
from ftscale.engines.nemo.spec import nemo_lora_targets
from ftscale.study.check import run_errors
from ftscale.study.models import load_model
from ftscale.study.run import Run

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def spec(repo, name: str) -> dict:
    return load_model(name, repo).spec


def layout_run(track: str, model: str, tp: int, ep: int, dp: int, *, sp: bool = False, global_batch: int,
               engine: str = "nemo", lora: dict | None = None, nodes: int = 1) -> Run:
    """A run of the GPU workshop's kind (bf16, sequence 2048) with this layout."""
    return make_run(track=track, model=model, engine=engine, gpus=tp * ep * dp, tp=tp, ep=ep, dp=dp, sp=sp,
                    global_batch=global_batch, seq_length=2048, steps=50, warmup_steps=5, learning_rate=1e-4,
                    seed=1234, precision="bf16", device="auto", lora=lora, nodes=nodes)


def good_mixtral_mp() -> Run:
    return layout_run("model_parallel", "mixtral_8x7b", 2, 4, 1, sp=True, global_batch=64)


@pytest.mark.parametrize("change, key, value, words", [
    ({"ep": 3, "gpus": 6, "tp": 2, "global_batch": 6},
     "layout", "'tp2_ep3_dp1_sp'", "ep = 3 must divide the number of experts (8)"),
    ({"gpus": 16}, "gpus", "16", "tp x pp x ep x dp = 2 x 1 x 4 x 1 = 8"),
    ({"pp": 3, "gpus": 24, "nodes": 3}, "layout", "'tp2_pp3_ep4_dp1_sp'",
     "pp = 3 must divide the decoder layers (num_hidden_layers = 32)"),
    ({"nodes": 3}, "gpus", "8", "nodes x gpus_per_node = 3 x 2"),
    ({"lora": LORA}, "lora", "{'rank': 8", "model_parallel track is full fine-tuning"),
    ({"sp": False}, "sp", "False", "sequence parallelism when tp (2) and ep (4)"),
    ({"global_batch": 6}, "global_batch", "6", "micro_batch x data-parallel size (ep x dp) = 1 x 4 = 4"),
    ({"precision": "fp8"}, "precision", "'fp8'", "bf16"),
    ({"warmup_steps": 50}, "warmup_steps", "50", "[0, steps = 50)"),
    ({"engine": "megatron"}, "engine", "'megatron'", "must be one of"),
])
def test_nemo_run_messages_name_the_run_key_and_value(repo, change, key, value, words):
    run = dataclasses.replace(good_mixtral_mp(), **change)
    msgs = run_errors(run, spec(repo, "mixtral_8x7b"))
    hits = [m for m in msgs if m.startswith(f"run {run.name}: {key} = {value}") and words in m]
    assert hits, msgs


def test_good_layouts_pass(repo):
    assert run_errors(good_mixtral_mp(), spec(repo, "mixtral_8x7b")) == []
    dense = layout_run("model_parallel", "llama31_8b", 8, 1, 1, sp=True, global_batch=16)
    assert run_errors(dense, spec(repo, "llama31_8b")) == []


def test_pipeline_parallelism_runs_on_nemo_and_is_refused_before_any_job_elsewhere(repo):
    piped = dataclasses.replace(good_mixtral_mp(), pp=2, gpus=16, nodes=2)
    assert run_errors(piped, spec(repo, "mixtral_8x7b")) == []
    assert "_tp2_pp2_ep4_dp1_sp_" in piped.name and piped.layout.world_size == 16
    assert "_pp" not in good_mixtral_mp().name  # pp = 1 keeps the names of before
    for other in ("embedded", "automodel"):
        msgs = run_errors(dataclasses.replace(piped, engine=other), spec(repo, "mixtral_8x7b"))
        assert any(f"pp = 2: the {other} engine has no pipeline parallelism" in m for m in msgs), msgs


def test_nemo_distributed_optimizer_is_an_engine_option(repo):
    run = good_mixtral_mp()
    assert run.options.distributed_optimizer is True  # NeMo's recipes' default
    off = dataclasses.replace(run, engine_options={"distributed_optimizer": False})
    assert run_errors(off, spec(repo, "mixtral_8x7b")) == []
    assert off.spec.planner_terms(off, 2).sharded_optimizer is False and run.spec.planner_terms(run, 2).sharded_optimizer
    assert off.spec.options_label(off) == "distributed_optimizer=false"
    bad = dataclasses.replace(run, engine_options={"distributed_optimizer": "yes"})
    assert any("nemo.distributed_optimizer = 'yes': must be one of [True, False]" in m
               for m in run_errors(bad, spec(repo, "mixtral_8x7b")))


def test_sp_needs_tp_and_ep_needs_experts(repo):
    run = layout_run("model_parallel", "mixtral_8x7b", 1, 8, 1, sp=True, global_batch=8)
    assert any("sp = true needs tp > 1" in m for m in run_errors(run, spec(repo, "mixtral_8x7b")))
    run = layout_run("model_parallel", "llama31_8b", 2, 2, 1, sp=True, global_batch=8)
    assert any("the model is dense" in m for m in run_errors(run, spec(repo, "llama31_8b")))


def test_tp_must_divide_kv_heads(repo):
    run = layout_run("model_parallel", "llama31_8b", 16, 1, 1, sp=True, global_batch=8, nodes=2)
    assert any("tp = 16 must divide the attention heads (32) and the key/value heads (8)" in m
               for m in run_errors(run, spec(repo, "llama31_8b")))


def test_nemo_needs_its_model_section_and_a_convertible_source(repo):
    run = layout_run("data_parallel", "llama31_8b", 1, 1, 2, global_batch=32, lora=LORA)
    no_nemo = {k: v for k, v in spec(repo, "llama31_8b").items() if k != "nemo"}
    assert any(m.startswith(f"run {run.name}: model.nemo = None") and "no 'nemo' section" in m
               for m in run_errors(run, no_nemo))
    for source, words in ((None, "no weights source"), ("", "no weights source"), ("s3://bucket/x", "only 'hf://'")):
        model = {**spec(repo, "llama31_8b"), "source": source}
        assert any(m.startswith(f"run {run.name}: model.source = {source!r}") and words in m
                   for m in run_errors(run, model)), source
    at_load = {**spec(repo, "llama31_8b_synthetic"), "nemo": spec(repo, "llama31_8b")["nemo"]}
    run = layout_run("data_parallel", "llama31_8b_synthetic", 1, 1, 1, global_batch=8, lora=LORA)
    assert any("synthetic_at_load" in m for m in run_errors(run, at_load))


def test_lora_targets_map_between_names(repo):
    partial = {**LORA, "targets": ["q_proj", "v_proj"]}
    run = layout_run("data_parallel", "llama31_8b", 1, 1, 2, global_batch=32, lora=partial)
    assert any(m.startswith("key 'tracks.data_parallel.lora.targets' = ['q_proj', 'v_proj']") and "linear_qkv" in m
               for m in run_errors(run, spec(repo, "llama31_8b")))
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert nemo_lora_targets(every) == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert nemo_lora_targets(["linear_qkv", "*.layers.0.*.linear_proj"]) == ["linear_qkv", "*.layers.0.*.linear_proj"]
    assert hf_lora_targets(["linear_qkv", "o_proj"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValueError, match=r"no module\(s\) \['qkv'\]"):
        hf_lora_targets(["qkv"])


MIXTRAL_MLP = {**LORA, "targets": ["gate_proj", "up_proj", "down_proj"]}


@pytest.mark.parametrize("engine", names())
@pytest.mark.parametrize(("model", "lora", "bad"), [
    ("llama31_8b", {**LORA, "targets": ["q_proj", "qkv_proj_nonexistent"]}, "['qkv_proj_nonexistent']"),
    ("mixtral_8x7b", MIXTRAL_MLP, "['gate_proj', 'up_proj', 'down_proj']"),
])
def test_a_lora_target_the_model_lacks_is_refused_before_any_job(repo, engine, model, lora, bad):
    """One check, every engine: the message names the key, the value and the model's valid names."""
    run = layout_run("data_parallel", model, 1, 1, 1, global_batch=8, engine=engine, lora=lora)
    (message,) = [m for m in run_errors(run, spec(repo, model)) if "lora.targets" in m]
    assert message.startswith(f"key 'tracks.data_parallel.lora.targets' = {lora['targets']!r} (engine {engine}, "
                              f"model {model}): ")
    assert f"has no module(s) {bad}" in message and "'q_proj', 'k_proj', 'v_proj', 'o_proj'" in message
    if model.startswith("mixtral"):
        assert "'gate_proj'" not in message.split("valid targets are")[1].split("]")[0]
        assert "MixtralExperts" in message


@pytest.mark.parametrize("engine", names())
def test_every_valid_target_is_accepted(repo, engine):
    attention = {**LORA, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    every = {**LORA, "targets": list(HF_LINEAR)}
    for model, lora in (("llama31_8b", every), ("mixtral_8x7b", attention)):
        run = layout_run("data_parallel", model, 1, 1, 1, global_batch=8, engine=engine, lora=lora)
        assert not [m for m in run_errors(run, spec(repo, model)) if "lora.targets" in m]


def test_nemo_names_follow_the_model(repo):
    mixtral = spec(repo, "mixtral_8x7b")["architecture"]
    assert nemo_lora_targets(["q_proj", "k_proj", "v_proj", "o_proj"], mixtral) == ["linear_qkv", "linear_proj"]
    with pytest.raises(ValueError, match=r"no module\(s\) \['linear_fc1'\].*\['q_proj', 'k_proj', 'v_proj', 'o_proj', "
                                         r"'linear_qkv', 'linear_proj'\]"):
        nemo_lora_targets(["linear_qkv", "linear_fc1"], mixtral)
    assert hf_lora_targets(["linear_qkv"], mixtral) == ["q_proj", "k_proj", "v_proj"]


def test_the_lists_are_transformers_own_linear_layers():
    """LORA_MODULES, per architecture, is exactly the nn.Linear names inside a decoder layer of transformers'
    model of that type (the installed version): Mixtral's experts and router hold no nn.Linear."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64)
    for kind, (config, cls) in {"llama": (LlamaConfig, LlamaForCausalLM),
                                "mixtral": (MixtralConfig, MixtralForCausalLM)}.items():
        with torch.device("meta"):
            model = cls(config(**small))
        layer = model.model.layers[0]
        linear = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linear == set(LORA_MODULES[kind]), kind


def test_the_embedded_engine_gives_peft_the_checked_names():
    """The job checks again, against the loaded model's own nn.Linear names, before peft."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from ftscale.engines.embedded.data_parallel import lora_target_modules

    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    ok = layout_run("data_parallel", "tiny_mixtral", 1, 1, 1, global_batch=8, engine="embedded", lora=LORA)
    assert lora_target_modules(model, ok) == LORA["targets"]
    bad = dataclasses.replace(ok, lora=MIXTRAL_MLP)
    with pytest.raises(ValueError, match="a mixtral model has no module"):
        lora_target_modules(model, bad)


def test_embedded_and_automodel_rules(repo):
    ep_dp = layout_run("data_parallel", "mixtral_8x7b", 1, 2, 1, global_batch=8, engine="embedded", lora=LORA)
    assert any("model_parallel track only" in m for m in run_errors(ep_dp, spec(repo, "mixtral_8x7b")))
    mp = layout_run("model_parallel", "llama31_8b", 2, 1, 1, sp=True, global_batch=8, engine="automodel")
    assert any("data_parallel track (LoRA) only" in m for m in run_errors(mp, spec(repo, "llama31_8b")))
