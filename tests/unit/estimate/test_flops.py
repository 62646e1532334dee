"""Hand-computed checks of ftscale.estimate.flops (parameter counts, FLOPs per token, MFU, peak lookup)."""

import dataclasses

import pytest
from paths import architecture

from ftscale.estimate.flops import (
    PEAK_TFLOPS,
    lora_param_count,
    mfu,
    param_counts,
    peak_tflops_for,
    training_flops_per_token,
)

LLAMA_8B = architecture("llama31_8b")
MIXTRAL_8X7B = architecture("mixtral_8x7b")
TINY = architecture("tiny_llama")
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- parameters


def test_llama_8b_params_exact():
    p = param_counts(LLAMA_8B)
    # q, o: 4096·4096; k, v: 4096·(8·128)
    assert p.attention_per_layer == 2 * 4096 * 4096 + 2 * 4096 * 1024 == 41_943_040
    assert p.mlp_per_layer == 3 * 4096 * 14336 == 176_160_768
    assert p.embedding == p.lm_head == 128256 * 4096 == 525_336_576
    assert p.router_per_layer == 0
    assert p.total == 32 * (41_943_040 + 176_160_768 + 2 * 4096) + 2 * 525_336_576 + 4096
    assert p.total == 8_030_261_248
    assert p.active == p.total


def test_mixtral_8x7b_params_exact():
    p = param_counts(MIXTRAL_8X7B)
    assert p.expert == 176_160_768
    assert p.mlp_per_layer == 8 * 176_160_768
    assert p.router_per_layer == 4096 * 8
    assert p.total == 32 * (41_943_040 + 8 * 176_160_768 + 32_768 + 8192) + 2 * 32000 * 4096 + 4096
    assert p.total == 46_702_792_704
    assert p.active == 32 * (41_943_040 + 2 * 176_160_768 + 32_768 + 8192) + 2 * 32000 * 4096 + 4096
    assert p.active == 12_879_925_248
    assert p.active == pytest.approx(12.9e9, rel=0.01)


def test_tiny_params_and_tied():
    p = param_counts(TINY)
    # head_dim 16: q, o 128·128; k, v 128·64; mlp 3·128·256; norms 2·128
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 256
    assert per_layer == 147_712
    assert p.total == 2 * per_layer + 2 * 1024 * 128 + 128 == 557_696
    tied = param_counts({**TINY, "tie_word_embeddings": True})
    assert tied.lm_head == 0
    assert tied.total == 557_696 - 1024 * 128


def test_head_dim_override():
    p = param_counts({**TINY, "head_dim": 32})  # q, o: 128·256; k, v: 128·128
    assert p.attention_per_layer == 2 * 128 * 256 + 2 * 128 * 128


def test_bad_arch_rejected():
    with pytest.raises(ValueError):
        param_counts({**TINY, "type": "gpt2"})
    with pytest.raises(KeyError):
        param_counts({k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"})


def test_lora_param_count():
    # PEFT reports 41,943,040 trainable params for LLaMA-3-8B, r=16, all linear layers
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert lora_param_count(LLAMA_8B, {"rank": 16, "alpha": 32, "targets": ALL_TARGETS}) == 32 * per_layer
    assert 32 * per_layer == 41_943_040
    # tiny, r=8 on q, v: q 8·(128+128), v 8·(128+64)
    assert lora_param_count(TINY, {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}) == 2 * 8 * (256 + 192)
    # MoE MLP target: one adapter per expert
    assert lora_param_count(MIXTRAL_8X7B, {"rank": 4, "alpha": 8, "targets": ["down_proj"]}) == (
        32 * 8 * 4 * (14336 + 4096)
    )
    assert lora_param_count(TINY, None) == 0
    with pytest.raises(ValueError):
        lora_param_count(TINY, {"rank": 8, "alpha": 16, "targets": ["w1"]})


# --------------------------------------------------------------------------- FLOPs


def test_llama_8b_full_ft_flops():
    s = 4096
    f = training_flops_per_token(LLAMA_8B, s)
    # forward by hand: projections + full-square attention matmuls per layer, then lm_head
    attn_proj = 2 * (4096 * 4096 + 4096 * 1024 + 4096 * 1024 + 4096 * 4096)
    mlp = 2 * 3 * 4096 * 14336
    scores = 2 * s * 32 * 128 + 2 * s * 32 * 128  # QK^T and softmax·V
    forward = 32 * (attn_proj + mlp + scores) + 2 * 4096 * 128256
    assert f.forward == forward
    assert f.backward == 2 * forward
    assert f.total == 3 * forward
    # the same as PaLM's 6·N + 12·L·H·Q·T, N = non-embedding matmul params incl. lm_head
    n = 32 * (41_943_040 + 176_160_768) + 128256 * 4096
    assert f.total == 6 * n + 12 * 32 * 32 * 128 * s
    assert f.parts["lora"].total == 0
    assert sum(p.forward for p in f.parts.values()) == f.forward


def test_mixtral_full_ft_flops():
    s = 4096
    f = training_flops_per_token(MIXTRAL_8X7B, s)
    attn_proj = 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    experts = 2 * 2 * 3 * 4096 * 14336  # top-2 experts only
    router = 2 * 4096 * 8
    scores = 4 * s * 32 * 128
    forward = 32 * (attn_proj + experts + router + scores) + 2 * 4096 * 32000
    assert f.forward == forward
    assert f.total == 3 * forward
    assert f.parts["router"].forward == 32 * router


def test_causal_half():
    full = training_flops_per_token(TINY, 64)
    half = training_flops_per_token(TINY, 64, causal_half=True)
    assert full.parts["attention_scores"].forward == 2 * 4 * 64 * 8 * 16
    assert half.parts["attention_scores"].forward == 2 * 2 * 64 * 8 * 16
    assert full.total - half.total == 3 * 2 * 2 * 64 * 8 * 16


def test_lora_flops_tiny_by_hand():
    s, r = 32, 4
    f = training_flops_per_token(TINY, s, {"rank": r, "alpha": 8, "targets": ["q_proj", "down_proj"]})
    gemms = 2 * (2 * 128 * 128 + 2 * 128 * 64) + 2 * 3 * 128 * 256  # per layer
    scores = 4 * s * 8 * 16
    adapters = 2 * r * (128 + 128) + 2 * r * (256 + 128)
    lm_head = 2 * 128 * 1024
    forward = 2 * (gemms + scores + adapters) + lm_head
    backward = 2 * (gemms + 2 * scores + 2 * adapters) + lm_head
    assert f.forward == forward
    assert f.backward == backward
    assert f.parts["lora"].forward == 2 * adapters


def test_lora_between_two_thirds_and_full():
    for arch in (LLAMA_8B, MIXTRAL_8X7B, TINY):
        for targets in (["q_proj", "v_proj"], ALL_TARGETS):
            full = training_flops_per_token(arch, 4096).total
            lora = training_flops_per_token(arch, 4096, {"rank": 16, "alpha": 32, "targets": targets}).total
            assert 2 / 3 * full < lora < full


def test_flops_breakdown_serialisable():
    d = dataclasses.asdict(training_flops_per_token(TINY, 16))
    assert set(d["parts"]) == {"attention_proj", "attention_scores", "mlp", "router", "lm_head", "lora"}


# --------------------------------------------------------------------------- MFU


def test_mfu_fixture():
    # 3,000 tokens/s/GPU of LLaMA 8B at seq 4096 on an H100: 3000 · 51,470,401,536 / 989.4e12
    flops = training_flops_per_token(LLAMA_8B, 4096).total
    assert flops == 51_470_401_536
    peak = peak_tflops_for("NVIDIA H100 80GB HBM3")
    assert mfu(3000, flops, peak.flops) == pytest.approx(3000 * 51_470_401_536 / 989.4e12)
    assert mfu(3000, flops, peak.flops) == pytest.approx(0.15606, abs=1e-5)
    assert mfu(1000, 1e9, 1e12) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mfu(1000, 1e9, 0)


@pytest.mark.parametrize(
    "name, key, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM", 989.4),
        ("NVIDIA H200", "H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("cpu", "cpu", None),
        ("NVIDIA H100 PCIe", None, None),
        ("NVIDIA H100 NVL", None, None),
        ("NVIDIA GH200 480GB", None, None),
        ("NVIDIA L40", None, None),
        ("Tesla V100-SXM2-32GB", None, None),
        ("", None, None),
    ],
)
def test_peak_tflops_for(name, key, tflops):
    got = peak_tflops_for(name)
    assert (got.key, got.tflops) == (key, tflops)
    assert got.reason
    if tflops is None:
        assert got.flops is None
    else:
        assert got.flops == pytest.approx(tflops * 1e12)
        assert PEAK_TFLOPS[key] == tflops


def test_megatron_names_count_as_the_modules_they_fuse():
    """Every target an engine accepts is a valid planner input: NeMo's fused names are their HF groups."""
    hf = training_flops_per_token(LLAMA_8B, 4096, {"rank": 8, "alpha": 16, "targets": ALL_TARGETS}).total
    nemo = {"rank": 8, "alpha": 16, "targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    assert training_flops_per_token(LLAMA_8B, 4096, nemo).total == hf
    assert lora_param_count(LLAMA_8B, nemo) == lora_param_count(LLAMA_8B, {"rank": 8, "targets": ALL_TARGETS})


@pytest.mark.parametrize("engine", ["embedded", "nemo", "automodel"])
def test_the_planner_takes_every_target_the_check_accepts(repo, engine):
    """Whatever the study's check lets through, the analysis' FLOPs and the planner compute (no crash in the
    tables on a config value)."""
    from runs import make_run

    from ftscale.engines.base import LORA_MODULES, megatron_lora_names
    from ftscale.estimate.plan import predict
    from ftscale.study.check import lora_target_errors
    from ftscale.study.models import load_model

    for model in ("tiny_llama", "tiny_mixtral"):
        spec = load_model(model, repo).spec
        modules = LORA_MODULES[spec["architecture"]["type"]]
        names = list(modules) + (megatron_lora_names(modules) if engine != "embedded" else [])
        for target in names:
            run = make_run(model=model, engine=engine, lora={"rank": 8, "alpha": 16, "targets": [target]})
            if lora_target_errors(run, spec):
                continue  # a partial fused group for NeMo: refused before any job, with its reason
            assert training_flops_per_token(spec["architecture"], 32, run.lora).parts["lora"].total > 0
            assert predict(run, spec)["predicted_peak_mem_mib"] > 0
