"""Analytic bytes communicated per optimizer step per GPU for a tp × pp × ep × dp training layout.

Ring-algorithm convention, bytes sent (= received) per rank for a collective over a buffer of S
bytes on n ranks::

    all-reduce        2·(n−1)/n·S
    all-gather        (n−1)/n·S      (S = the gathered, full buffer)
    reduce-scatter    (n−1)/n·S      (S = the full, unreduced buffer)
    all-to-all        (n−1)/n·S      (S = the buffer this rank holds)

Layout (Megatron-style): world = tp·pp·ep·dp GPUs. Tensor parallelism (tp) shards attention, MLP,
experts (expert-TP = tp), embedding and lm_head (vocab-parallel, vocab padded up to a multiple of
tp); norms and the router are replicated across tp. Expert parallelism (ep) gives each rank E/ep
whole experts. Every one of the ep·dp replicas of the non-expert part sees different data, so
non-expert gradients are all-reduced over ep·dp ranks and expert gradients over dp ranks.
``micro_batch`` is sequences per micro-batch per GPU; ``grad_accum`` micro-batches make a step.

Per step per GPU, with b micro_batch, s seq_length, h hidden, L layers (per pipeline stage: L/pp, and
N the parameters of the first stage), k experts per token, a activation bytes, g gradient bytes,
m grad_accum::

    TP, no SP:  per layer and micro-batch 2 all-reduces forward + 2 backward of b·s·h·a bytes
                tp_allreduce     = m·L·4·2·(tp−1)/tp·b·s·h·a
    TP, SP:     each all-reduce becomes an all-gather + reduce-scatter pair (same bytes)
                tp_allgather     = m·L·4·(tp−1)/tp·b·s·h·a
                tp_reducescatter = m·L·4·(tp−1)/tp·b·s·h·a
    EP (MoE):   dispatch + combine all-to-all forward, and both again backward, of the routed
                tokens this rank holds, t = b·s/tp with SP, else b·s (each TP rank holds all tokens)
                ep_alltoall      = m·L·4·(ep−1)/ep·t·k·h·a
    DP:         one all-reduce per step of the gradients of the trainable parameters this rank
                holds (full fine-tuning: all its parameters; LoRA: its adapter parameters only)
                dp_allreduce     = 2·(ep·dp−1)/(ep·dp)·N_nonexpert·g + 2·(dp−1)/dp·N_expert·g
    PP:         an inner stage sends each micro-batch's activations forward and their gradient
                backward (point-to-point; under SP the tp-shard: b·s/tp tokens)
                pp_p2p           = m·2·b·s·h·a/S   (pp > 1; S = tp with SP, else 1)

LoRA under TP (NeMo's convention): for column-parallel targets (q, k, v, gate, up) A is
replicated and B sharded; for row-parallel targets (o, down) A is sharded and B replicated.

Not counted (small next to the above): the vocab-parallel embedding / lm_head / loss collectives,
the TP all-reduce of replicated norm (and LoRA) gradients under SP, the tiny LoRA-rank activation
reductions, the embedding's gradient all-reduce between the first and last stage of a tied model and the
router's auxiliary-loss reductions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ftscale.estimate.flops import MLP_MODULES, arch_dims, lora_spec
from ftscale.study.layout import Layout

COLUMN_PARALLEL: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL: tuple[str, ...] = ("o_proj", "down_proj")


# --------------------------------------------------------------------------- collectives


def allreduce_bytes(size: float, n: int) -> float:
    """Ring all-reduce of ``size`` bytes over ``n`` ranks: 2·(n−1)/n·size per rank."""
    return 2 * (n - 1) / n * size


def allgather_bytes(size: float, n: int) -> float:
    """Ring all-gather of a ``size``-byte (full) buffer over ``n`` ranks: (n−1)/n·size per rank."""
    return (n - 1) / n * size


def reducescatter_bytes(size: float, n: int) -> float:
    """Ring reduce-scatter of a ``size``-byte (full) buffer over ``n`` ranks: (n−1)/n·size per rank."""
    return (n - 1) / n * size


def alltoall_bytes(size: float, n: int) -> float:
    """All-to-all of the ``size`` bytes a rank holds over ``n`` ranks: (n−1)/n·size per rank."""
    return (n - 1) / n * size


# --------------------------------------------------------------------------- parameters per GPU


def _divisibility(arch: Mapping[str, Any]) -> dict:
    """The architecture without its vocabulary: the formulas pad the vocabulary up to a multiple of tp."""
    return {k: v for k, v in arch.items() if k != "vocab_size"}


#: The pipeline stages whose memory differs most: the first holds the embedding and the most micro-batches in
#: flight, the last the final norm, the LM head and the logits (an inner stage holds less than the first).
STAGES = ("first", "last")


def trainable_params_per_gpu(
    arch: Mapping[str, Any], tp: int, ep: int, lora: Mapping[str, Any] | None = None, *, pp: int = 1,
    stage: str = "first",
) -> tuple[int, int]:
    """(non-expert, expert) trainable parameters held by one GPU.

    Full fine-tuning: per layer attention/tp + norms + router, plus ⌈V/tp⌉·h for the embedding and
    again for an untied lm_head, plus the final norm; experts: L·(E/ep)·3·h·I/tp (a dense MLP,
    L·3·h·I/tp, counts as non-expert). LoRA: only the adapters, sharded as in the module docstring.
    With ``pp`` > 1, one GPU of pipeline ``stage`` ("first" or "last"): L/pp layers, the embedding on the
    first stage, the final norm and the lm_head on the last (a tied lm_head: Megatron's copy of the
    embedding there).
    """
    a = arch_dims(arch)
    Layout(tp=tp, ep=ep, pp=pp).check(_divisibility(arch))
    if stage not in STAGES:
        raise ValueError(f"stage = {stage!r}: must be one of {list(STAGES)}")
    first, last = pp == 1 or stage == "first", pp == 1 or stage == "last"
    layers = a.layers // pp
    shapes = a.linear_shapes()
    spec = lora_spec(lora)
    if spec is None:
        attention = sum(din * dout for m, (din, dout) in shapes.items() if m not in MLP_MODULES) // tp
        mlp = sum(din * dout for m, (din, dout) in shapes.items() if m in MLP_MODULES) // tp
        router = a.hidden * a.experts if a.is_moe else 0
        vocab_shard = -(-a.vocab // tp) * a.hidden
        head = vocab_shard if last and (pp > 1 or not a.tied) else 0
        non_expert = (layers * (attention + 2 * a.hidden + router) + (vocab_shard if first else 0) + head
                      + (a.hidden if last else 0))
    else:
        attention = mlp = 0
        for m in spec.targets:
            din, dout = shapes[m]
            held = spec.rank * (din + dout // tp) if m in COLUMN_PARALLEL else spec.rank * (din // tp + dout)
            if m in MLP_MODULES:
                mlp += held
            else:
                attention += held
        non_expert = layers * attention
    if a.is_moe:
        return non_expert, layers * (a.experts // ep) * mlp
    return non_expert + layers * mlp, 0


def params_per_gpu(arch: Mapping[str, Any], tp: int, ep: int) -> int:
    """All parameters (weights) held by one GPU under tp × ep (see ``trainable_params_per_gpu``)."""
    return sum(trainable_params_per_gpu(arch, tp, ep))


# --------------------------------------------------------------------------- bytes per step


@dataclass(frozen=True)
class CommBytes:
    """Bytes sent per GPU per optimizer step, by collective; ``total`` is their sum."""

    tp_allreduce: float
    tp_allgather: float
    tp_reducescatter: float
    ep_alltoall: float
    dp_allreduce: float
    pp_p2p: float = 0.0
    total: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.tp_allreduce + self.tp_allgather + self.tp_reducescatter
                           + self.ep_alltoall + self.dp_allreduce + self.pp_p2p)


def comm_bytes_per_step(
    arch: Mapping[str, Any],
    layout: Layout | Mapping[str, Any],
    *,
    micro_batch: int,
    seq_length: int,
    grad_accum: int,
    act_bytes: int,
    grad_bytes: int,
    lora: Mapping[str, Any] | None = None,
) -> CommBytes:
    """Bytes communicated per optimizer step per GPU (formulas in the module docstring).

    ``micro_batch``: sequences per micro-batch per GPU; ``grad_accum``: micro-batches per step;
    ``act_bytes`` / ``grad_bytes``: bytes per activation / gradient element (2 for bf16, 4 for fp32);
    ``lora``: ``None`` for full fine-tuning, else only adapter gradients are all-reduced.
    """
    lay = Layout.coerce(layout)
    a = arch_dims(arch)
    lay.check(_divisibility(arch))
    if min(micro_batch, seq_length, grad_accum) < 1:
        raise ValueError("micro_batch, seq_length and grad_accum must be >= 1")
    steps = grad_accum * a.layers // lay.pp  # (micro-batch, layer) pairs per optimizer step on one stage
    activation = micro_batch * seq_length * a.hidden * act_bytes  # b·s·h·a
    tp_ar = tp_ag = tp_rs = 0.0
    if lay.sp:
        tp_ag = steps * 4 * allgather_bytes(activation, lay.tp)
        tp_rs = steps * 4 * reducescatter_bytes(activation, lay.tp)
    else:
        tp_ar = steps * 4 * allreduce_bytes(activation, lay.tp)
    ep_a2a = 0.0
    if a.is_moe:
        tokens = micro_batch * seq_length / (lay.tp if lay.sp else 1)
        ep_a2a = steps * 4 * alltoall_bytes(tokens * a.top_k * a.hidden * act_bytes, lay.ep)
    non_expert, expert = trainable_params_per_gpu(arch, lay.tp, lay.ep, lora, pp=lay.pp)
    dp_ar = (allreduce_bytes(non_expert * grad_bytes, lay.ep * lay.dp)
             + allreduce_bytes(expert * grad_bytes, lay.dp))
    pp_p2p = grad_accum * 2 * activation / (lay.tp if lay.sp else 1) if lay.pp > 1 else 0.0
    return CommBytes(tp_allreduce=tp_ar, tp_allgather=tp_ag, tp_reducescatter=tp_rs,
                     ep_alltoall=ep_a2a, dp_allreduce=dp_ar, pp_p2p=pp_p2p)
