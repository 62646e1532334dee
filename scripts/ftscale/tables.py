"""Aggregate run records into results/scaling.csv and the scaling tables of results/tables.md.

Scaling metrics (data-parallel track), for N GPUs against the 1-GPU run of the same model and batch:
- speedup S(N) = throughput(N) / throughput(1), throughput in tokens/s of the whole job;
- efficiency E(N) = S(N) / N.
For weak scaling (global batch grows with N) this is E = T(1) / T(N), T the step time; for strong
scaling (global batch fixed) it is E = T(1) / (N * T(N)). Both are the throughput ratio over N.
Rows that are not ``ok`` keep their status and reason; their derived columns stay blank.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from ftscale.comm import CommBytes, Layout, comm_bytes_per_step, params_per_gpu
from ftscale.config import Study
from ftscale.parse import RunRecord

CSV_COLUMNS = [
    "track", "model", "run", "engine", "weights", "scaling", "gpus", "tp", "ep", "dp", "sp", "micro_batch",
    "global_batch", "seq_length", "steps", "warmup_steps", "steps_done", "step_time_s", "tokens_per_s",
    "tokens_per_s_per_gpu", "speedup", "efficiency", "peak_mem_mib", "reserved_mib", "mem_kind", "wall_s",
    "loss_first", "loss_last", "status", "reason", "source",
]


def scaling(records: list[RunRecord]) -> list[tuple[float | None, float | None]]:
    """(speedup, efficiency) of each record against the group's 1-GPU run; None where undefined."""
    base = next((r for r in records if r.gpus == 1), None)
    out: list[tuple[float | None, float | None]] = []
    for r in records:
        if base is None or base.status != "ok" or r.status != "ok" or not base.tokens_per_s or not r.tokens_per_s:
            out.append((None, None))
            continue
        speedup = r.tokens_per_s / base.tokens_per_s
        out.append((speedup, speedup / r.gpus))
    return out


def scaling_by_dir(study: Study, by_dir: dict[str, RunRecord]) -> dict[str, tuple[float | None, float | None]]:
    out = {}
    for model in study.models:
        for runs in study.scaling_groups(model).values():
            recs = [by_dir[r.directory] for r in runs]
            out.update({rec.run_dir: value for rec, value in zip(recs, scaling(recs))})
    return out


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: list[str], rows: Iterable[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _status(r: RunRecord) -> str:
    return r.status if not r.reason or r.status == "ok" else f"{r.status}: {r.reason}"


def _mem(r: RunRecord) -> str:
    if r.peak_mem_mib is None:
        return ""
    return f"{r.peak_mem_mib:,.0f} ({'RSS' if r.mem_kind == 'rss' else 'CUDA'})"


def dp_section(study: Study, records: dict[str, RunRecord], model: str) -> str:
    parts = []
    for mode, runs in study.scaling_groups(model).items():
        recs = [records[r.directory] for r in runs]
        sc = scaling(recs)
        header = ["GPUs", "micro batch", "global batch", "step time (s)", "tokens/s", "tokens/s/GPU",
                  "speedup", "efficiency", "peak mem/GPU (MiB)", "wall-clock (s)", "status"]
        rows = [[r.gpus, r.micro_batch, r.global_batch, r.step_time_s, r.tokens_per_s, r.tokens_per_s_per_gpu,
                 speedup, eff, _mem(r), r.wall_s, _status(r)] for r, (speedup, eff) in zip(recs, sc)]
        definition = ("E = T(1) / T(N), T the median step time (global batch grows with N)" if mode == "weak"
                      else "E = T(1) / (N x T(N)), T the median step time (global batch fixed)")
        parts.append(f"#### {model}: {mode} scaling\n\n{markdown_table(header, rows)}\n\n"
                     f"Speedup = tokens/s(N) / tokens/s(1); efficiency {definition}.")
    return "\n\n".join(parts)


def comm_per_step(study: Study, r: RunRecord) -> CommBytes:
    """Analytic bytes communicated per step per GPU (ftscale.comm), in the run's precision."""
    run = study.run_by_dir(r.run_dir) if r.run_dir in {x.directory for x in study.runs} else None
    bf16 = (r.layout.get("dtype") == "bfloat16") or (run is not None and run.precision == "bf16")
    nbytes = 2 if bf16 else 4
    return comm_bytes_per_step(study.models[r.model].arch, Layout(tp=r.tp, ep=r.ep, dp=r.dp, sp=r.sp),
                               micro_batch=r.micro_batch, seq_length=r.seq_length,
                               grad_accum=r.global_batch // (r.micro_batch * r.ep * r.dp),
                               act_bytes=nbytes, grad_bytes=nbytes, lora=None)


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


def mp_section(study: Study, records: dict[str, RunRecord], model: str) -> str:
    recs = [records[r.directory] for r in study.runs_of("model_parallel") if r.model == model]
    if not recs:
        return ""
    ok_mem = [r.peak_mem_mib for r in recs if r.status == "ok" and r.peak_mem_mib]
    smallest = min(ok_mem) if ok_mem else None
    header = ["GPUs", "TP", "EP", "SP", "DP", "step time (s)", "tokens/s", "tokens/s/GPU", "peak mem/GPU (MiB)",
              "mem vs smallest", "params/GPU (run)", "params/GPU (formula)", "TP comm (MiB)", "EP all-to-all (MiB)",
              "DP all-reduce (MiB)", "status"]
    rows = []
    for r in sorted(recs, key=lambda r: (r.gpus, r.tp, r.ep)):
        rel = r.peak_mem_mib / smallest if (smallest and r.peak_mem_mib and r.status == "ok") else None
        comm = comm_per_step(study, r)
        tp_comm = comm.tp_allreduce + comm.tp_allgather + comm.tp_reducescatter
        rows.append([r.gpus, r.tp, r.ep, r.sp, r.dp, r.step_time_s, r.tokens_per_s, r.tokens_per_s_per_gpu,
                     _mem(r), rel, r.layout.get("params_per_rank"), params_per_gpu(study.models[model].arch, r.tp, r.ep),
                     _mib(tp_comm), _mib(comm.ep_alltoall), _mib(comm.dp_allreduce), _status(r)])
    note = ("Communication: analytic bytes sent per GPU per optimizer step (ring collectives; formulas in "
            "`scripts/ftscale/comm.py`): TP = all-reduces, or all-gather + reduce-scatter with SP, of the "
            "activations (4 per layer and micro-batch); EP = dispatch and combine all-to-all of the routed "
            "tokens, forward and backward; DP = one gradient all-reduce (non-expert weights over ep x dp "
            "replicas, experts over dp). params/GPU (run) is read back from the sharded model.")
    return f"#### {model}: model parallel (full fine-tuning)\n\n{markdown_table(header, rows)}\n\n{note}"


def dense_vs_moe(study: Study, records: list[RunRecord]) -> str:
    """Dense and MoE model-parallel runs side by side at equal GPU counts."""
    ok = [r for r in records if r.track == "model_parallel" and r.status == "ok"]
    dense = {r.gpus: r for r in ok if not study.models[r.model].is_moe}
    moe = {r.gpus: r for r in ok if study.models[r.model].is_moe}
    rows = []
    for gpus in sorted(set(dense) & set(moe)):
        d, m = dense[gpus], moe[gpus]
        rows.append([gpus, f"{d.model} tp{d.tp}", d.tokens_per_s_per_gpu, _mem(d),
                     f"{m.model} tp{m.tp} ep{m.ep}", m.tokens_per_s_per_gpu, _mem(m)])
    if not rows:
        return ""
    header = ["GPUs", "dense layout", "dense tokens/s/GPU", "dense peak mem/GPU (MiB)", "MoE layout",
              "MoE tokens/s/GPU", "MoE peak mem/GPU (MiB)"]
    return ("#### Dense vs mixture of experts at equal GPU counts\n\n" + markdown_table(header, rows)
            + "\n\nWhere a GPU count has several layouts, the last one listed is shown.")


def write_csv(records: list[RunRecord], study: Study, path: Path) -> None:
    sc = scaling_by_dir(study, {r.run_dir: r for r in records})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = r.to_dict()
        row["speedup"], row["efficiency"] = sc.get(r.run_dir, (None, None))
        writer.writerow(row)
    path.write_text(buf.getvalue())


def render_tables(study: Study, records: list[RunRecord]) -> str:
    by_dir = {r.run_dir: r for r in records}
    counts = {s: sum(r.status == s for r in records) for s in sorted({r.status for r in records})}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    out = [
        "# Fine-tuning scaling study",
        "",
        f"Configuration: `{study.source}`; engine `{study.config['engine']}`; {len(records)} runs ({summary}).",
        "Every figure below comes from the run's own log; `results/scaling.csv` names the log lines "
        "(column `source`). Step time is the median over the steps after the warm-up.",
    ]
    synthetic = sorted({r.model for r in records if r.weights == "synthetic"})
    if synthetic:
        out.append(f"Models with synthetic (seeded random) weights: {', '.join(synthetic)}: step time and memory "
                   "are real, losses are not those of the pretrained model.")
    if study.config["tracks"]["data_parallel"]["enabled"]:
        out += ["", "## Data parallel (LoRA)", ""]
        out += [dp_section(study, by_dir, m) + "\n" for m in study.models]
    if study.config["tracks"]["model_parallel"]["enabled"] and study.runs_of("model_parallel"):
        out += ["", "## Model parallel (full fine-tuning)", ""]
        out += [s + "\n" for m in study.models if (s := mp_section(study, by_dir, m))]
        if comparison := dense_vs_moe(study, records):
            out.append(comparison + "\n")
    return "\n".join(out).rstrip() + "\n"
