"""Predicted memory per GPU of one training run, part by part, from its configuration alone.

What is modelled is what the engines' code does (``ftscale.engines``), tensor by tensor; every
fitted number is a named constant below. Sizes are bytes; ``a`` is the bytes of the model's dtype
(2 for bf16, 4 for fp32), ``t`` = tp, ``S`` = tp when sequence parallelism is on (else 1),
h hidden, q = H·d (query width), kv = K·d, I intermediate, V vocab, E experts, k experts per token,
L layers, n = micro_batch × seq_length tokens of one micro-batch (each data-parallel replica has its
own). Parameter counts per GPU come from ``ftscale.estimate.comm`` (tp shards attention, MLP,
experts, embedding and lm_head; ep gives E/ep whole experts).

Model state (persistent from the first optimizer step on)::

    embedded engine (torch AdamW on the parameters' own dtype, no master copy):
      weights    = N_gpu·a + N_lora·l          (l = 4: peft keeps LoRA adapters in fp32, its
                                                autocast_adapter_dtype; l = a with lora_dtype: model)
      gradients  = N_train·g  (g = a full fine-tuning, l LoRA)
      optimizer  = 2·N_train·g                 (exp_avg and exp_avg_sq in the parameter's dtype)
      DDP buckets = N_train·g on the data-parallel track: DDP's flat gradient buckets, a second copy
                   of the gradients, allocated when the model is wrapped (counted in the peak; not in
                   the state, which is what a rank's measured ``state_mib`` sums: parameters, their
                   ``.grad`` and the optimizer's tensors)
    nemo (Megatron mixed precision; ``PlannerTerms.fp32_main_weights``):
      weights    = N_gpu·2 (+ N_lora·2) ; gradients = N_train·4 (fp32 grad buffer, whole on every rank)
      optimizer  = 12·N_train / DP_param       (fp32 main weights + 2 Adam moments; with the distributed
                                                optimizer, as in NeMo's recipes, sharded over the param's
                                                data-parallel ranks: ep·dp dense, dp experts; without it
                                                DP_param = 1): Megatron's 6 + 12/d bytes per parameter

Pipeline parallelism (pp > 1, Megatron's 1F1B without interleaving): a GPU of a stage holds L/pp layers'
parameters, the first stage also the embedding, the last the final norm and the LM head (N_gpu, N_train of
that stage: ``ftscale.estimate.comm.trainable_params_per_gpu``). The first stage starts min(pp, m)
micro-batches (m per step and data-parallel rank) before the first backward, so it holds their
activations of its L/pp layers; the last holds one micro-batch's, and the logits. Each is predicted; the
larger peak is the run's (an inner stage holds less than the first).

Activations saved for backward, per token of a micro-batch and per layer (embedded engine, eager
PyTorch, Hugging Face Llama/Mixtral + peft, SDPA flash attention: nothing of size s² is kept)::

    RMSNorm (×2)     (4h + a·h·[norm weight trains]) / S    fp32 copy of its input (+ normalised input)
    attention        a·h·[full]                   q/k/v input (under SP the all-gathered input is kept)
                     (2·a·q + 2·a·kv + 4·H) / t   RoPE'd q, k, v, SDPA output, fp32 logsumexp
                     (o_proj's input is the SDPA output itself: its transpose is already contiguous)
    LoRA inputs      per target, 4·d_in when the adapters (fp32) differ from the model dtype: peft
                     casts the input for each target separately (q, k and v make three copies);
                     else one a·d_in per distinct input (q/k/v share one, gate/up share one, o_proj's
                     is the SDPA output); plus lora_A's output, adapter bytes·r per target
    dense MLP        3·a·I/t (gate, up, SiLU out) + a·h·[full] (input) + a·I/t·[full] (down input)
    (checked tensor by tensor against autograd's saved tensors of a small model: tests/unit/estimate/test_memory.py)
    MoE MLP, Hugging Face experts (data-parallel track), per routed row (k per token):
                     3·a·I (gate_up kept whole by chunk, SiLU out) + a·h (down out, × fp32 router
                     weight) + (a·h + a·I)·[full]; router: a·h·[full] (input) + 4·E (fp32 softmax)
                     + MOE_ROUTING_BYTES_PER_CHOICE·k (indices and routing weights)
    MoE MLP, ExpertParallelMoE (model-parallel track, full fine-tuning), per token:
                     a·h/S (router input) + k·a·h (rows grouped by expert; SP all-gathers them)
                     + k·4·a·I/t (gate, up, SiLU out, down input) + k·4·h/S (fp32 combine) + 4·E/S

``[full]`` is 1 when the base weights train (full fine-tuning), 0 for LoRA (a frozen linear keeps no
input). Activation checkpointing (non-reentrant, per decoder layer) keeps a·h/S per layer and
recomputes one layer at a time: L·a·h/S + one layer. ``torch.compile`` keeps fewer intermediates
(fused norms, RoPE and SiLU): the per-layer figure is scaled by ``COMPILE_LAYER_ACTIVATION_FACTOR``.

Logits and loss (Hugging Face's ForCausalLMLoss upcasts the logits to fp32, then log-softmax): the
peak is at the start of backward with the fp32 log-probabilities, their gradient and the gradient
of the logits alive: ``12·V`` per token (the forward holds 2V + 4V + 4V = 10V for bf16). The TP plan
all-gathers the vocab-parallel logits, so TP does not divide them. With ``torch.compile`` the
cross-entropy is fused: ``COMPILE_LOGITS_BYTES_PER_VOCAB``·V. NeMo: vocab-parallel fused
cross-entropy, 6·V/t (bf16 logits shard + fp32 shard). With the embedded engine's ``fused_ce`` (chunked
or liger, data-parallel track) no full logits exist: the hidden states' gradient, computed in the
forward, is kept (a·h per token), and one chunk of tokens has fp32 logits/softmax and their gradient in
the model's dtype alive, (4 + a)·V per token of the chunk (``fused_ce_chunk_tokens``). Not yet checked
against a GPU run.

Peak per GPU = weights + gradients + optimizer + DDP buckets + L·n·layer (or the checkpointing
figure) + n·logits + ``ALLOCATOR_OVERHEAD_MIB``; on the model-parallel track the gradient sync
flattens the gradients of a bucket into one buffer at the end of backward (activations freed by
then), a second candidate: state + largest bucket·a + overhead. The prediction is the larger.

NeMo is modelled with the same per-tensor terms, with Megatron's differences: SP divides every term
by tp (inputs are re-gathered in backward), its norms are fused kernels (TE's, or torch's RMSNorm, which on
CUDA keeps its input and an fp32 rstd: a·h + 4), LoRA adapters are bf16, its DDP keeps no second gradient copy.
With ``transformer_impl: local`` (Megatron's local layer spec, no TE; ``local_spec``) attention is unfused: q,
and k and v repeated to every head (4·a·q/t with the context), each head's s x s probabilities in the model
dtype (a·H·s/t per token), RoPE's cos and sin made in every layer (4·a·d per position), a persistent scores
buffer (a·b·H·s²/t) and, in backward, two s x s gradients for a moment (a peak candidate beside the logits);
with bias_activation_fusion off its SwiGLU keeps the offset sum ``x_linear + glu_linear_offset`` (a·I/t more).

AutoModel (FSDP2 over the bf16 model) keeps adapters, their gradients and AdamW's moments in bf16, has no DDP
buckets, normalises with Liger's RMSNorm (a·h + 4), recomputes lora_A's output (its Triton LoRA) and runs the
MLP as one fused LoRA SwiGLU function that keeps its input, the gate and the up output (a·h + 2·a·I/t); its
loss is Hugging Face's on full logits (12·V).

docs/planner.md gives each term's check against the GPU examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ftscale.engines.base import PlannerTerms
from ftscale.estimate.comm import STAGES, trainable_params_per_gpu
from ftscale.estimate.flops import ATTENTION_MODULES, MLP_MODULES, ArchDims, LoraSpec, arch_dims, lora_spec
from ftscale.study.layout import Layout

MIB = 2**20

#: Allocated memory that no tensor above accounts for (cuBLAS workspace, RoPE tables, index tensors,
#: small buffers). Fitted: measured peak minus the modelled parts is 80-175 MiB for the eager GPU
#: examples (LLaMA 3.1 8B on H100, Mixtral 8x7B on H200); 128 is their middle.
ALLOCATOR_OVERHEAD_MIB = 128.0

#: torch.compile's saved activations per layer / the eager figure above. Fitted on the compiled runs of the
#: embedded engine's GPU examples (docs/planner.md; tests/unit/estimate/test_plan.py holds them to 5%).
COMPILE_LAYER_ACTIVATION_FACTOR = 0.742

#: The final norm run outside the compiled layers (``PlannerTerms.eager_final_norm``): Hugging Face's RMSNorm
#: keeps the fp32 upcast of its input, and its backward makes five more fp32 tensors of that size at the
#: start of backward (read in a CUDA memory snapshot of the 4-layer LLaMA example at its peak,
#: benchmarks/gpu/logs/2026-12-07-h100/memory-4l.txt): 6 x 4 bytes per token and hidden unit.
EAGER_FINAL_NORM_BYTES_PER_HIDDEN = 24

#: Bytes per token and vocabulary entry of the compiled (fused) logits + cross-entropy: bf16 logits
#: kept for backward and their bf16 gradient, 2 + 2. A structural assumption, checked by the
#: checkpointed compile runs (their per-token slope is mostly this term).
COMPILE_LOGITS_BYTES_PER_VOCAB = 4

#: Bytes per token and vocabulary entry at the peak of the eager loss (see the module docstring).
EAGER_LOGITS_BYTES_PER_VOCAB = 12

#: Hugging Face MoE routing kept per token and chosen expert: int64 top-k index (8), int64 row positions
#: of torch.where (16), fp32 routing weight, its slice and the renormalisation (12).
MOE_ROUTING_BYTES_PER_CHOICE = 36

#: What transformers' loop over experts (the embedded engine's ``experts: loop``) keeps beyond its grouped
#: matmul path, per token, chosen expert and intermediate unit, in model-dtype elements: fitted on the GPU
#: examples that run both (docs/planner.md).
LOOPED_EXPERTS_EXTRA_ELEMENTS = 2

@dataclass(frozen=True)
class MemorySetting:
    """What the memory of a run depends on (all resolved: no ``auto`` left); ``terms``: how its engine
    holds it (``EngineSpec.planner_terms``)."""

    arch: ArchDims
    arch_dict: Mapping[str, Any]
    lora: LoraSpec | None
    layout: Layout
    micro_batch: int
    seq_length: int
    dtype_bytes: int
    terms: PlannerTerms
    track: str = "data_parallel"
    #: Micro-batches per optimizer step on one data-parallel rank (None: as many as the pipeline holds).
    microbatches: int | None = None
    #: The pipeline stage predicted (``ftscale.estimate.comm.STAGES``); pp = 1: the one stage is both.
    stage: str = "first"

    @property
    def stage_layers(self) -> int:
        """Decoder layers one GPU holds: L/pp."""
        return self.arch.layers // self.layout.pp

    @property
    def in_flight(self) -> int:
        """Micro-batches whose activations the stage holds at once (1F1B: the first stage min(pp, m))."""
        pp = self.layout.pp
        if pp == 1 or self.stage != "first":
            return 1
        return min(pp, self.microbatches) if self.microbatches else pp

    @property
    def has_logits(self) -> bool:
        """The stage computes the logits and the loss (the last one)."""
        return self.layout.pp == 1 or self.stage == "last"

    @property
    def adapter_bytes(self) -> int:
        """Bytes per LoRA adapter parameter."""
        return self.terms.adapter_bytes

    @property
    def full(self) -> bool:
        """Base weights train (full fine-tuning)."""
        return self.lora is None

    def lora_dict(self) -> dict | None:
        if self.lora is None:
            return None
        return {"rank": self.lora.rank, "alpha": self.lora.alpha, "targets": list(self.lora.targets)}


#: The terms of a setting built without an engine's: the model's dtype throughout, fp32 adapters, eager.
DEFAULT_TERMS = PlannerTerms(adapter_bytes=4)


def memory_setting(arch: Mapping[str, Any], lora: Mapping[str, Any] | None, layout: Layout | Mapping[str, Any], *,
                   micro_batch: int, seq_length: int, dtype_bytes: int, track: str = "data_parallel",
                   terms: PlannerTerms = DEFAULT_TERMS, microbatches: int | None = None,
                   **changes: Any) -> MemorySetting:
    """The setting of a run; ``changes`` replace fields of ``terms`` (e.g. ``fused_ce="chunked"``)."""
    if "architecture" in arch:
        arch = arch["architecture"]
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bf16) or 4 (fp32), got {dtype_bytes}")
    if min(micro_batch, seq_length) < 1:
        raise ValueError(f"micro_batch and seq_length must be >= 1, got {micro_batch}, {seq_length}")
    return MemorySetting(arch=arch_dims(arch), arch_dict=dict(arch), lora=lora_spec(lora),
                         layout=Layout.coerce(layout), micro_batch=micro_batch, seq_length=seq_length,
                         dtype_bytes=dtype_bytes, terms=dataclasses.replace(terms, **changes), track=track,
                         microbatches=microbatches)


# --------------------------------------------------------------------------- model state


@dataclass(frozen=True)
class StateBytes:
    """Model state per GPU, bytes; ``ddp_buckets``: DDP's persistent copy of the gradients (data-parallel
    track); ``sync_buffer``: the gradient sync's flat copy at the end of backward (model-parallel track)."""

    weights: float
    gradients: float
    optimizer: float
    sync_buffer: float
    ddp_buckets: float = 0.0
    #: float8 copies of frozen weights (the embedded engine's ``fp8``): buffers, not parameters.
    fp8_copies: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def _params_per_gpu(s: MemorySetting) -> tuple[int, int]:
    """(non-expert, expert) base parameters held by one GPU (of the setting's pipeline stage)."""
    return trainable_params_per_gpu(s.arch_dict, s.layout.tp, s.layout.ep, None, pp=s.layout.pp, stage=s.stage)


def _linear_params_per_gpu(s: MemorySetting) -> int:
    """Parameters of the decoder layers' linear modules (attention, and the dense MLP; not the experts) one
    GPU holds."""
    shapes = s.arch.linear_shapes()
    names = ATTENTION_MODULES + (() if s.arch.is_moe else MLP_MODULES)
    return s.stage_layers * sum(shapes[n][0] * shapes[n][1] for n in names) // s.layout.tp


def state_bytes(s: MemorySetting) -> StateBytes:
    lay, a = s.layout, s.dtype_bytes
    dense, expert = _params_per_gpu(s)
    base = dense + expert
    if s.full:
        train_dense, train_expert = dense, expert
        adapters = 0
    else:
        train_dense, train_expert = trainable_params_per_gpu(s.arch_dict, lay.tp, lay.ep, s.lora_dict(), pp=lay.pp,
                                                             stage=s.stage)
        adapters = train_dense + train_expert
    trainable = train_dense + train_expert
    if s.terms.fp32_main_weights:
        weights = base * 2 + adapters * s.adapter_bytes
        grads = trainable * 4
        # Megatron's distributed optimizer shards main weights and moments over each parameter's data-parallel
        # ranks (the expert-data-parallel ones for experts); the grad buffer stays whole.
        dense_shards, expert_shards = (lay.data_parallel_size, lay.dp) if s.terms.sharded_optimizer else (1, 1)
        optimizer = 12 * (train_dense / dense_shards + train_expert / expert_shards)
        return StateBytes(weights, grads, optimizer, 0.0)
    g = a if s.full else s.adapter_bytes
    weights = base * a + adapters * s.adapter_bytes
    grads = trainable * g
    optimizer = 2 * trainable * g
    sync = 0.0
    if s.track == "model_parallel":
        buckets = [train_dense * g if lay.data_parallel_size > 1 else 0, train_expert * g if lay.dp > 1 else 0]
        sync = float(max(buckets))
    ddp = float(grads) if s.track == "data_parallel" and s.terms.gradient_buckets else 0.0
    return StateBytes(weights, grads, optimizer, sync, ddp, s.terms.fp8_copy_bytes * _linear_params_per_gpu(s))


# --------------------------------------------------------------------------- activations


def layer_activation_bytes(s: MemorySetting) -> dict[str, float]:
    """Bytes saved for backward per token of a micro-batch in one decoder layer, by part
    (norms, attention, lora, mlp); formulas in the module docstring."""
    d, a, t = s.arch, s.dtype_bytes, s.layout.tp
    S = t if s.layout.sp else 1
    h, q, kv, inter = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.intermediate
    full = 1 if s.full else 0
    # Megatron (NeMo) keeps the SP shard of a column-parallel input and re-gathers it in backward.
    gathered = S if s.terms.fp32_main_weights else 1
    if s.terms.norm_keeps == "input":  # a fused kernel: its input and an fp32 rstd
        norm = (a * h + 4) / S
    else:  # Hugging Face's RMSNorm: the fp32 upcast of its input (+ the normalised input if its weight trains)
        norm = (4 * h + a * h * full) / S
    if s.terms.unfused_attention:
        # Megatron's unfused attention: q, and k and v repeated to every head (GQA), kept by the two batched
        # matmuls; the context (linear_proj's input); each head's s x s probabilities (bf16 softmax), kept once
        # for the softmax's and the PV product's backward; RoPE's cos and sin, made in every layer for q and
        # k, kept by its multiplications ([s, 1, 1, d] each: per position, shared by the micro-batch).
        attention = (a * h * full / gathered + 4 * a * q / t + a * d.heads * s.seq_length / t
                     + 4 * a * d.head_dim / s.micro_batch)
    else:
        # The SDPA output, transposed back, is already contiguous: it is o_proj's input, no copy.
        attention = a * h * full / gathered + (2 * a * q + 2 * a * kv + 4 * d.heads) / t
    fused_mlp = (s.terms.fused_lora_mlp and not d.is_moe and s.lora is not None
                 and set(MLP_MODULES) <= set(s.lora.targets))
    lora = 0.0
    if s.lora is not None:
        adapter = s.adapter_bytes
        shapes = d.linear_shapes()
        routed = d.top_k if d.is_moe else 1
        # the fused LoRA MLP keeps its own input (counted with the MLP) and recomputes its LoRA activations
        targets = [m for m in s.lora.targets if not (fused_mlp and m in MLP_MODULES)]
        if adapter != a:  # one cast copy per target
            for m in targets:
                din = shapes[m][0] / (t if m in ("o_proj", "down_proj") else gathered)
                lora += adapter * din * (routed if m in MLP_MODULES else 1)
        else:  # the input itself, once per distinct input (o_proj's is the SDPA output, counted above)
            inputs = {"attn_in": h / gathered if {"q_proj", "k_proj", "v_proj"} & set(targets) else 0,
                      "mlp_in": routed * h / gathered if {"gate_proj", "up_proj"} & set(targets) else 0,
                      "down_in": routed * inter / t if "down_proj" in targets else 0}
            lora = a * sum(inputs.values())
        if s.terms.lora_keeps_rank_output:  # lora_A's output (rank r, adapter dtype), for lora_B's weight gradient
            lora += sum(adapter * s.lora.rank * (routed if m in MLP_MODULES else 1) for m in targets)
    if fused_mlp:  # its input, the gate and up outputs
        mlp = a * h / gathered + 2 * a * inter / t
    elif not d.is_moe:
        mlp = 3 * a * inter / t + a * h * full / gathered + a * inter * full / t
        if s.terms.unfused_glu:  # x_linear + glu_linear_offset, kept by the product
            mlp += a * inter / t
    elif s.terms.own_expert_layer:
        k = d.top_k
        mlp = a * h / S + k * a * h + k * 4 * a * inter / t + k * 4 * h / S + 4 * d.experts / S
    else:
        k = d.top_k
        mlp = (k * (3 * a * inter / t + a * h + (a * h + a * inter / t) * full) + a * h * full
               + 4 * d.experts + MOE_ROUTING_BYTES_PER_CHOICE * k)
        if s.terms.looped_experts:
            mlp += k * LOOPED_EXPERTS_EXTRA_ELEMENTS * a * inter / t
    return {"norms": 2 * norm, "attention": attention, "lora": lora, "mlp": mlp}


def activation_bytes(s: MemorySetting) -> float:
    """Saved activations of the stage's layers for the micro-batches it holds at once (one without
    pipeline parallelism), at their peak (start of backward)."""
    per_layer = sum(layer_activation_bytes(s).values())
    if s.terms.fused_kernels:
        per_layer *= COMPILE_LAYER_ACTIVATION_FACTOR
    tokens = s.micro_batch * s.seq_length
    final_norm = EAGER_FINAL_NORM_BYTES_PER_HIDDEN * s.arch.hidden if s.terms.eager_final_norm and s.has_logits else 0
    if s.terms.activation_checkpointing:
        S = s.layout.tp if s.layout.sp else 1
        return tokens * (s.in_flight * s.stage_layers * s.dtype_bytes * s.arch.hidden / S + per_layer + final_norm)
    return tokens * (s.in_flight * s.stage_layers * per_layer + final_norm)


def attention_workspace_bytes(s: MemorySetting) -> float:
    """Megatron's unfused attention computes the scores of a micro-batch, [b·H/t, s, s] in the model dtype,
    with a buffer it allocates once and keeps (``get_global_memory_buffer``); 0 for fused attention."""
    if not s.terms.unfused_attention:
        return 0.0
    return s.dtype_bytes * s.micro_batch * s.arch.heads * s.seq_length ** 2 / s.layout.tp


def attention_backward_bytes(s: MemorySetting) -> float:
    """What the backward of one unfused attention layer adds for a moment: the gradients of the
    probabilities and of the scores, each [b·H/t, s, s] (a candidate for the peak beside the logits)."""
    return 2 * attention_workspace_bytes(s)


def fused_ce_chunk_tokens(kind: str, tokens: int, vocab: int, hidden: int) -> int:
    """Tokens whose logits exist at once under ``fused_ce``: the engine's chunk (ftscale.engines.embedded.fused_ce,
    2**26 logits entries), or liger-kernel's (tokens / ceil(V / h), rounded up to a power of two)."""
    if kind == "liger":
        return 1 << (max(1, -(-tokens // -(-vocab // hidden))) - 1).bit_length()
    n = max(1, 2**26 // vocab)
    return 1 << (n.bit_length() - 1)


def logits_bytes(s: MemorySetting) -> float:
    """Logits and loss at their peak for one micro-batch (see the module docstring); 0 on a pipeline stage
    other than the last."""
    if not s.has_logits:
        return 0.0
    tokens = s.micro_batch * s.seq_length
    if s.terms.fp32_main_weights:
        return tokens * 6 * s.arch.vocab / s.layout.tp
    if s.terms.fused_ce != "off":
        chunk = min(tokens, fused_ce_chunk_tokens(s.terms.fused_ce, tokens, s.arch.vocab, s.arch.hidden))
        return tokens * s.dtype_bytes * s.arch.hidden + chunk * (4 + s.dtype_bytes) * s.arch.vocab
    per_vocab = COMPILE_LOGITS_BYTES_PER_VOCAB if s.terms.fused_kernels else EAGER_LOGITS_BYTES_PER_VOCAB
    return tokens * per_vocab * s.arch.vocab


# --------------------------------------------------------------------------- the whole


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted memory per GPU in MiB, part by part; ``peak`` is what CUDA's max allocated would show."""

    weights_mib: float
    gradients_mib: float
    optimizer_mib: float
    activations_mib: float
    logits_mib: float
    overhead_mib: float
    sync_buffer_mib: float
    ddp_buckets_mib: float = 0.0
    attention_backward_mib: float = 0.0
    fp8_copies_mib: float = 0.0
    #: The pipeline stage these figures are of ("" without pipeline parallelism).
    stage: str = ""

    @property
    def state_mib(self) -> float:
        """Parameters, gradients and optimizer state: what a rank's ``state_mib`` measures."""
        return self.weights_mib + self.gradients_mib + self.optimizer_mib

    @property
    def peak_mib(self) -> float:
        compute = self.activations_mib + max(self.logits_mib, self.attention_backward_mib)
        return (self.state_mib + self.fp8_copies_mib + self.ddp_buckets_mib + max(compute, self.sync_buffer_mib)
                + self.overhead_mib)


def predict_memory(s: MemorySetting) -> MemoryPrediction:
    """The prediction of one GPU; with pipeline parallelism, of the stage with the larger peak."""
    if s.layout.pp > 1:
        return max((_stage_memory(dataclasses.replace(s, stage=stage), stage) for stage in STAGES),
                   key=lambda p: p.peak_mib)
    return _stage_memory(s, "")


def _stage_memory(s: MemorySetting, stage: str) -> MemoryPrediction:
    state = state_bytes(s)
    return MemoryPrediction(
        weights_mib=state.weights / MIB, gradients_mib=state.gradients / MIB, optimizer_mib=state.optimizer / MIB,
        activations_mib=(activation_bytes(s) + attention_workspace_bytes(s)) / MIB, logits_mib=logits_bytes(s) / MIB,
        overhead_mib=ALLOCATOR_OVERHEAD_MIB, sync_buffer_mib=state.sync_buffer / MIB,
        ddp_buckets_mib=state.ddp_buckets / MIB, attention_backward_mib=attention_backward_bytes(s) / MIB,
        fp8_copies_mib=state.fp8_copies / MIB, stage=stage)
