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
``matmul_tflops`` (``plan.matmul_tflops``, default 798) is the dense bf16 matmul rate measured on
the H100 and H200 lent to this project; ``STEP_EFFICIENCY`` is the fraction of it a whole training
step reaches, by engine and by how the embedded engine runs the model (``step_efficiency``), each fitted
on the GPU examples of results/examples (model TFLOP/s / 798).
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
from ftscale.study.engines import embedded_options_as_built, nemo_local_spec
from ftscale.study.layout import Layout
from ftscale.study.run import Run
from ftscale.study.sweep import Study

#: Fraction of ``matmul_tflops`` a whole step reaches (``step_efficiency`` picks one), fitted on the examples:
STEP_EFFICIENCY = {
    # embedded, fp32 adapters (peft's default): LLaMA 3.1 8B LoRA, H100, 0.31-0.36; Mixtral 8x7B, H200, 0.44
    "eager": 0.37,
    "compile_model": 0.46,  # the whole model in one graph, fp32 adapters: 0.46-0.47 (H100, H200)
    "compile_layers": 0.56,  # each decoder layer compiled, fp32 adapters: 0.56 (LLaMA, H200)
    # and lora_dtype: model: LLaMA 0.665-0.68, with the chunked loss compiled 0.705; Mixtral 0.58 (H200)
    "compile_layers_bf16": 0.66,
    "automodel": 0.67,  # NeMo AutoModel 0.7.0 (Liger, cuDNN attention, Triton LoRA): 0.655-0.675 (H200)
    "nemo_local": 0.29,  # NeMo 2.7.3 on Megatron's local spec (no TE, unfused attention): 0.29 (H200)
}

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


def _as_dict(run: Run | Mapping[str, Any]) -> Mapping[str, Any]:
    return run.to_dict() if isinstance(run, Run) else run


def _options(run: Mapping[str, Any], built: Mapping[str, Any] | None) -> dict:
    """The embedded options as built (the log's layout line) when known, else as configured
    (``engine_options``; ``extra`` in run.json files written before it was renamed)."""
    return embedded_options_as_built({**run, "engine_options": run.get("engine_options") or run.get("extra") or {}},
                                     built)


def step_efficiency(setting: MemorySetting) -> float:
    """The ``STEP_EFFICIENCY`` of a run: by engine (NeMo with Transformer Engine is not measured here: the
    eager figure), and for the embedded engine by compile scope and adapter dtype (bf16 adapters without
    compile are not measured: the eager figure)."""
    if setting.engine == "automodel":
        return STEP_EFFICIENCY["automodel"]
    if setting.engine == "nemo":
        return STEP_EFFICIENCY["nemo_local" if setting.local_spec else "eager"]
    if not setting.compile:
        return STEP_EFFICIENCY["eager"]
    if setting.compile_scope == "model":
        return STEP_EFFICIENCY["compile_model"]
    bf16 = setting.lora is not None and setting.adapter_bytes == setting.dtype_bytes == 2
    return STEP_EFFICIENCY["compile_layers_bf16" if bf16 else "compile_layers"]


def dtype_bytes(run: Mapping[str, Any], built: Mapping[str, Any] | None = None) -> int:
    """Bytes of the model's dtype: as built when known, else the precision (``auto`` is bf16 unless the
    run is pinned to the CPU, where the engine uses fp32)."""
    if built and built.get("dtype") in ("bfloat16", "float32"):
        return 2 if built["dtype"] == "bfloat16" else 4
    precision = run.get("precision", "auto")
    if precision == "auto":
        return 4 if run.get("device") == "cpu" else 2
    return {"bf16": 2, "fp32": 4}[precision]


def setting_for(run: Run | Mapping[str, Any], arch: Mapping[str, Any],
                built: Mapping[str, Any] | None = None) -> MemorySetting:
    """The memory setting of a run (a ``Run`` or its run.json dict); ``built`` is the layout line read back
    from its log, when it ran (dtype and engine options as they really were)."""
    r = _as_dict(run)
    opts = _options(r, built)
    # liger-kernel's fused RMSNorm/SwiGLU/RoPE keep what compile's fusions keep and run about as fast as the
    # layer-compiled model: one H200 run (liger without compile, bf16 adapters) against these terms, memory
    # +1%, step time +2%.
    fused = bool(opts["compile"] or opts["liger_kernels"])
    scope = str(opts["compile_scope"]) if opts["compile"] else "layers"
    return memory_setting(arch, r.get("lora"), Layout.coerce(r), micro_batch=int(r["micro_batch"]),
                          seq_length=int(r["seq_length"]), dtype_bytes=dtype_bytes(r, built),
                          engine=r.get("engine", "embedded"), track=r["track"],
                          activation_checkpointing=bool(opts["activation_checkpointing"]),
                          compile=fused, fused_ce=str(opts["fused_ce"] or "off"),
                          lora_dtype=str(opts["lora_dtype"]), compile_scope=scope,
                          local_spec=nemo_local_spec(r))


def step_time_s(run: Run | Mapping[str, Any], setting: MemorySetting, target: Target) -> float:
    """Predicted wall time of one optimizer step (formula in the module docstring)."""
    r = _as_dict(run)
    flops = training_flops_per_token(setting.arch_dict, setting.seq_length, setting.lora_dict())
    recompute = (flops.total + flops.forward) / flops.total if setting.activation_checkpointing else 1.0
    tokens = int(r["global_batch"]) * setting.seq_length
    efficiency = step_efficiency(setting)
    compute = flops.total * tokens / int(r["gpus"]) * recompute / (target.matmul_tflops * 1e12 * efficiency)
    lay = setting.layout
    grad_accum = int(r["global_batch"]) // (setting.micro_batch * lay.data_parallel_size)
    comm = comm_bytes_per_step(setting.arch_dict, lay, micro_batch=setting.micro_batch,
                               seq_length=setting.seq_length, grad_accum=max(grad_accum, 1),
                               act_bytes=setting.dtype_bytes, grad_bytes=4 if setting.lora else setting.dtype_bytes,
                               lora=setting.lora_dict())
    return compute + comm.total / (BUS_GB_S * 1e9)


def predict(run: Run | Mapping[str, Any], model_spec: Mapping[str, Any], *, target: Target = Target(),
            built: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every predicted column of one run: memory parts per GPU (MiB), the peak and its flag against the
    target, step time, tokens/s/GPU and GPU-hours. ``model_spec`` is a model.yaml dict (or its
    ``architecture``); ``built``: the layout line of the run's log (``RunRecord.layout``), if it ran.
    Pure: the analysis calls it per record, the plan per planned run."""
    r = _as_dict(run)
    setting = setting_for(r, model_spec, built)
    mem: MemoryPrediction = predict_memory(setting)
    step = step_time_s(r, setting, target)
    gpus = int(r["gpus"])
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
        "predicted_tokens_per_s_per_gpu": int(r["global_batch"]) * int(r["seq_length"]) / step / gpus,
        "predicted_gpu_hours": step * int(r["steps"]) * gpus / 3600,
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
