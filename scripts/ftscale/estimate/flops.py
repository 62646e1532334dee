"""Parameter counts, training FLOPs per token and MFU for LLaMA (dense) and Mixtral (MoE) models.

Pure functions of the ``architecture`` dict of a ``models/<name>/model.yaml`` (keys ``type``,
``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``vocab_size``, optional ``head_dim``, ``tie_word_embeddings`` and, for
``mixtral``, ``num_local_experts`` / ``num_experts_per_tok``) and of a LoRA dict
``{rank, alpha, targets}`` (``None`` = full fine-tuning).

Notation: h hidden, I intermediate (per expert), L layers, H query heads, K key/value heads,
d head_dim (default h/H), V vocab, E experts, k experts per token, s sequence length, r LoRA rank.
A dense model is treated as E = k = 1 without a router.

Parameters (no biases, as in LLaMA/Mixtral; RMSNorm has one weight vector)::

    embedding            = V·h
    attention per layer  = h·H·d (q) + 2·h·K·d (k, v) + H·d·h (o)
    mlp per layer        = E·3·h·I          (SwiGLU gate, up, down; all experts)
    router per layer     = h·E              (MoE only)
    norms per layer      = 2·h              (+ one final norm of h)
    lm_head              = V·h              (0 when tie_word_embeddings)
    active (per token)   = total − L·(E − k)·3·h·I   (embedding and lm_head included)

LLaMA 3.1 8B gives 8,030,261,248; Mixtral 8x7B 46,702,792,704 total, 12,879,925,248 active.

Model FLOPs per token (the MFU convention of Megatron-LM and PaLM: only matrix multiplies, a
GEMM of (m×k)·(k×n) costs 2·m·k·n, so a weight matrix of P entries costs 2·P per token forward)::

    attention_proj = L · 2·(h·H·d + 2·h·K·d + H·d·h)
    attention_scores = L · 4·s·H·d        (QK^T: 2·s·H·d, softmax·V: 2·s·H·d)
    mlp            = L · k · 2·3·h·I       (only the k routed experts run)
    router         = L · 2·h·E             (MoE only)
    lm_head        = 2·h·V                 (counted even when tied; the embedding lookup is 0)

Norms, softmax, activations, RoPE, residual adds and the LoRA scaling are not counted.

Causal masking: by default the full s×s score matrix is counted (the ``4·s·H·d`` term above), as
Megatron-LM's formula 72·B·s·L·h²·(1 + s/6h + V/12hL) and PaLM's MFU 6·N + 12·L·H·Q·T do. It is the
convention in which published MFU numbers are quoted, so ours compare with them.
``causal_half=True`` counts half of it instead (what a causal FlashAttention kernel executes).

Backward:

* Full fine-tuning: every GEMM costs 2× its forward in backward (gradient w.r.t. the input and
  w.r.t. the weight), so total = 3 × forward = 6·N_matmul + 12·L·H·d·s per token (PaLM).
* LoRA: base weights are frozen, so a frozen GEMM (q/k/v/o, gate/up/down, router, lm_head) computes
  only its input gradient: backward = 1 × forward. The attention score/context matmuls have two
  activation operands, both needing gradients: backward = 2 × forward. Each adapter A (d_in×r) and
  B (r×d_out) is trained: forward 2·r·(d_in + d_out), backward 2 × that. For an MLP target of a MoE
  model every expert has its own adapter (E× parameters) but only k run per token (k× FLOPs).
  Simplification: the input gradient of layer 0's frozen GEMMs is counted although nothing below
  needs it (an overcount of < 1/L of the frozen-GEMM backward).

Activation recomputation (gradient checkpointing) is not counted: these are model FLOPs (MFU), not
hardware FLOPs (HFU).

MFU = tokens/s per GPU × FLOPs per token / peak FLOP/s per GPU, with the dense (no sparsity) bf16
tensor-core peak of ``PEAK_TFLOPS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ftscale.engines.base import HF_ATTENTION, HF_LINEAR, HF_MLP, hf_lora_targets

#: The linear layers of a decoder layer, in Hugging Face names (one list: ``ftscale.engines.base``); for a
#: mixture of experts the MLP ones are each expert's.
ATTENTION_MODULES: tuple[str, ...] = HF_ATTENTION
MLP_MODULES: tuple[str, ...] = HF_MLP
LORA_TARGETS: tuple[str, ...] = HF_LINEAR

# Dense bf16 tensor-core peak per GPU without structured sparsity, in TFLOP/s (vendor datasheets).
PEAK_TFLOPS: dict[str, float | None] = {
    "H100-SXM": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.05,
    "cpu": None,
}


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class ArchDims:
    """Dimensions read from an architecture dict (dense models have experts = top_k = 1)."""

    type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int
    top_k: int

    @property
    def is_moe(self) -> bool:
        return self.type == "mixtral"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear module of one layer (one expert for MLP modules)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }


def arch_dims(arch: Mapping[str, Any]) -> ArchDims:
    """Validate an architecture dict (or a whole model.yaml dict) and return its dimensions."""
    if "architecture" in arch:
        arch = arch["architecture"]
    kind = arch.get("type")
    if kind not in ("llama", "mixtral"):
        raise ValueError(f"architecture type must be 'llama' or 'mixtral', got {kind!r}")
    hidden, heads = int(arch["hidden_size"]), int(arch["num_attention_heads"])
    head_dim = arch.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    kv_heads = int(arch["num_key_value_heads"])
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    experts = top_k = 1
    if kind == "mixtral":
        experts, top_k = int(arch["num_local_experts"]), int(arch["num_experts_per_tok"])
        if not 1 <= top_k <= experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in 1..num_local_experts {experts}")
    return ArchDims(
        type=kind, hidden=hidden, intermediate=int(arch["intermediate_size"]),
        layers=int(arch["num_hidden_layers"]), heads=heads, kv_heads=kv_heads, head_dim=int(head_dim),
        vocab=int(arch["vocab_size"]), tied=bool(arch.get("tie_word_embeddings", False)),
        experts=experts, top_k=top_k,
    )


@dataclass(frozen=True)
class LoraSpec:
    """A validated LoRA setting (defaults as in config.schema.yaml)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]


def lora_spec(lora: Mapping[str, Any] | None) -> LoraSpec | None:
    """Validate a LoRA dict; ``None`` (full fine-tuning) stays ``None``. Targets may be any name an engine
    accepts: Hugging Face names, or Megatron's fused names (``linear_qkv`` ...), which count as the Hugging
    Face modules they fuse (``ftscale.engines.base.hf_lora_targets``). Whether the model has them is the
    study's check, before any job (``ftscale.study.check.lora_target_errors``)."""
    if lora is None:
        return None
    rank = int(lora.get("rank", 8))
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    given = list(lora.get("targets", ATTENTION_MODULES))
    if not given:
        raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got []")
    targets = tuple(hf_lora_targets(given))  # ValueError naming the valid names
    return LoraSpec(rank=rank, alpha=float(lora.get("alpha", 16)), targets=targets)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts; ``*_per_layer`` fields are for one transformer layer."""

    embedding: int
    attention_per_layer: int
    mlp_per_layer: int  # dense MLP, or all E experts of a MoE layer
    expert: int  # one expert (= mlp_per_layer for a dense model)
    router_per_layer: int
    norms_per_layer: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding
    num_layers: int
    total: int
    active: int  # used per token: top-k experts only (= total for a dense model)


def param_counts(arch: Mapping[str, Any]) -> ParamCounts:
    """Count the parameters of a LLaMA/Mixtral model (formulas in the module docstring)."""
    a = arch_dims(arch)
    shapes = a.linear_shapes()
    attention = sum(din * dout for m, (din, dout) in shapes.items() if m in ATTENTION_MODULES)
    expert = sum(din * dout for m, (din, dout) in shapes.items() if m in MLP_MODULES)
    router = a.hidden * a.experts if a.is_moe else 0
    norms = 2 * a.hidden
    embedding = a.vocab * a.hidden
    lm_head = 0 if a.tied else a.vocab * a.hidden
    outside = embedding + lm_head + a.hidden
    total = outside + a.layers * (attention + a.experts * expert + router + norms)
    active = outside + a.layers * (attention + a.top_k * expert + router + norms)
    return ParamCounts(
        embedding=embedding, attention_per_layer=attention, mlp_per_layer=a.experts * expert, expert=expert,
        router_per_layer=router, norms_per_layer=norms, final_norm=a.hidden, lm_head=lm_head,
        num_layers=a.layers, total=total, active=active,
    )


def lora_param_count(arch: Mapping[str, Any], lora: Mapping[str, Any] | None) -> int:
    """Trainable LoRA parameters: Σ_layers Σ_targets r·(d_in + d_out), × E for MoE MLP targets.

    Returns 0 for ``lora=None``.
    """
    spec = lora_spec(lora)
    if spec is None:
        return 0
    a = arch_dims(arch)
    shapes = a.linear_shapes()
    per_layer = sum(
        spec.rank * (shapes[m][0] + shapes[m][1]) * (a.experts if m in MLP_MODULES else 1) for m in spec.targets
    )
    return a.layers * per_layer


# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class PartFlops:
    """FLOPs per token of one part of the model, summed over layers."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs per token. ``parts`` keys: attention_proj, attention_scores, mlp, router,
    lm_head, lora (each a ``PartFlops``; zero parts are kept)."""

    forward: int
    backward: int
    total: int
    parts: dict[str, PartFlops]


def training_flops_per_token(
    arch: Mapping[str, Any],
    seq_length: int,
    lora: Mapping[str, Any] | None = None,
    *,
    causal_half: bool = False,
) -> FlopsBreakdown:
    """Model FLOPs per trained token for a sequence of ``seq_length`` tokens.

    Full fine-tuning (``lora=None``): backward = 2 × forward for every part. LoRA: frozen GEMMs
    backward = 1 × forward, attention scores 2 ×, adapters 2 × (module docstring for the formulas).
    ``causal_half`` counts half of the s×s attention matmuls (default: the full square).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    a = arch_dims(arch)
    spec = lora_spec(lora)
    shapes = a.linear_shapes()
    gemm = {m: 2 * din * dout for m, (din, dout) in shapes.items()}
    scores = 4 * seq_length * a.heads * a.head_dim
    forward = {
        "attention_proj": a.layers * sum(gemm[m] for m in ATTENTION_MODULES),
        "attention_scores": a.layers * (scores // 2 if causal_half else scores),
        "mlp": a.layers * a.top_k * sum(gemm[m] for m in MLP_MODULES),
        "router": a.layers * 2 * a.hidden * a.experts if a.is_moe else 0,
        "lm_head": 2 * a.hidden * a.vocab,
        "lora": 0,
    }
    if spec is None:
        parts = {name: PartFlops(f, 2 * f) for name, f in forward.items()}
    else:
        forward["lora"] = a.layers * sum(
            2 * spec.rank * (shapes[m][0] + shapes[m][1]) * (a.top_k if m in MLP_MODULES else 1)
            for m in spec.targets
        )
        trained = ("attention_scores", "lora")  # both operands need gradients
        parts = {name: PartFlops(f, (2 if name in trained else 1) * f) for name, f in forward.items()}
    fwd = sum(p.forward for p in parts.values())
    bwd = sum(p.backward for p in parts.values())
    return FlopsBreakdown(forward=fwd, backward=bwd, total=fwd + bwd, parts=parts)


# --------------------------------------------------------------------------- MFU


def mfu(tokens_per_s_per_gpu: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation = tokens/s per GPU × FLOPs per token / peak FLOP/s (a fraction).

    ``peak_flops`` is in FLOP/s (e.g. ``989.4e12``), not TFLOP/s.
    """
    if not peak_flops or peak_flops <= 0:
        raise ValueError(f"peak_flops must be a positive FLOP/s value, got {peak_flops!r}")
    return tokens_per_s_per_gpu * flops_per_token / peak_flops


@dataclass(frozen=True)
class PeakLookup:
    """Result of ``peak_tflops_for``: the table key and peak, or ``None`` with the reason."""

    key: str | None
    tflops: float | None
    reason: str

    @property
    def flops(self) -> float | None:
        """Peak in FLOP/s (for ``mfu``), or ``None``."""
        return None if self.tflops is None else self.tflops * 1e12


# Word-boundary patterns: "GH200" does not match H200, "L40" does not match L40S.
_GPU_PATTERNS: tuple[tuple[str, str], ...] = (
    ("H100-SXM", r"\bH100\b"),
    ("H200", r"\bH200\b"),
    ("A100", r"\bA100\b"),
    ("L40S", r"\bL40S\b"),
)


def peak_tflops_for(device_name: str | None) -> PeakLookup:
    """Map a device name (``torch.cuda.get_device_name()`` or ``"cpu"``) to ``PEAK_TFLOPS``.

    "NVIDIA H100 80GB HBM3" → H100-SXM, "NVIDIA H200" → H200, "NVIDIA A100-SXM4-80GB" → A100,
    "NVIDIA L40S" → L40S. CPU, unknown devices and the H100/H200 PCIe/NVL parts (lower peaks, not
    in the table) give ``tflops=None``: the MFU is left blank, and ``reason`` says why.
    """
    name = (device_name or "").strip()
    upper = name.upper()
    if not upper:
        return PeakLookup(None, None, "no device name: MFU left blank")
    if re.search(r"\bCPU\b", upper):
        return PeakLookup("cpu", None, "CPU: no bf16 tensor-core peak, MFU left blank")
    for key, pattern in _GPU_PATTERNS:
        if re.search(pattern, upper):
            if key in ("H100-SXM", "H200") and re.search(r"\b(PCIE|NVL)\b", upper):
                return PeakLookup(None, None, f"{name!r}: PCIe/NVL variant, peak not in table: MFU left blank")
            return PeakLookup(key, PEAK_TFLOPS[key], f"{name!r} -> {key}: {PEAK_TFLOPS[key]} TFLOP/s dense bf16")
    return PeakLookup(None, None, f"unknown device {name!r}: MFU left blank")
