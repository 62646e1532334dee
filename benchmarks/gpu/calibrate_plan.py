"""Re-analyse the committed GPU examples (results/examples/) with the planner: predicted peak memory
and step time of each run against what it measured, with the error of each.

    PYTHONPATH=scripts python3 benchmarks/gpu/calibrate_plan.py      # prints the table (markdown)

tests/test_plan.py runs the same comparison and holds the predictions to +-15% (and the OOM run to OOM).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ftscale.estimate.plan import PREDICTED_OOM, Target, error_pct, predict
from ftscale.run.logformat import parse_steps
from ftscale.study.models import load_model
from ftscale.study.run import Run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "results" / "examples"

#: Memory of the GPUs the examples ran on, GiB (torch's total_memory: H100 80GB HBM3 81,559 MiB;
#: H200 143,771 MiB).
DEVICE_MEMORY_GIB = {"NVIDIA H100 80GB HBM3": 81559 / 1024, "NVIDIA H200": 143771 / 1024}


def built_layout(log: Path) -> dict | None:
    """The run's layout line as parsed (dtype and engine options as built), as the analysis passes it."""
    if not log.is_file():
        return None
    _, layout, _ = parse_steps(log.read_text(errors="replace"))
    return {k: v for k, v in layout.items() if k != "line"} or None


def calibration_rows(examples: Path = EXAMPLES, root: Path = ROOT) -> list[dict]:
    """One row per run of every example: measured and predicted peak memory and step time, errors in %."""
    rows = []
    for scaling in sorted(examples.glob("*/scaling.csv")):
        with scaling.open() as f:
            for rec in csv.DictReader(f):
                run_json = scaling.parent / "experiments" / rec["track"] / rec["model"] / rec["run"] / "run.json"
                run = Run.load(run_json)
                built = built_layout(run_json.parent / "train.log")
                target = Target(gpu_memory_gib=DEVICE_MEMORY_GIB[rec["device_model"]])
                pred = predict(run, load_model(rec["model"], root).spec, target=target, built=built)
                measured_mem = float(rec["peak_mem_mib"]) if rec["peak_mem_mib"] else None
                measured_step = float(rec["step_time_s"]) if rec["step_time_s"] else None
                options = run.engine_options
                rows.append({
                    "example": scaling.parent.name, "run": rec["run"], "status": rec["status"],
                    "compile": bool(options.get("compile")),
                    "activation_checkpointing": bool(options.get("activation_checkpointing")),
                    "gpu_memory_mib": target.gpu_memory_mib,
                    "measured_peak_mem_mib": measured_mem, "predicted_peak_mem_mib": pred["predicted_peak_mem_mib"],
                    "mem_error_pct": error_pct(pred["predicted_peak_mem_mib"], measured_mem),
                    "predicted_oom": pred["fit"] == PREDICTED_OOM,
                    "measured_step_time_s": measured_step, "predicted_step_time_s": pred["predicted_step_time_s"],
                    "step_error_pct": error_pct(pred["predicted_step_time_s"], measured_step),
                })
    return rows


def render(rows: list[dict]) -> str:
    def num(v: float | None, fmt: str, unit: str = "") -> str:
        return "" if v is None else format(v, fmt) + unit

    lines = ["| example, run | status | measured peak (MiB) | predicted (MiB) | error | measured step (s) "
             "| predicted (s) | error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (" (predicted OOM)" if r["predicted_oom"] else "")
        lines.append(f"| {r['example']}, {r['run']} | {status} | {num(r['measured_peak_mem_mib'], ',.0f')} "
                     f"| {num(r['predicted_peak_mem_mib'], ',.0f')} | {num(r['mem_error_pct'], '+.1f', '%')} "
                     f"| {num(r['measured_step_time_s'], '.2f')} | {num(r['predicted_step_time_s'], '.2f')} "
                     f"| {num(r['step_error_pct'], '+.1f', '%')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render(calibration_rows()) + "\n")
