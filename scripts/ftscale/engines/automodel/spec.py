"""The automodel engine as every stage sees it: NVIDIA NeMo AutoModel (FSDP2 over Hugging Face models) on
CUDA GPUs, LoRA on the data_parallel track. Its training code is ``ftscale.engines.automodel.train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ftscale.engines.base import EngineSpec, Errors, PlannerTerms, hf_lora_targets, text

if TYPE_CHECKING:
    from ftscale.study.run import Run

#: Fraction of the dense matmul rate a whole step reaches (Liger kernels, cuDNN attention, Triton LoRA),
#: fitted on the GPU examples.
STEP_EFFICIENCY = 0.67


@dataclass(frozen=True)
class AutoModelOptions:
    """The config's ``automodel:`` section (docs/engines.md)."""

    python: str | None = text("the interpreter of the engine's jobs")


class AutoModelSpec(EngineSpec):
    name = "automodel"
    entry_module = "ftscale.engines.automodel.train"
    Options = AutoModelOptions
    step_pattern = "automodel_step"
    needs_container = True

    def lora_targets(self, targets: list[str], architecture: Mapping[str, Any] | None = None) -> list[str]:
        """Hugging Face names (Megatron fused names expanded): AutoModel adapts the Hugging Face model."""
        return hf_lora_targets(targets, architecture)

    def errors(self, run: Run, model: Mapping[str, Any]) -> list[str]:
        errs = Errors(run.name)
        errs.extend(super().errors(run, model))
        self.cuda_only_errors(run, errs, "NeMo AutoModel")
        if run.track != "data_parallel":
            errs.add("track", run.track, "the automodel engine runs the data_parallel track (LoRA) only here")
        if model.get("synthetic_at_load"):
            errs.add("model.synthetic_at_load", True, "AutoModel loads weights from files: needs synthetic_at_load: false")
        return errs

    def planner_terms(self, run: Run, dtype_bytes: int, built: Mapping[str, Any] | None = None) -> PlannerTerms:
        # FSDP2 over a bf16 model: LoRA adapters, their gradients and AdamW's moments in the model dtype (no
        # fp32 master copy, no DDP buckets); Liger's RMSNorm, its Triton LoRA (lora_A's output recomputed), its
        # fused LoRA SwiGLU MLP; the Hugging Face loss on full logits (MaskedCrossEntropy).
        return PlannerTerms(adapter_bytes=dtype_bytes, norm_keeps="input", lora_keeps_rank_output=False,
                            fused_lora_mlp=True, gradient_buckets=False, step_efficiency=STEP_EFFICIENCY)
