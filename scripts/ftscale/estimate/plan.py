"""The plan: every run's predicted memory per GPU and step time, before any job is submitted.

Memory: ``ftscale.estimate.memory`` (weights, gradients, optimizer state, DDP's gradient buckets,
activations, logits and loss, each a column). The peak is flagged against the target GPU's memory (``plan.gpu_memory_gib``)::

    fits            peak <= TIGHT_FRACTION x GPU memory
    tight           TIGHT_FRACTION x GPU memory < peak <= GPU memory
    predicted OOM   peak > GPU memory

Step time, from the model FLOPs of ``ftscale.estimate.flops`` (the MFU convention)::

    compute_s = FLOPs/token x global_batch x seq_length / GPUs x R / (matmul_tflops x 1e12 x efficiency)
    comm_s    = bytes per GPU per step (ftscale.estimate.comm) / (BUS_GB_S x 1e9)      (not overlapped)
    step_time_s = compute_s + comm_s ;  tokens/s/GPU = global_batch x seq_length / step_time_s / GPUs
    GPU-hours = step_time_s x steps x GPUs / 3600                             (start-up not counted)

R = (total + forward) / total with activation checkpointing (one more forward), else 1.
``matmul_tflops`` (``plan.matmul_tflops``, default 798) is the dense bf16 matmul rate of an H100 or
H200; the efficiency is the fraction of it a whole training step reaches, which each engine gives
(``PlannerTerms.step_efficiency``, fitted on the GPU examples of results/examples: model TFLOP/s / 798).
Figures for the CPU are not predicted: the plan is for the target GPU.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
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
class Target:
    """The device the study is planned for (the config's ``plan`` section)."""

    gpu_memory_gib: float = 80.0
    matmul_tflops: float = 798.0
    skip_predicted_oom: bool = False

    @property
    def gpu_memory_mib(self) -> float:
        return self.gpu_memory_gib * 1024

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Target:
        plan = config.get("plan") or {}
        return cls(**{f.name: plan[f.name] for f in dataclasses.fields(cls) if f.name in plan})


def fit_flag(peak_mib: float, target: Target) -> str:
    if peak_mib > target.gpu_memory_mib:
        return PREDICTED_OOM
    if peak_mib > TIGHT_FRACTION * target.gpu_memory_mib:
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
                          dtype_bytes=nbytes, track=run.track, terms=run.spec.planner_terms(run, nbytes, built))


def step_time_s(run: Run, setting: MemorySetting, target: Target) -> float:
    """Predicted wall time of one optimizer step (formula in the module docstring)."""
    flops = training_flops_per_token(setting.arch_dict, setting.seq_length, setting.lora_dict())
    recompute = (flops.total + flops.forward) / flops.total if setting.activation_checkpointing else 1.0
    tokens = run.global_batch * setting.seq_length
    efficiency = setting.terms.step_efficiency
    compute = flops.total * tokens / run.gpus * recompute / (target.matmul_tflops * 1e12 * efficiency)
    lay = setting.layout
    grad_accum = run.global_batch // (setting.micro_batch * lay.data_parallel_size)
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
    step = step_time_s(run, setting, target)
    gpus = run.gpus
    return {
        "predicted_weights_mib": mem.weights_mib,
        "predicted_gradients_mib": mem.gradients_mib,
        "predicted_optimizer_mib": mem.optimizer_mib,
        "predicted_ddp_buckets_mib": mem.ddp_buckets_mib,
        "predicted_activations_mib": mem.activations_mib,
        "predicted_logits_mib": mem.logits_mib,
        "predicted_overhead_mib": mem.overhead_mib,
        "predicted_state_mib": mem.state_mib,
        "predicted_peak_mem_mib": mem.peak_mib,
        "gpu_memory_mib": target.gpu_memory_mib,
        "memory_fraction": mem.peak_mib / target.gpu_memory_mib,
        "fit": fit_flag(mem.peak_mib, target),
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

PLAN_COLUMNS = ("run_dir", "model", "track", "engine", "gpus", "tp", "ep", "dp", "sp", "micro_batch", "global_batch",
                "seq_length", "steps", "lora", "precision_bytes", "activation_checkpointing", "compile",
                "predicted_weights_mib", "predicted_gradients_mib", "predicted_optimizer_mib",
                "predicted_ddp_buckets_mib", "predicted_activations_mib", "predicted_logits_mib", "predicted_overhead_mib",
                "predicted_state_mib", "predicted_peak_mem_mib", "gpu_memory_mib", "memory_fraction", "fit",
                "predicted_step_time_s", "predicted_tokens_per_s_per_gpu", "predicted_gpu_hours", "status")


def plan_rows(study: Study, target: Target | None = None) -> list[dict[str, Any]]:
    """One row per planned run, in plan order."""
    target = target or Target.from_config(study.config)
    rows = []
    for run in study.runs:
        setting = setting_for(run, study.models[run.model].arch)
        row = {"run_dir": run.directory, "model": run.model, "track": run.track, "engine": run.engine,
               "gpus": run.gpus, "tp": run.tp, "ep": run.ep, "dp": run.dp, "sp": run.sp,
               "micro_batch": run.micro_batch, "global_batch": run.global_batch, "seq_length": run.seq_length,
               "steps": run.steps, "lora": "full" if run.lora is None else f"r{run.lora.get('rank', 8)}",
               "precision_bytes": setting.dtype_bytes, "activation_checkpointing": setting.activation_checkpointing,
               "compile": setting.compile}
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
            reason = (f"{SKIPPED_REASON}: {pred['predicted_peak_mem_mib']:,.0f} MiB > "
                      f"{target.gpu_memory_mib:,.0f} MiB (plan.gpu_memory_gib = {target.gpu_memory_gib:g})")
            run = dataclasses.replace(run, skip_reason=reason)
        runs.append(run)
    return dataclasses.replace(study, runs=tuple(runs))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def render_plan(rows: list[dict[str, Any]], target: Target, source: str) -> str:
    hours = sum(r["predicted_gpu_hours"] for r in rows)
    runnable = sum(r["predicted_gpu_hours"] for r in rows if r["fit"] != PREDICTED_OOM)
    counts = {flag: sum(r["fit"] == flag for r in rows) for flag in (FITS, TIGHT, PREDICTED_OOM)}
    lines = [
        "# Plan: predicted memory and step time of every run",
        "",
        f"Configuration: {source}. Target GPU: {target.gpu_memory_gib:g} GiB ({target.gpu_memory_mib:,.0f} MiB), "
        f"{target.matmul_tflops:g} TFLOP/s dense bf16 matmul. Nothing here was measured: formulas in "
        "`scripts/ftscale/estimate/memory.py` and `plan.py`, calibration in `benchmarks/gpu/NOTES.md`.",
        "",
        f"**{len(rows)} runs: {counts[FITS]} fit, {counts[TIGHT]} tight (> {TIGHT_FRACTION:.0%}), "
        f"{counts[PREDICTED_OOM]} predicted OOM. GPU-hours of the whole sweep: {hours:,.2f} "
        f"({runnable:,.2f} without the predicted-OOM runs).**",
        "",
        "Memory per GPU in MiB.",
        "",
        "| run | GPUs | tp | ep | dp | sp | mbs | seq | weights | grads | optimizer | DDP buckets | activations "
        "| logits | peak | % of GPU | fit | step (s) | tokens/s/GPU | GPU-h | status |",
        "|---|" + "---|" * 20,
    ]
    for r in rows:
        cells = [r["run_dir"], r["gpus"], r["tp"], r["ep"], r["dp"], "yes" if r["sp"] else "", r["micro_batch"],
                 r["seq_length"], r["predicted_weights_mib"], r["predicted_gradients_mib"],
                 r["predicted_optimizer_mib"], r["predicted_ddp_buckets_mib"], r["predicted_activations_mib"],
                 r["predicted_logits_mib"],
                 r["predicted_peak_mem_mib"], f"{r['memory_fraction']:.0%}", r["fit"],
                 f"{r['predicted_step_time_s']:.3g}", r["predicted_tokens_per_s_per_gpu"],
                 f"{r['predicted_gpu_hours']:.3g}", r["status"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def write_plan(study: Study, csv_path: Path, md_path: Path, target: Target | None = None) -> list[dict[str, Any]]:
    """results/plan.csv (every column) and results/plan.md (the table and the sweep's GPU-hours)."""
    target = target or Target.from_config(study.config)
    rows = plan_rows(study, target)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PLAN_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in PLAN_COLUMNS} for row in rows)
    md_path.write_text(render_plan(rows, target, study.source))
    return rows
