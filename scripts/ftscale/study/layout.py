"""The parallel layout of a run, and the one place its rules are written.

GPUs = tp x pp x ep x dp. Megatron's convention, which every engine here follows: experts are carved
out of the data-parallel ranks, so the dense and attention layers see ep x dp replicas and the experts
dp; expert tensor parallelism equals tp. ``sp`` (sequence parallelism) shards the activations between
the tensor-parallel regions along the sequence. ``pp`` (pipeline parallelism) splits the decoder layers
into pp stages of L/pp consecutive layers each (the embedding on the first stage, the final norm and
the LM head on the last); every stage has its own tp x ep x dp grid, so the data-parallel sizes are
those of pp = 1. Only engines that declare it (``EngineSpec.pipeline_parallel``) run pp > 1.

``Layout.errors(architecture)`` is used by the configuration's validation, by the engines before
they build anything, and by the analytic models (communication, memory) of ``ftscale.estimate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: Keys of an architecture dict that may hold the number of experts (model.schema.yaml uses the first).
EXPERT_KEYS = ("num_local_experts", "num_experts", "num_moe_experts")


def num_experts(arch: Mapping[str, Any]) -> int:
    """Experts per MoE layer; 1 for a dense model."""
    for key in EXPERT_KEYS:
        if arch.get(key):
            return int(arch[key])
    return 1


@dataclass(frozen=True)
class Layout:
    """A training layout; GPUs = tp·pp·ep·dp. ``sp`` = sequence parallelism (only with tp > 1); ``pp`` =
    pipeline stages (last, so that ``Layout(tp, ep, dp, sp)`` keeps its meaning)."""

    tp: int = 1
    ep: int = 1
    dp: int = 1
    sp: bool = False
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.ep * self.dp

    @property
    def data_parallel_size(self) -> int:
        """Replicas of the non-expert weights (ep x dp): what the global batch is divided by."""
        return self.ep * self.dp

    @classmethod
    def coerce(cls, layout: Layout | Mapping[str, Any]) -> Layout:
        """Accept a ``Layout`` or a dict like ``{tp: 2, pp: 2, sp: true}`` (missing keys default)."""
        if isinstance(layout, Layout):
            return layout
        return cls(tp=int(layout.get("tp", 1)), ep=int(layout.get("ep", 1)), dp=int(layout.get("dp", 1)),
                   sp=bool(layout.get("sp", False)), pp=int(layout.get("pp", 1)))

    @property
    def label(self) -> str:
        """``tp2_ep4_dp1_sp``, with ``_pp2`` after tp when pp > 1 (as the run names spell a layout)."""
        pp = f"_pp{self.pp}" if self.pp > 1 else ""
        return f"tp{self.tp}{pp}_ep{self.ep}_dp{self.dp}{'_sp' if self.sp else ''}"

    def errors(self, arch: Mapping[str, Any], seq_length: int | None = None) -> list[str]:
        """Every rule this layout breaks for a model architecture (empty when it is valid).

        ``arch`` holds the architecture keys of a model.yaml (or of a Hugging Face config).
        """
        tp, ep, dp, pp = self.tp, self.ep, self.dp, self.pp
        if min(tp, ep, dp, pp) < 1:
            return [f"tp, pp, ep and dp must be >= 1, got tp = {tp}, pp = {pp}, ep = {ep}, dp = {dp}"]
        errs = []
        layers = arch.get("num_hidden_layers")
        if pp > 1 and layers and layers % pp:
            errs.append(f"pp = {pp} must divide the decoder layers (num_hidden_layers = {layers}): each stage "
                        "holds L/pp layers")
        heads, kv_heads = arch.get("num_attention_heads"), arch.get("num_key_value_heads") or arch.get(
            "num_attention_heads")
        if heads and (heads % tp or kv_heads % tp):
            errs.append(f"tp = {tp} must divide the attention heads ({heads}) and the key/value heads ({kv_heads})")
        for key in ("intermediate_size", "vocab_size"):
            if arch.get(key) and arch[key] % tp:
                errs.append(f"tp = {tp} must divide {key} ({arch[key]})")
        experts = num_experts(arch)
        if ep > 1 and experts == 1:
            errs.append(f"ep = {ep} but the model is dense: expert parallelism needs experts")
        elif experts % ep:
            errs.append(f"ep = {ep} must divide the number of experts ({experts})")
        if self.sp and tp < 2:
            errs.append("sp = true needs tp > 1 (sequence parallelism shards along the tensor-parallel group)")
        if self.sp and seq_length is not None and seq_length % tp:
            errs.append(f"sp needs tp = {tp} to divide seq_length = {seq_length}")
        return errs

    def check(self, arch: Mapping[str, Any], seq_length: int | None = None) -> None:
        """Raise ValueError with every broken rule."""
        errs = self.errors(arch, seq_length)
        if errs:
            raise ValueError(f"layout tp={self.tp} pp={self.pp} ep={self.ep} dp={self.dp} sp={self.sp}: "
                             + "; ".join(errs))
