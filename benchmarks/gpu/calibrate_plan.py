"""Re-analyse the committed GPU examples (results/examples/) with the planner: predicted peak memory
and step time of each run against what it measured, with the error of each.

    PYTHONPATH=scripts python3 benchmarks/gpu/calibrate_plan.py      # prints the table (markdown)

tests/unit/estimate/test_plan.py runs the same comparison and holds the memory predictions to +-5% (and the OOM
runs to a predicted OOM on the GPU they ran on).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ftscale.estimate.plan import PREDICTED_OOM, Target, error_pct, gpu_for_device, predict
from ftscale.run.logformat import parse_steps
from ftscale.study.models import load_model
from ftscale.study.run import Run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "results" / "examples"

def built_layout(log: Path) -> dict | None:
    """The run's layout line as parsed (dtype and engine options as built), as the analysis passes it."""
    if not log.is_file():
        return None
    _, layout, _ = parse_steps(log.read_text(errors="replace"))
    return {k: v for k, v in layout.items() if k != "line"} or None


def device_model(rec: dict, example: Path) -> str:
    """The GPU a run ran on: as its log reports it, else (a run that failed before it said, such as an OOM while
    the model loaded) the machine's, the first field of provenance.txt's nvidia-smi line."""
    if rec["device_model"] not in ("", "unknown"):
        return rec["device_model"]
    return (example / "provenance.txt").read_text().splitlines()[0].split(",")[0].strip()


def calibration_rows(examples: Path = EXAMPLES, root: Path = ROOT) -> list[dict]:
    """One row per GPU run of every example (a CPU example's runs are no GPU's): measured and predicted peak
    memory and step time, errors in %."""
    rows = []
    for scaling in sorted(examples.glob("*/scaling.csv")):
        with scaling.open() as f:
            for rec in csv.DictReader(f):
                if rec["device"] == "cpu":
                    continue
                run_json = scaling.parent / "experiments" / rec["track"] / rec["model"] / rec["run"] / "run.json"
                run = Run.load(run_json)
                built = built_layout(run_json.parent / "train.log")
                target = Target(gpu=gpu_for_device(device_model(rec, scaling.parent)))
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
                    "predicted_oom": pred["fit"] == PREDICTED_OOM, "fit": pred["fit"],
                    "predicted_needed_mib": pred["predicted_needed_mib"],
                    "measured_step_time_s": measured_step, "predicted_step_time_s": pred["predicted_step_time_s"],
                    "step_error_pct": error_pct(pred["predicted_step_time_s"], measured_step),
                })
    return rows


def render(rows: list[dict]) -> str:
    def num(v: float | None, fmt: str, unit: str = "") -> str:
        return "" if v is None else format(v, fmt) + unit

    lines = ["| example, run | status | measured peak (MiB) | predicted (MiB) | error | needed (MiB) of usable "
             "| plan's verdict | measured step (s) | predicted (s) | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['example']}, {r['run']} | {r['status']} | {num(r['measured_peak_mem_mib'], ',.0f')} "
                     f"| {num(r['predicted_peak_mem_mib'], ',.0f')} | {num(r['mem_error_pct'], '+.1f', '%')} "
                     f"| {r['predicted_needed_mib']:,.0f} of {r['gpu_memory_mib']:,.0f} | {r['fit']} "
                     f"| {num(r['measured_step_time_s'], '.2f')} | {num(r['predicted_step_time_s'], '.2f')} "
                     f"| {num(r['step_error_pct'], '+.1f', '%')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render(calibration_rows()) + "\n")
