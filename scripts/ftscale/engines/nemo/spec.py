"""The nemo engine as every stage sees it: NVIDIA NeMo 2 (Megatron-core) on CUDA GPUs, both tracks.

Its training code is ``ftscale.engines.nemo.train``; its checkpoint is NeMo's conversion of the Hugging Face
import (``ftscale.engines.nemo.convert``, the workflow's ``import_nemo`` rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ftscale.engines.base import (
    MEGATRON_LORA_GROUPS,
    EngineSpec,
    Errors,
    PlannerTerms,
    choice,
    hf_lora_targets,
    text,
)

if TYPE_CHECKING:
    from ftscale.study.run import Run

#: The names NeMo's LoRA (nemo.collections.llm.peft.LoRA.target_modules) knows for Megatron layers.
NEMO_LORA_TARGETS = tuple(MEGATRON_LORA_GROUPS)

#: Fraction of the dense matmul rate a whole step reaches: Megatron's local layer spec (no TE, unfused
#: attention), fitted on the GPU examples; with Transformer Engine not measured, the embedded eager figure.
STEP_EFFICIENCY = {"local": 0.29, "transformer_engine": 0.37}


@dataclass(frozen=True)
class NemoOptions:
    """The config's ``nemo:`` section (docs/engines.md)."""

    transformer_impl: str = choice("transformer_engine", "local",
                                   doc="Megatron's Transformer Engine layers, or its local spec (no TE)")
    python: str | None = text("the interpreter of the engine's jobs and of the conversion")
    distributed_optimizer: bool = choice(
        True, False, doc="Megatron's distributed optimizer (as NeMo's recipes): fp32 main weights and Adam moments "
                         "sharded over the data-parallel ranks (experts: the expert-data-parallel ranks)")


def nemo_lora_targets(targets: list[str], architecture: Mapping[str, Any] | None = None) -> list[str]:
    """NeMo LoRA ``target_modules`` for the run's targets (NeMo or Hugging Face names) in a model of
    ``architecture`` (None: any model).

    Wildcard patterns pass through; NeMo names and Hugging Face names must be modules the model has
    (``ftscale.engines.base.lora_modules``), Hugging Face names are mapped through ``MEGATRON_LORA_GROUPS``.
    Raises ValueError for a name the model does not have or a partial fused group.
    """
    patterns = [t for t in targets if any(c in t for c in "*.?[")]
    named = [t for t in targets if t not in patterns]
    hf = hf_lora_targets(named, architecture)  # refuses a name the model does not have
    given = set(hf_lora_targets([t for t in named if t not in NEMO_LORA_TARGETS], architecture))
    out = [t for t in named if t in NEMO_LORA_TARGETS]
    for nemo_name, group in MEGATRON_LORA_GROUPS.items():
        present = [n for n in group if n in given]
        if present and len(present) != len(group):
            missing = [n for n in group if n not in given]
            raise ValueError(f"LoRA targets {present} without {missing}: NeMo fuses {list(group)} into {nemo_name} "
                             "and adapts it as a whole; list all of them or none")
        if set(group) <= set(hf) and nemo_name not in out:
            out.append(nemo_name)
    return [n for n in NEMO_LORA_TARGETS if n in out] + list(dict.fromkeys(patterns))


class NemoSpec(EngineSpec):
    name = "nemo"
    entry_module = "ftscale.engines.nemo.train"
    Options = NemoOptions
    checkpoint_role = "nemo_checkpoint"
    step_pattern = "nemo_step_time"
    needs_container = True
    model_section = "nemo"
    model_files = {"nemo_checkpoint": "nemo", "nemo_import_log": "nemo-import.log"}
    packages = {"nemo": "nemo_toolkit"}
    study_options = ("python", "transformer_impl")
    pipeline_parallel = True

    def conversion_command(self, section: Mapping[str, Any], ftscale: str) -> str:
        """``ftscale import-nemo`` (``llm.import_ckpt``)."""
        impl = NemoOptions(**{k: v for k, v in section.items() if k == "transformer_impl"}).transformer_impl
        return (f"{ftscale} import-nemo {{wildcards.model}} --hf {{input}} --out {{output}} "
                f"--transformer-impl {impl}")

    def local_spec(self, run: Run) -> bool:
        """Whether the run uses Megatron's local layer spec (no Transformer Engine, unfused attention)."""
        return self.options(run).transformer_impl == "local"

    def lora_targets(self, targets: list[str], architecture: Mapping[str, Any] | None = None) -> list[str]:
        return nemo_lora_targets(targets, architecture)

    def errors(self, run: Run, model: Mapping[str, Any]) -> list[str]:
        """NeMo 2.7.3 / Megatron-core rules on top of the common ones."""
        errs = Errors(run.name)
        errs.extend(super().errors(run, model))
        if run.precision != "bf16":
            errs.add("precision", run.precision, "the NeMo recipes train in bf16-mixed only ('bf16')")
        self.cuda_only_errors(run, errs, "NeMo")
        nemo = model.get("nemo")
        if not isinstance(nemo, dict):
            errs.add("model.nemo", nemo, f"model {model.get('name')!r} has no 'nemo' section "
                                         "{recipe, model_class, config_class} (see models/llama31_8b/model.yaml)")
        else:
            for key in ("recipe", "model_class", "config_class"):
                if not isinstance(nemo.get(key), str) or not nemo.get(key):
                    errs.add(f"model.nemo.{key}", nemo.get(key), "must be a non-empty string (a name in nemo.collections.llm)")
        source = model.get("source")
        if not isinstance(source, str) or not source.strip():
            errs.add("model.source", source, "no weights source: 'synthetic', 'hf://org/name' or a local directory")
        elif source.startswith("hf://") and source.count("/") < 3:
            errs.add("model.source", source, "hub sources are 'hf://org/name'")
        elif "://" in source and not source.startswith("hf://"):
            errs.add("model.source", source, "only 'hf://' sources or local directories are supported")
        elif source == "synthetic" and model.get("synthetic_at_load"):
            errs.add("model.synthetic_at_load", True, "NeMo converts weights from files: a synthetic model for NeMo "
                                                      "needs synthetic_at_load: false")
        tp, ep, pp, gpus = run.tp, run.ep, run.pp, run.gpus
        if tp * ep * pp and gpus % (tp * ep * pp):
            errs.add("ep", ep, f"tp x pp x ep = {tp * ep * pp} must divide gpus = {gpus} (Megatron's expert grid)")
        if tp > 1 and ep > 1 and run.sp is False:
            errs.add("sp", False, f"Megatron requires sequence parallelism when tp ({tp}) and ep ({ep}) are both > 1")
        if not isinstance(run.seed, int) or run.seed <= 0:
            errs.add("seed", run.seed, "must be a positive integer (Megatron rejects seed <= 0)")
        return errs

    def planner_terms(self, run: Run, dtype_bytes: int, built: Mapping[str, Any] | None = None) -> PlannerTerms:
        local = self.local_spec(run)
        # Both layer specs normalise with a fused kernel (torch's RMSNorm on CUDA, or TE's). The local spec runs
        # with bias_activation_fusion off (ftscale.engines.nemo.convert.TE_FUSIONS): Megatron's unfused SwiGLU.
        # Megatron's DDP holds the gradients in its fp32 buffer: no second copy. Context and reserve: read from
        # the NeMo run that ran out of memory on the H100 (docs/planner.md).
        return PlannerTerms(adapter_bytes=2, fp32_main_weights=True, unfused_attention=local, norm_keeps="input",
                            unfused_glu=local, gradient_buckets=False,
                            sharded_optimizer=self.options(run).distributed_optimizer, cuda_context_mib=2022.0,
                            reserve_fraction=0.013,
                            step_efficiency=STEP_EFFICIENCY["local" if local else "transformer_engine"])

    def options_label(self, run: Run, built: Mapping[str, Any] | None = None) -> str:
        shown = ["transformer_impl=local"] if self.local_spec(run) else []
        if not self.options(run).distributed_optimizer:
            shown.append("distributed_optimizer=false")
        return ", ".join(shown)
