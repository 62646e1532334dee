"""The plan: every run's predicted memory per GPU and step time, before any job is submitted.

Memory: ``ftscale.estimate.memory`` (weights, gradients, optimizer state, DDP's gradient buckets,
activations, logits and loss, each a column); ``peak`` is what CUDA's max allocated would show. What the run
needs of the GPU adds what its engine holds beside PyTorch's allocations (``PlannerTerms``)::

    needed = peak x (1 + reserve_fraction) + cuda_context_mib

and is flagged against the memory CUDA reports usable on the target GPU (``plan.gpu``, a model of ``GPUS``, or
``plan.gpu_memory_gib``; neither: the H100 80GB)::

    fits            needed <= TIGHT_FRACTION x usable
    tight           TIGHT_FRACTION x usable < needed <= usable
    predicted OOM   needed > usable

Step time, from the model FLOPs of ``ftscale.estimate.flops`` (the MFU convention)::

    compute_s = FLOPs/token x global_batch x seq_length / GPUs x R x B / (matmul_tflops x 1e12 x efficiency)
    comm_s    = bytes per GPU per step (ftscale.estimate.comm) / (BUS_GB_S x 1e9)      (not overlapped)
    step_time_s = compute_s + comm_s ;  tokens/s/GPU = global_batch x seq_length / step_time_s / GPUs
    GPU-hours = step_time_s x steps x GPUs / 3600                             (start-up not counted)

R = (total + forward) / total with activation checkpointing (one more forward), else 1. B = (m + pp - 1) / m,
the pipeline's bubble (1F1B: each stage idles for pp - 1 of the m + pp - 1 micro-batch slots of a step; m
micro-batches per step and data-parallel rank), 1 without pipeline parallelism.
``matmul_tflops`` (``plan.matmul_tflops``, default 798) is the dense bf16 matmul rate of an H100 or
H200; the efficiency is the fraction of it a whole training step reaches, which each engine gives
(``PlannerTerms.step_efficiency``, fitted on the GPU examples of results/examples: model TFLOP/s / 798).
Figures for the CPU are not predicted: the plan is for the target GPU. results/plan.csv and plan.md are
written by the analysis (``ftscale.analyze.plan_report``), in the format of its tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ftscale.estimate.comm import comm_bytes_per_step
from ftscale.estimate.flops import training_flops_per_token
from ftscale.estimate.memory import MemoryPrediction, MemorySetting, memory_setting, predict_memory
from ftscale.study.run import Run
from ftscale.study.sweep import Study

#: Bytes per second one GPU sends in a collective (NCCL bus bandwidth within an NVLink node): assumed,
#: not measured here; it only matters for the multi-GPU rows.
BUS_GB_S = 300.0

TIGHT_FRACTION = 0.9
FITS, TIGHT, PREDICTED_OOM = "fits", "tight", "predicted OOM"
SKIPPED_REASON = "predicted OOM"


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """A GPU model as CUDA sees it: ``usable_gib`` is ``torch.cuda.get_device_properties().total_memory``,
    what its out-of-memory message calls the total capacity (less than nvidia-smi's total, which counts the
    driver's own reserve); ``cuda_names``: the device names CUDA reports for it."""

    usable_gib: float
    cuda_names: tuple[str, ...]


#: The GPUs ``plan.gpu`` may name. H100 80GB: "GPU 0 has a total capacity of 79.18 GiB" in both out-of-memory
#: messages of results/examples (nvidia-smi: 81,559 MiB). H200 141GB: 139.8 GiB, an assumed figure (nvidia-smi:
#: 143,771 MiB, 140.4 GiB); no committed log states it, as no example ran out of memory there (docs/planner.md).
GPUS: dict[str, GpuModel] = {
    "H100-80GB": GpuModel(79.18, ("NVIDIA H100 80GB HBM3",)),
    "H200-141GB": GpuModel(139.8, ("NVIDIA H200",)),
}
DEFAULT_GPU = "H100-80GB"


def gpu_for_device(device_name: str) -> str:
    """The ``GPUS`` key of a CUDA device name (as provenance.txt and scaling.csv's device_model give it)."""
    for key, model in GPUS.items():
        if device_name in model.cuda_names:
            return key
    raise KeyError(f"device_model = {device_name!r}: not a GPU of ftscale.estimate.plan.GPUS {list(GPUS)}")


@dataclasses.dataclass(frozen=True)
class Target:
    """The device the study is planned for (the config's ``plan`` section): ``gpu`` names a model of ``GPUS``;
    ``gpu_memory_gib`` gives its usable memory instead (one of the two; neither: ``DEFAULT_GPU``)."""

    gpu: str | None = None
    gpu_memory_gib: float | None = None
    matmul_tflops: float = 798.0
    skip_predicted_oom: bool = False

    def __post_init__(self) -> None:
        if self.gpu is not None and self.gpu_memory_gib is not None:
            raise ValueError(f"plan.gpu = {self.gpu!r} and plan.gpu_memory_gib = {self.gpu_memory_gib!r}: give one")
        if self.gpu is not None and self.gpu not in GPUS:
            raise ValueError(f"plan.gpu = {self.gpu!r}: must be one of {list(GPUS)}")

    @property
    def usable_gib(self) -> float:
        """Memory of one GPU as CUDA reports it usable."""
        if self.gpu_memory_gib is not None:
            return self.gpu_memory_gib
        return GPUS[self.gpu or DEFAULT_GPU].usable_gib

    @property
    def gpu_memory_mib(self) -> float:
        return self.usable_gib * 1024

    @property
    def label(self) -> str:
        """How the plan names the target: the model (``plan.gpu``) or ``plan.gpu_memory_gib = X``."""
        if self.gpu_memory_gib is not None:
            return f"plan.gpu_memory_gib = {self.gpu_memory_gib:g}"
        return f"plan.gpu = {self.gpu or DEFAULT_GPU}" + ("" if self.gpu else " (the default)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Target:
        plan = config.get("plan") or {}
        return cls(**{f.name: plan[f.name] for f in dataclasses.fields(cls) if f.name in plan})


def needed_mib(peak_mib: float, setting: MemorySetting) -> float:
    """What a run needs of the GPU: its allocated peak, the reserve the allocator cannot hand out and what
    the engine holds outside PyTorch (formula in the module docstring)."""
    return peak_mib * (1 + setting.terms.reserve_fraction) + setting.terms.cuda_context_mib


def fit_flag(needed: float, target: Target) -> str:
    """The verdict on ``needed`` MiB (``needed_mib``) against the target's usable memory."""
    if needed > target.gpu_memory_mib:
        return PREDICTED_OOM
    if needed > TIGHT_FRACTION * target.gpu_memory_mib:
        return TIGHT
    return FITS


def dtype_bytes(run: Run, built: Mapping[str, Any] | None = None) -> int:
    """Bytes of the model's dtype: as built when known, else the precision (``auto`` is bf16 unless the
    run is pinned to the CPU, where the engine uses fp32)."""
    if built and built.get("dtype") in ("bfloat16", "float32"):
        return 2 if built["dtype"] == "bfloat16" else 4
    if run.precision == "auto":
        return 4 if run.device == "cpu" else 2
    return {"bf16": 2, "fp32": 4}[run.precision]


def setting_for(run: Run, arch: Mapping[str, Any], built: Mapping[str, Any] | None = None) -> MemorySetting:
    """The memory setting of a run; ``built`` is the layout line read back from its log, when it ran (dtype
    and engine options as they really were)."""
    nbytes = dtype_bytes(run, built)
    return memory_setting(arch, run.lora, run.layout, micro_batch=run.micro_batch, seq_length=run.seq_length,
                          dtype_bytes=nbytes, track=run.track, terms=run.spec.planner_terms(run, nbytes, built),
                          microbatches=max(run.grad_accum, 1))


#: How many times longer a mixture of experts' projections take looped over the experts (one matrix multiply
#: each, ``PlannerTerms.looped_experts``) than grouped: fitted on the GPU examples (docs/planner.md).
LOOPED_EXPERTS_SLOWDOWN = 1.6


def step_time_s(run: Run, setting: MemorySetting, target: Target) -> float:
    """Predicted wall time of one optimizer step (formula in the module docstring)."""
    flops = training_flops_per_token(setting.arch_dict, setting.seq_length, setting.lora_dict())
    recompute = (flops.total + flops.forward) / flops.total if setting.terms.activation_checkpointing else 1.0
    # float8 frozen linear layers (the decoder layers' dense projections, not the experts): F of their FLOPs
    # take 1/speedup of their time
    fp8_flops = flops.parts["attention_proj"].total + (0 if setting.arch.is_moe else flops.parts["mlp"].total)
    fp8_saved = fp8_flops * (1 - 1 / setting.terms.fp8_matmul_speedup) / flops.total
    # experts looped over rather than grouped: their FLOPs take longer
    experts_lost = ((LOOPED_EXPERTS_SLOWDOWN - 1) * flops.parts["mlp"].total / flops.total
                    if setting.arch.is_moe and setting.terms.looped_experts else 0.0)
    tokens = run.global_batch * setting.seq_length
    efficiency = setting.terms.step_efficiency
    lay = setting.layout
    grad_accum = run.global_batch // (setting.micro_batch * lay.data_parallel_size)
    bubble = (max(grad_accum, 1) + lay.pp - 1) / max(grad_accum, 1)
    compute = (flops.total * tokens / run.gpus * (recompute - fp8_saved + experts_lost) * bubble
               / (target.matmul_tflops * 1e12 * efficiency))
    comm = comm_bytes_per_step(setting.arch_dict, lay, micro_batch=setting.micro_batch,
                               seq_length=setting.seq_length, grad_accum=max(grad_accum, 1),
                               act_bytes=setting.dtype_bytes, grad_bytes=4 if setting.lora else setting.dtype_bytes,
                               lora=setting.lora_dict())
    return compute + comm.total / (BUS_GB_S * 1e9)


def predict(run: Run, model_spec: Mapping[str, Any], *, target: Target = Target(),
            built: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every predicted column of one run: memory parts per GPU (MiB), the peak and its flag against the
    target, step time, tokens/s/GPU and GPU-hours. ``model_spec`` is a model.yaml dict (or its
    ``architecture``); ``built``: the layout line of the run's log (``RunRecord.layout``), if it ran.
    Pure: the analysis calls it per record, the plan per planned run."""
    setting = setting_for(run, model_spec, built)
    mem: MemoryPrediction = predict_memory(setting)
    needed = needed_mib(mem.peak_mib, setting)
    step = step_time_s(run, setting, target)
    gpus = run.gpus
    return {
        "predicted_weights_mib": mem.weights_mib + mem.fp8_copies_mib,  # as held: with float8 copies
        "predicted_gradients_mib": mem.gradients_mib,
        "predicted_optimizer_mib": mem.optimizer_mib,
        "predicted_ddp_buckets_mib": mem.ddp_buckets_mib,
        "predicted_activations_mib": mem.activations_mib,
        "predicted_logits_mib": mem.logits_mib,
        "predicted_overhead_mib": mem.overhead_mib,
        "predicted_state_mib": mem.state_mib,
        "predicted_peak_mem_mib": mem.peak_mib,
        "predicted_needed_mib": needed,
        "peak_stage": mem.stage,
        "gpu_memory_mib": target.gpu_memory_mib,
        "memory_fraction": needed / target.gpu_memory_mib,
        "fit": fit_flag(needed, target),
        "predicted_step_time_s": step,
        "predicted_tokens_per_s_per_gpu": run.global_batch * run.seq_length / step / gpus,
        "predicted_gpu_hours": step * run.steps * gpus / 3600,
    }


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    """(predicted − measured) / measured in %, or None when either is missing."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured * 100


# --------------------------------------------------------------------------- the study's plan

PLAN_COLUMNS = ("run_dir", "model", "track", "engine", "options", "gpus", "nodes", "tp", "pp", "ep", "dp", "sp", "micro_batch", "global_batch",
                "seq_length", "steps", "lora", "precision_bytes", "activation_checkpointing", "compile",
                "predicted_weights_mib", "predicted_gradients_mib", "predicted_optimizer_mib",
                "predicted_ddp_buckets_mib", "predicted_activations_mib", "predicted_logits_mib", "predicted_overhead_mib",
                "predicted_state_mib", "predicted_peak_mem_mib", "peak_stage", "predicted_needed_mib", "gpu_memory_mib",
                "memory_fraction", "fit",
                "predicted_step_time_s", "predicted_tokens_per_s_per_gpu", "predicted_gpu_hours", "status")


def plan_rows(study: Study, target: Target | None = None) -> list[dict[str, Any]]:
    """One row per planned run, in plan order."""
    target = target or Target.from_config(study.config)
    rows = []
    for run in study.runs:
        setting = setting_for(run, study.models[run.model].arch)
        row = {"run_dir": run.directory, "model": run.model, "track": run.track, "engine": run.engine,
               "gpus": run.gpus, "nodes": run.nodes, "tp": run.tp, "pp": run.pp, "ep": run.ep, "dp": run.dp,
               "sp": run.sp, "options": run.spec.options_label(run),
               "micro_batch": run.micro_batch, "global_batch": run.global_batch, "seq_length": run.seq_length,
               "steps": run.steps, "lora": "full" if run.lora is None else f"r{run.lora.get('rank', 8)}",
               "precision_bytes": setting.dtype_bytes, "activation_checkpointing": setting.terms.activation_checkpointing,
               "compile": setting.terms.fused_kernels}
        row.update(predict(run, study.models[run.model].spec, target=target))
        row["status"] = f"skipped: {SKIPPED_REASON}" if run.skip_reason else "planned"
        rows.append(row)
    return rows


def with_predicted_oom_skipped(study: Study, target: Target | None = None) -> Study:
    """The study with every predicted-OOM run marked to be skipped (``Run.skip_reason``), when the config's
    ``plan.skip_predicted_oom`` is on; unchanged otherwise. A skipped run keeps its directory and its row."""
    target = target or Target.from_config(study.config)
    if not target.skip_predicted_oom:
        return study
    runs = []
    for run in study.runs:
        pred = predict(run, study.models[run.model].spec, target=target)
        if pred["fit"] == PREDICTED_OOM:
            reason = (f"{SKIPPED_REASON}: needs {pred['predicted_needed_mib']:,.0f} MiB (peak "
                      f"{pred['predicted_peak_mem_mib']:,.0f}) > {target.gpu_memory_mib:,.0f} MiB usable "
                      f"({target.label})")
            run = dataclasses.replace(run, skip_reason=reason)
        runs.append(run)
    return dataclasses.replace(study, runs=tuple(runs))
