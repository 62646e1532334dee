"""Every run's record and what the analysis derives from it, as one pandas DataFrame: one row per run.

results/scaling.csv, the tables, the plots and the participant comparison all read this frame.
Columns: ``CSV_COLUMNS`` first, in that order; any other field a record or its ``Extras`` carries
(say, a site's ``energy_kwh``) follows them, into the CSV as well, without code changes here.
``INTERNAL`` columns (the run directory, the option set, each step's loss and the data set) stay out of the CSV.

Derived per run:
- model FLOPs and MFU (``model_perf``): FLOPs/token from ``ftscale.estimate.flops.training_flops_per_token``
  (the run's model, sequence length and LoRA setting; full fine-tuning on the model-parallel track);
  TFLOP/s/GPU = tokens/s/GPU x FLOPs/token / 1e12; MFU = TFLOP/s/GPU / the dense bf16 peak of the
  device the run reported (``ftscale.estimate.flops.peak_tflops_for``), blank with the reason in
  ``mfu_note`` where there is none (CPU, unknown GPU);
- speedup and efficiency (``add_scaling``, data-parallel track): against the 1-GPU run of the same
  engine, option set, scaling mode and batch shape, speedup S(N) = tokens/s(N) / tokens/s(1), efficiency S(N) / N
  (weak scaling: T(1) / T(N); strong: T(1) / (N x T(N))); an efficiency above 1 by no more than the
  1-GPU run's step-time spread (``step_time_spread``, (max - min) / median of its timed steps) is noise
  (``scaling_rows``, column ``above_ideal``);
- ``engine_options``: the engine options that differ from the defaults (``EngineSpec.options_label``);
- ``oversubscribed``: the job had fewer CPUs than processes on a node (launch.json ``cpus``);
- model parallel: parameters per GPU by formula and the analytic bytes each GPU sends per step
  (``ftscale.estimate.comm``);
- predicted vs measured (``prediction_columns``), for every run: the planner's peak memory per GPU,
  model state and step time (``ftscale.estimate.plan.predict``), and the error of each,
  (predicted - measured) / measured in %, where the two measure the same thing;
- reference verdicts (``ftscale.analyze.references``) and provenance (``ftscale.analyze.provenance``).
Rows that are not ``ok`` keep their status and reason; their measured and derived columns stay blank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import pandas as pd

from ftscale.analyze.parse import RunRecord
from ftscale.analyze.provenance import RUN_COLUMNS, STUDY_COLUMNS, device_name
from ftscale.analyze.references import ASPECTS, RefResult
from ftscale.estimate import flops as flops_mod
from ftscale.estimate.comm import comm_bytes_per_step, params_per_gpu
from ftscale.estimate.plan import Target, error_pct, predict
from ftscale.study.data import dataset_name
from ftscale.study.sweep import Study

#: What the planner predicts for a run, the error of each against the run's measurement, and why an
#: error is blank (``prediction_columns``).
PREDICTION_COLUMNS = ["predicted_peak_mem_mib", "predicted_state_mib", "predicted_step_time_s", "peak_mem_error_pct",
                      "state_error_pct", "step_time_error_pct", "prediction_note"]
CSV_COLUMNS = [
    "schema_version", "participant",
    "track", "model", "run", "engine", "engine_options", "weights", "scaling", "gpus", "tp", "ep", "dp", "sp", "micro_batch",
    "global_batch", "seq_length", "steps", "warmup_steps", "steps_done", "step_time_s", "step_time_spread",
    "tokens_per_s",
    "tokens_per_s_per_gpu", "speedup", "efficiency", "flops_per_token", "tflops_per_gpu", "mfu", "mfu_note",
    "peak_mem_mib", "reserved_mib", "mem_kind", "state_mib", *PREDICTION_COLUMNS, "wall_s", "loss_first",
    "loss_last", "oversubscribed", "params_per_gpu", "params_per_gpu_formula", "comm_tp_mib", "comm_ep_mib", "comm_dp_mib", "status", "reason",
    *(f"ref_{a}" for a in ASPECTS), "ref_name", "ref_source",
    "source", *RUN_COLUMNS, *STUDY_COLUMNS,
]
#: ``scaling_rows``' verdicts on an efficiency above 1.
NOISE, BEYOND_SPREAD = "noise", "beyond spread"
#: In the frame, not in the CSV (the option set is in the run's name, and its options in ``engine_options``;
#: ``losses``, a list of (step, loss) per run, and ``dataset``, the run's data, are what the loss curves read).
INTERNAL = ["run_dir", "option_set", "losses", "dataset"]


@dataclass(frozen=True)
class Perf:
    """Model FLOPs of one record; ``mfu_note`` names the peak used, or why MFU is blank."""

    flops_per_token: int | None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    mfu_note: str = ""


@dataclass(frozen=True)
class Extras:
    """What the analysis adds to a record: model FLOPs, reference verdicts, and further columns
    (the planner's prediction, provenance, and whatever else is added here: every key becomes a column)."""

    perf: Perf
    ref: RefResult = field(default_factory=lambda: RefResult(None))
    predicted: Mapping[str, object] = field(default_factory=dict)
    provenance: Mapping[str, object] = field(default_factory=dict)
    options: str = ""  # EngineSpec.options_label: the engine options that differ from the defaults


def model_perf(arch: Mapping, record: RunRecord) -> Perf:
    """FLOPs/token, TFLOP/s/GPU and MFU of one record (formulas in the module docstring); the run's LoRA
    setting is None for full fine-tuning."""
    per_token = flops_mod.training_flops_per_token(arch, record.run.seq_length, record.run.lora).total
    if record.status != "ok" or not record.tokens_per_s_per_gpu:
        return Perf(per_token, mfu_note=f"run {record.status}: no throughput")
    tflops = record.tokens_per_s_per_gpu * per_token / 1e12
    device = device_name(record.layout)
    if not device:
        return Perf(per_token, tflops, None, "the run's log names no device: MFU left blank")
    if device == "cuda":
        return Perf(per_token, tflops, None, "the log says device=cuda but not which GPU (no device_name): "
                    "MFU left blank")
    peak = flops_mod.peak_tflops_for(device)
    if peak.key == "cpu":
        return Perf(per_token, tflops, None, "no peak for cpu")
    if peak.flops is None:
        return Perf(per_token, tflops, None, peak.reason)
    note = f"{peak.key} peak {peak.tflops:g} TFLOP/s"
    if record.layout.get("dtype") == "float32":
        note += " (bf16; this run computed in float32)"
    return Perf(per_token, tflops, flops_mod.mfu(record.tokens_per_s_per_gpu, per_token, peak.flops), note)


def prediction_columns(spec: Mapping, record: RunRecord, target: Target) -> dict[str, object]:
    """The planner's prediction for a run (``ftscale.estimate.plan.predict`` on its run, with the dtype
    and engine options its log's layout line read back) and its error against what the run measured,
    only where the two are like with like:

    - model state (parameters, gradients, optimizer state) on every device, where the log has ``state_mib``;
    - peak memory only where it is CUDA max allocated: on the CPU the measured peak is the process's
      RSS, mostly the runtime, which a GPU allocation model does not describe;
    - step time only on a GPU: the prediction is for the target GPU (``plan.matmul_tflops``).

    ``prediction_note`` says which errors are blank and why. ``spec``: the model.yaml dict."""
    pred = predict(record.run, spec, target=target, built=record.layout or None)
    out: dict[str, object] = {k: pred[k] for k in PREDICTION_COLUMNS if k in pred}
    if record.status != "ok":
        return {**out, "prediction_note": f"run {record.status}: nothing measured to compare"}
    on_gpu = record.mem_kind == "cuda"
    out["state_error_pct"] = error_pct(pred["predicted_state_mib"], record.state_mib)
    if on_gpu:
        out["peak_mem_error_pct"] = error_pct(pred["predicted_peak_mem_mib"], record.peak_mem_mib)
        out["step_time_error_pct"] = error_pct(pred["predicted_step_time_s"], record.step_time_s)
    notes = [] if record.state_mib is not None else ["the log has no state_mib"]
    if on_gpu:
        notes.append(f"step time predicted at {target.matmul_tflops:g} TFLOP/s (plan.matmul_tflops)")
    else:
        notes.append("peak memory is the process's RSS and the step a CPU's: the GPU prediction of both is not "
                     "compared, the model state is")
    return {**out, "prediction_note": "; ".join(notes)}


def model_parallel_columns(study: Study, r: RunRecord) -> dict[str, object]:
    """Parameters per GPU (read back by the run, and by formula) and the analytic MiB each GPU sends
    per optimizer step, by kind, in the run's precision (``ftscale.estimate.comm``)."""
    run = r.run
    if run.track != "model_parallel":
        return {}
    arch = study.models[run.model].arch
    planned = next((x for x in study.runs if x.directory == r.run_dir), None)
    nbytes = 2 if (r.layout.get("dtype") == "bfloat16" or (planned is not None and planned.precision == "bf16")) else 4
    comm = comm_bytes_per_step(arch, run.layout, micro_batch=run.micro_batch, seq_length=run.seq_length,
                               grad_accum=run.grad_accum, act_bytes=nbytes, grad_bytes=nbytes, lora=None)
    mib = 2.0**20
    return {"params_per_gpu": r.layout.get("params_per_rank"), "params_per_gpu_formula": params_per_gpu(arch, run.tp, run.ep),
            "comm_tp_mib": (comm.tp_allreduce + comm.tp_allgather + comm.tp_reducescatter) / mib,
            "comm_ep_mib": comm.ep_alltoall / mib, "comm_dp_mib": comm.dp_allreduce / mib}


def record_row(study: Study, r: RunRecord, x: Extras) -> dict[str, object]:
    """One row of the frame: the record's fields (but its layout line), then what the analysis adds."""
    row: dict[str, object] = {k: v for k, v in r.to_dict().items() if k != "layout"}
    row.update(flops_per_token=x.perf.flops_per_token, tflops_per_gpu=x.perf.tflops_per_gpu, mfu=x.perf.mfu,
               mfu_note=x.perf.mfu_note, ref_name=x.ref.entry.name if x.ref.entry else "",
               ref_source=" ".join(x.ref.entry.source.split()) if x.ref.entry else "",
               ref_summary=x.ref.summary(), engine_options=x.options, option_set=r.run.option_set,
               dataset=dataset_name(r.run.data) or "mock")
    row.update({f"ref_{a}": x.ref.flag(a) for a in ASPECTS})
    row.update(model_parallel_columns(study, r))
    row.update(x.predicted)
    row.update(x.provenance)
    return row


def build_frame(study: Study, records: Iterable[RunRecord], extras: Mapping[str, Extras]) -> pd.DataFrame:
    """The frame of every record, with speedup, efficiency and oversubscription (module docstring)."""
    frame = pd.DataFrame([record_row(study, r, extras[r.run_dir]) for r in records])
    for column in CSV_COLUMNS:
        if column not in frame:
            frame[column] = None
    frame = add_scaling(study, frame)
    ranks_per_node = frame["gpus"] / pd.to_numeric(frame["nodes"], errors="coerce").fillna(1)
    cpus = pd.to_numeric(frame["cpus"], errors="coerce")
    frame["oversubscribed"] = (cpus < ranks_per_node).where(cpus.notna(), None)
    first = [c for c in CSV_COLUMNS if c in frame]
    return frame[first + [c for c in frame.columns if c not in first]]


def scaling_membership(study: Study) -> pd.DataFrame:
    """Which data-parallel run belongs to which scaling group (the 1-GPU run to every mode of its
    batch shape): columns run_dir, group, mode."""
    rows = []
    for model in study.models:
        for label, runs in study.scaling_groups(model).items():
            mode = next(p for p in label.split(", ") if p in ("weak", "strong"))
            rows += [{"run_dir": r.directory, "group": f"{model}: {label}", "mode": mode} for r in runs]
    return pd.DataFrame(rows, columns=["run_dir", "group", "mode"])


def scaling_rows(study: Study, frame: pd.DataFrame) -> pd.DataFrame:
    """Data-parallel rows per scaling group (the 1-GPU run once per mode), with ``mode``, ``speedup``
    and ``efficiency`` against the group's 1-GPU run, that run's ``baseline_spread`` (its
    ``step_time_spread``) and ``above_ideal``: for an efficiency above 1, ``noise`` where it is above by
    no more than the baseline's spread (a baseline step time that happened to be slow, not super-linear
    scaling), else ``beyond spread``; blank for an efficiency of 1 or less."""
    rows = frame.drop(columns=["speedup", "efficiency"], errors="ignore").merge(scaling_membership(study),
                                                                                  on="run_dir")
    ok = rows["status"].eq("ok") & rows["tokens_per_s"].notna()
    base = rows[ok & rows["gpus"].eq(1)].drop_duplicates("group").set_index("group")
    rows["speedup"] = (rows["tokens_per_s"] / rows["group"].map(base["tokens_per_s"])).where(ok)
    rows["efficiency"] = rows["speedup"] / rows["gpus"]
    rows["baseline_spread"] = pd.to_numeric(rows["group"].map(base["step_time_spread"]), errors="coerce").where(ok)
    excess = rows["efficiency"] - 1
    rows["above_ideal"] = ""
    rows.loc[excess > 1e-12, "above_ideal"] = BEYOND_SPREAD
    rows.loc[(excess > 1e-12) & (excess <= rows["baseline_spread"]), "above_ideal"] = NOISE
    return rows


def add_scaling(study: Study, frame: pd.DataFrame) -> pd.DataFrame:
    """``speedup`` and ``efficiency`` of every data-parallel row (blank elsewhere and where undefined)."""
    per_run = scaling_rows(study, frame).drop_duplicates("run_dir").set_index("run_dir")
    frame = frame.copy()
    frame["speedup"] = frame["run_dir"].map(per_run["speedup"])
    frame["efficiency"] = frame["run_dir"].map(per_run["efficiency"])
    return frame


def csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns of results/scaling.csv: every column but ``INTERNAL`` and the table-only summary."""
    return frame.drop(columns=[*INTERNAL, "ref_summary"], errors="ignore")
