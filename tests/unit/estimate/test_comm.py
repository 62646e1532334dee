"""Hand-computed checks of ftscale.estimate.comm on small architectures (numbers checkable by hand)."""

import dataclasses

import pytest

from ftscale.estimate.comm import (
    CommBytes,
    Layout,
    allgather_bytes,
    allreduce_bytes,
    alltoall_bytes,
    comm_bytes_per_step,
    params_per_gpu,
    reducescatter_bytes,
    trainable_params_per_gpu,
)
from ftscale.estimate.flops import param_counts

# h 8, I 16, 2 layers, 2 heads of 4, 2 kv heads, vocab 32, untied.
# Per layer: attention 4·8·8 = 256, mlp 3·8·16 = 384, norms 16 -> 656; total 2·656 + 2·256 + 8 = 1832.
DENSE = {
    "type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32,
}
# The same with 4 experts of 384, top-2, router 8·4 = 32.
# Per layer: 256 + 4·384 + 32 + 16 = 1840; total 2·1840 + 2·256 + 8 = 4200.
MOE = {**DENSE, "type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}

COMMON = dict(micro_batch=2, seq_length=4, grad_accum=3, act_bytes=2, grad_bytes=4)


def zero_except(c: CommBytes, **nonzero: float) -> None:
    for name in ("tp_allreduce", "tp_allgather", "tp_reducescatter", "ep_alltoall", "dp_allreduce"):
        assert getattr(c, name) == pytest.approx(nonzero.get(name, 0.0)), name
    assert c.total == pytest.approx(sum(nonzero.values()))


def test_collectives():
    assert allreduce_bytes(100, 4) == 150
    assert allgather_bytes(100, 4) == reducescatter_bytes(100, 4) == alltoall_bytes(100, 4) == 75
    assert allreduce_bytes(100, 1) == 0


def test_param_totals_match_flops_module():
    assert param_counts(DENSE).total == 1832 == params_per_gpu(DENSE, 1, 1)
    assert param_counts(MOE).total == 4200 == params_per_gpu(MOE, 1, 1)


def test_params_per_gpu_sharded():
    # tp=2: per layer 256/2 + 384/2 + 16 = 336; embedding and lm_head 16·8 each; final norm 8
    assert params_per_gpu(DENSE, 2, 1) == 2 * 336 + 2 * 128 + 8 == 936
    # ep=2: non-expert 2·(256 + 32 + 16) + 2·256 + 8 = 1128; experts 2 layers · 2 experts · 384
    assert trainable_params_per_gpu(MOE, 1, 2) == (1128, 1536)
    # tp=2, ep=2: non-expert 2·(128 + 32 + 16) + 2·128 + 8 = 616; experts 2 · 2 · 384/2
    assert trainable_params_per_gpu(MOE, 2, 2) == (616, 768)
    # vocab 33 with tp=2 pads to 34: 17·8 per shard
    assert params_per_gpu({**DENSE, "vocab_size": 33}, 2, 1) == 936 + 2 * 8


def test_single_gpu_is_zero():
    zero_except(comm_bytes_per_step(DENSE, Layout(1, 1, 1), **COMMON))
    zero_except(comm_bytes_per_step(MOE, {"tp": 1}, **COMMON))


def test_dp_only():
    # one all-reduce of 1832 fp32 grads over 4 ranks: 2·3/4·1832·4 bytes, independent of grad_accum
    zero_except(comm_bytes_per_step(DENSE, Layout(dp=4), **COMMON), dp_allreduce=10_992)


def test_dp_only_lora():
    # r=2 on q, v: q 2·(8+8), v 2·(8+8) per layer -> 128 params; 2·1/2·128·4
    lora = {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}
    zero_except(comm_bytes_per_step(DENSE, Layout(dp=2), lora=lora, **COMMON), dp_allreduce=512)
    # tp=2: A replicated (2·8), B sharded (2·8/2) -> 24 per target, 2 targets, 2 layers = 96
    assert trainable_params_per_gpu(DENSE, 2, 1, lora) == (96, 0)
    # row-parallel o_proj: A sharded (2·8/2), B replicated (2·8) -> 24 per layer
    assert trainable_params_per_gpu(DENSE, 2, 1, {"rank": 2, "targets": ["o_proj"]}) == (48, 0)


def test_tp_with_and_without_sp():
    # activation b·s·h·a = 2·4·8·2 = 128 bytes; 2 layers · 3 micro-batches
    # no SP: 4 all-reduces · 2·(1/2)·128 = 512 per layer and micro-batch -> 3072
    no_sp = comm_bytes_per_step(DENSE, Layout(tp=2), **COMMON)
    zero_except(no_sp, tp_allreduce=3072)
    # SP: 4 all-gathers + 4 reduce-scatters · (1/2)·128 = 256 each per layer and micro-batch -> 1536 each
    sp = comm_bytes_per_step(DENSE, Layout(tp=2, sp=True), **COMMON)
    zero_except(sp, tp_allgather=1536, tp_reducescatter=1536)
    assert sp.total == no_sp.total


def test_tp_and_dp():
    # TP as above plus the all-reduce of the 936 params a tp=2 rank holds over dp=2: 2·1/2·936·4
    zero_except(comm_bytes_per_step(DENSE, Layout(tp=2, dp=2), **COMMON), tp_allreduce=3072, dp_allreduce=3744)


def test_ep_mixtral():
    # b=1, s=4, k=2, h=8, a=2: routed tokens 1·4·2·8·2 = 128 bytes per direction
    # 4 all-to-alls · (1/2)·128 = 256 per layer and micro-batch; 2 layers · 2 micro-batches = 1024
    # DP: non-expert 1128 over ep·dp = 4 ranks: 2·3/4·1128·4 = 6768; experts 1536 over dp=2: 2·1/2·1536·4 = 6144
    c = comm_bytes_per_step(MOE, Layout(ep=2, dp=2), micro_batch=1, seq_length=4, grad_accum=2,
                            act_bytes=2, grad_bytes=4)
    zero_except(c, ep_alltoall=1024, dp_allreduce=6768 + 6144)
    assert c.total == 13_936


def test_ep_with_tp_sp():
    # tp=2, ep=2, sp, dp=1, b=1, s=4, 1 micro-batch: SP leaves 4/2 = 2 tokens per rank:
    # all-to-all buffer 2·2·8·2 = 64 bytes: 4 · 1/2 · 64 · 2 layers = 256
    # TP: b·s·h·a = 64: 4 · 1/2 · 64 · 2 layers = 256 each for all-gather and reduce-scatter
    # DP: non-expert (616) still all-reduced over ep·dp = 2 ranks: 2·1/2·616·4 = 2464; experts over dp=1: 0
    c = comm_bytes_per_step(MOE, {"tp": 2, "ep": 2, "sp": True}, micro_batch=1, seq_length=4, grad_accum=1,
                            act_bytes=2, grad_bytes=4)
    zero_except(c, tp_allgather=256, tp_reducescatter=256, ep_alltoall=256, dp_allreduce=2464)


def test_total_in_asdict():
    c = comm_bytes_per_step(DENSE, Layout(tp=2, dp=2), **COMMON)
    assert dataclasses.asdict(c)["total"] == c.total == 3072 + 3744


def test_invalid_layouts():
    with pytest.raises(ValueError):
        comm_bytes_per_step(DENSE, Layout(ep=2), **COMMON)  # ep on a dense model
    with pytest.raises(ValueError):
        comm_bytes_per_step(MOE, Layout(ep=3), **COMMON)  # 4 experts over 3 ranks
    with pytest.raises(ValueError):
        comm_bytes_per_step(DENSE, Layout(tp=4), **COMMON)  # 2 heads over 4 ranks
    with pytest.raises(ValueError):
        comm_bytes_per_step(DENSE, Layout(tp=0), **COMMON)


def test_pipeline_stage_params_and_its_point_to_point_bytes():
    # a layer: attention 256 + MLP 384 + 2 norms 16 = 656; embedding and LM head 256 each; final norm 8
    assert trainable_params_per_gpu(DENSE, 1, 1, pp=2, stage="first") == (656 + 256, 0)
    assert trainable_params_per_gpu(DENSE, 1, 1, pp=2, stage="last") == (656 + 256 + 8, 0)
    with pytest.raises(ValueError, match="pp = 3 must divide the decoder layers"):
        trainable_params_per_gpu(DENSE, 1, 1, pp=3)
    c = comm_bytes_per_step(DENSE, Layout(dp=2, pp=2), **COMMON)
    # dp: the first stage's gradients 2·(1/2)·912·4; pp: 3 micro-batches x (activations forward + gradients
    # backward) of b·s·h·a = 2·4·8·2 = 128 bytes
    zero_except(c, dp_allreduce=3648, pp_p2p=768)
    assert c.pp_p2p == 768
    # tp's collectives run over the stage's L/pp layers
    assert (comm_bytes_per_step(DENSE, Layout(tp=2, pp=2), **COMMON).tp_allreduce
            == comm_bytes_per_step(DENSE, Layout(tp=2), **COMMON).tp_allreduce / 2)
