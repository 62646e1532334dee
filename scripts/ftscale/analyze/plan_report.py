"""results/plan.csv and results/plan.md: the plan's rows (``ftscale.estimate.plan.plan_rows``), written in
the one number and table format of the analysis (``ftscale.analyze.tables``: ``fmt_number``, ``fmt_percent``,
``markdown``, the column headers of ``LABELS``), like results/tables.md and results/comparison.md.

The estimate stage computes the plan; this module only renders it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd

from ftscale.analyze.tables import LABELS, fmt_number, fmt_percent, markdown
from ftscale.estimate.plan import FITS, PLAN_COLUMNS, PREDICTED_OOM, TIGHT, TIGHT_FRACTION, Target, plan_rows
from ftscale.study.sweep import Study

#: header -> plan row key; memory in MiB per GPU (said above the table).
MEMORY_COLUMNS = {
    "weights": "predicted_weights_mib", "grads": "predicted_gradients_mib", "optimizer": "predicted_optimizer_mib",
    "DDP buckets": "predicted_ddp_buckets_mib", "activations": "predicted_activations_mib",
    "logits": "predicted_logits_mib", "peak": "predicted_peak_mem_mib", "needed": "predicted_needed_mib",
}


def plan_table(rows: list[dict[str, Any]]) -> str:
    """One line per planned run: its layout and batch, the predicted memory parts, the verdict, step time and
    GPU-hours."""
    cells = [{
        "run": r["run_dir"],
        **{LABELS[key]: fmt_number(r[key]) for key in ("gpus", "tp", "pp", "ep", "dp")},
        LABELS["sp"]: fmt_number(bool(r["sp"])),
        **{LABELS[key]: fmt_number(r[key]) for key in ("micro_batch", "seq_length")},
        **{header: fmt_number(r[key]) for header, key in MEMORY_COLUMNS.items()},
        "% of GPU": fmt_percent(r["memory_fraction"]),
        "fit": r["fit"],
        LABELS["step_time_s"]: fmt_number(r["predicted_step_time_s"]),
        LABELS["tokens_per_s_per_gpu"]: fmt_number(r["predicted_tokens_per_s_per_gpu"]),
        "GPU-h": fmt_number(r["predicted_gpu_hours"]),
        LABELS["status"]: r["status"],
    } for r in rows]
    return markdown(pd.DataFrame(cells))


def layout_text(row: dict[str, Any]) -> str:
    """``tp1 pp4 ep8 dp1`` (+ `` sp``; pp only when > 1), then the engine options that differ from their
    defaults."""
    pp = f" pp{row['pp']}" if row["pp"] > 1 else ""
    text = f"tp{row['tp']}{pp} ep{row['ep']} dp{row['dp']}" + (" sp" if row["sp"] else "")
    return text + (f" ({row['options']})" if row.get("options") else "")


def smallest_fitting(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and track (in plan order), the planned run with the fewest GPUs that does not run out of memory
    (fits or tight; among as many GPUs, the least memory needed), or the model and track alone (``run`` None)
    when none does."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["track"]), []).append(r)
    out = []
    for (model, track), group in groups.items():
        fitting = [r for r in group if r["fit"] != PREDICTED_OOM]
        best = min(fitting, key=lambda r: (r["gpus"], r["predicted_needed_mib"])) if fitting else None
        out.append({"model": model, "track": track, "runs": len(group), "run": best})
    return out


def smallest_table(rows: list[dict[str, Any]]) -> str:
    """One line per model and track: its smallest layout that fits (``smallest_fitting``)."""
    cells = []
    for entry in smallest_fitting(rows):
        r = entry["run"]
        cells.append({
            "model": entry["model"], "track": entry["track"],
            "smallest layout that fits": layout_text(r) if r else f"none of its {entry['runs']} runs",
            LABELS["gpus"]: fmt_number(r["gpus"]) if r else "",
            LABELS["nodes"]: fmt_number(r["nodes"]) if r else "",
            "needed": fmt_number(r["predicted_needed_mib"]) if r else "",
            "% of GPU": fmt_percent(r["memory_fraction"]) if r else "",
            "fit": r["fit"] if r else PREDICTED_OOM,
            "run": r["run_dir"] if r else "",
        })
    return markdown(pd.DataFrame(cells))


def render_plan(rows: list[dict[str, Any]], target: Target, source: str) -> str:
    hours = sum(r["predicted_gpu_hours"] for r in rows)
    runnable = sum(r["predicted_gpu_hours"] for r in rows if r["fit"] != PREDICTED_OOM)
    counts = {flag: sum(r["fit"] == flag for r in rows) for flag in (FITS, TIGHT, PREDICTED_OOM)}
    lines = [
        "# Plan: predicted memory and step time of every run",
        "",
        f"Configuration: {source}. Target GPU: {target.label}, {fmt_number(target.usable_gib)} GiB usable "
        f"({fmt_number(target.gpu_memory_mib)} MiB), {fmt_number(target.matmul_tflops)} TFLOP/s dense bf16 matmul. "
        "Nothing here was measured: formulas in `scripts/ftscale/estimate/memory.py` and `plan.py`, calibration in "
        "`docs/planner.md`. *needed* = peak + what the allocator cannot hand out + the engine's CUDA context.",
        "",
        f"**{len(rows)} runs: {counts[FITS]} fit, {counts[TIGHT]} tight (> {TIGHT_FRACTION:.0%}), "
        f"{counts[PREDICTED_OOM]} predicted OOM. GPU-hours of the whole sweep: {fmt_number(hours)} "
        f"({fmt_number(runnable)} without the predicted-OOM runs).**",
        "",
    ]
    if rows:
        lines += ["## The smallest layout that fits, per model and track", "",
                  "The fewest GPUs whose predicted need is within the usable memory (memory in MiB per GPU).", "",
                  smallest_table(rows), "", "## Every run", ""]
    lines += ["Memory per GPU in MiB; with pipeline parallelism (PP > 1), of the stage with the larger peak "
              "(the first: the embedding and PP micro-batches in flight; the last: the LM head and the logits).", ""]
    if rows:
        lines += [plan_table(rows), ""]
    return "\n".join(lines)


def write_plan(study: Study, csv_path: Path, md_path: Path, target: Target | None = None) -> list[dict[str, Any]]:
    """results/plan.csv (every column of ``PLAN_COLUMNS``) and results/plan.md (the table and the sweep's
    GPU-hours)."""
    target = target or Target.from_config(study.config)
    rows = plan_rows(study, target)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PLAN_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in PLAN_COLUMNS} for row in rows)
    md_path.write_text(render_plan(rows, target, study.source))
    return rows
