"""results/tables.md from the analysis frame (``ftscale.analyze.frame``): what people read.

One table per model and track, its sweep parameters as columns, sorted; a parameter that is the
same in every row of a table is stated once above it instead. Each definition and note is written
once, under the section it explains: the MFU formula in the introduction, speedup and efficiency
under data parallel, the communication formulas under model parallel, oversubscription (which may
touch both tracks) in the introduction, the reference entries, the runs that are not ``ok`` and those
the plan skipped in their own sections after the tables. Each table has the model state per GPU and
the plan's errors against the measurement (``STATE_COLUMNS``); on a GPU the peak memory (CUDA max
allocated) leads, on the CPU the model state does and the process's RSS follows it
(``memory_columns``): the flat RSS, mostly the runtime, would hide what TP and EP divide. An
efficiency above 1 says whether it is within its 1-GPU run's step-time spread (noise) or beyond it.
Every number goes through ``fmt_number`` (a fraction through ``fmt_percent``) and every table through
``markdown``, and a column shared by several tables has one header (``LABELS``): the same for
results/tables.md, results/comparison.md (``ftscale.analyze.compare``) and results/plan.md
(``ftscale.analyze.plan_report``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from ftscale.analyze.frame import BEYOND_SPREAD, NOISE, scaling_rows
from ftscale.analyze.parse import NOT_FAILED
from ftscale.analyze.provenance import LIBRARIES
from ftscale.analyze.references import ASPECTS
from ftscale.estimate import flops as flops_mod
from ftscale.study.sweep import Study

TRACK_TITLES = {"data_parallel": "Data parallel (LoRA)", "model_parallel": "Model parallel (full fine-tuning)"}
MFU_FORMULA = ("TFLOP/s/GPU = tokens/s/GPU x FLOPs/token / 1e12; MFU = TFLOP/s/GPU / the dense bf16 tensor-core "
               "peak of the device the run reports (" +
               ", ".join(f"{k} {v}" for k, v in flops_mod.PEAK_TFLOPS.items() if v) + " TFLOP/s). FLOPs/token: "
               "model FLOPs of `scripts/ftscale/estimate/flops.py` (matrix multiplies only, full s x s attention "
               "scores).")
FLOPS_LORA = "FLOPs/token with LoRA: frozen weights 2 x forward, attention scores and adapters 3 x forward."
FLOPS_FULL = "FLOPs/token of full fine-tuning: 3 x forward."
SCALING_DEFINITIONS = {
    "weak": "weak scaling (global batch grows with N): efficiency = T(1) / T(N)",
    "strong": "strong scaling (global batch fixed): efficiency = T(1) / (N x T(N))",
}
COMM_NOTE = ("GPUs = TP x EP x DP. Communication: analytic MiB sent per GPU per optimizer step (ring collectives; "
             "formulas in `scripts/ftscale/estimate/comm.py`): TP = all-reduces, or all-gather + reduce-scatter with "
             "SP, of the activations (4 per layer and micro-batch); EP = dispatch and combine all-to-all of the "
             "routed tokens, forward and backward; DP = one gradient all-reduce (non-expert weights over ep x dp "
             "replicas, experts over dp). params/GPU (run) is read back from the sharded model.")
PREDICTION_NOTE = ("*model state/GPU*: the bytes a rank's parameters, gradients and optimizer state hold, summed "
                   "from the tensors (the largest rank). *error* columns: the plan's prediction "
                   "(`ftscale.estimate.plan`, from the run's configuration and the dtype it built; the predicted "
                   "values are the `predicted_*` columns of `results/scaling.csv`) against what the run measured, "
                   "(predicted - measured) / measured.")
PREDICTION_CPU_NOTE = ("On the CPU the predicted peak memory and step time are those of a GPU: the measured RSS and "
                       "CPU step time are not compared with them; the model state is.")
NOISE_NOTE = ("*noise*: an efficiency above 1 by no more than the step-time spread of its 1-GPU run ((max - min) / "
              "median of that run's timed steps, column `step_time_spread`): noise of the baseline's median, not "
              "super-linear scaling.")
BEYOND_SPREAD_NOTE = ("*beyond spread*: an efficiency above 1 by more than the 1-GPU run's step-time spread: a "
                      "baseline slower than its steps' spread explains (look at that run's log), or real "
                      "super-linear scaling (a per-GPU batch that fits a cache better).")
OVERSUBSCRIBED_NOTE = ("*oversubscribed*: the job had fewer CPUs than processes per node, so its processes shared "
                       "CPUs: its step time measures that sharing, not the scaling of the method.")


def fmt_number(value: object) -> str:
    """The one number format: blank for none, thousands separated, else 3 significant digits
    (7445.3 -> '7,445'; 279168 -> '279,168'; 2.2046 -> '2.2'; 0.030492 -> '0.0305')."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 100):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _num(value: object) -> str:
    return fmt_number(value.item() if hasattr(value, "item") else value)


def fmt_percent(value: object) -> str:
    """The one format of a fraction: blank for none, else a percentage with one decimal (0.1234 -> '12.3%')."""
    return "" if value is None or pd.isna(value) else f"{float(value):.1%}"


#: The header of a column wherever a table shows it (tables.md, comparison.md, plan.md).
LABELS = {
    "gpus": "GPUs", "nodes": "nodes", "tp": "TP", "pp": "PP", "ep": "EP", "dp": "DP", "sp": "SP",
    "micro_batch": "micro batch",
    "seq_length": "sequence", "global_batch": "global batch", "step_time_s": "step time (s)", "tokens_per_s": "tokens/s",
    "tokens_per_s_per_gpu": "tokens/s/GPU", "tflops_per_gpu": "TFLOP/s/GPU", "mfu": "MFU",
    "peak_mem_mib": "peak mem/GPU (MiB)", "state_mib": "model state/GPU (MiB)", "status": "status",
}


def _status(row: pd.Series) -> str:
    return row["status"] if row["status"] == "ok" or not row["reason"] else f"{row['status']}: {row['reason']}"


def _cpus(row: pd.Series) -> str:
    cpus = row.get("cpus")
    if cpus is None or pd.isna(cpus):
        return ""
    return _num(int(cpus)) + (" (oversubscribed)" if row.get("oversubscribed") is True else "")


def _mem_kind(row: pd.Series) -> str:
    return {"rss": "RSS", "cuda": "CUDA max allocated"}.get(row.get("mem_kind") or "", "")


def _efficiency(row: pd.Series) -> str:
    """The efficiency, with the verdict of ``frame.scaling_rows`` where it is above 1 ('1.12 (noise: spread 18%)')."""
    text = _num(row["efficiency"])
    verdict = row.get("above_ideal") or ""
    if verdict:
        spread = row.get("baseline_spread")
        text += f" ({verdict}" + ("" if spread is None or pd.isna(spread) else f": 1-GPU spread {fmt_percent(spread)}") + ")"
    return text


def markdown(table: pd.DataFrame) -> str:
    """A frame of display strings as a Markdown table (pandas' to_markdown)."""
    return table.to_markdown(index=False, disable_numparse=True)


Cell = Callable[[pd.Series], str]


def column(name: str) -> Cell:
    return lambda row: _num(row[name])


def labelled(name: str) -> tuple[str, Cell]:
    """The column ``name`` under its header of ``LABELS``, in the one number format."""
    return LABELS[name], column(name)


def error(name: str) -> Cell:
    """A prediction's error in % with its sign ('+2.4%'), blank where it is not compared."""
    return lambda row: "" if row[name] is None or pd.isna(row[name]) else f"{float(row[name]):+.1f}%"


def render(rows: pd.DataFrame, columns: list[tuple[str, Cell]], movable: set[str]) -> str:
    """The ``columns`` (header, cell) of ``rows`` as a table; a ``movable`` column that has one value in
    every row is stated once above the table instead ('micro batch 4; sequence 128')."""
    cells = pd.DataFrame({header: rows.apply(cell, axis=1) if len(rows) else [] for header, cell in columns})
    constant = [h for h in cells.columns if h in movable and cells[h].nunique() == 1]
    line = "; ".join(f"{h} {cells[h].iloc[0]}" for h in constant if cells[h].iloc[0])
    table = markdown(cells.drop(columns=constant))
    return f"{line}\n\n{table}" if line else table


def _reference_column(rows: pd.DataFrame) -> list[tuple[str, Cell]]:
    """The reference column, only for a table that has a reference entry."""
    if rows["ref_name"].fillna("").eq("").all():
        return []
    return [("reference", lambda row: row["ref_summary"])]


def nodes_column(rows: pd.DataFrame) -> tuple[str, Cell]:
    """The nodes of each run, shown only where a run of the table spans several (a table of one-node runs has
    no such column, nor a "nodes 1" line)."""
    nodes = pd.to_numeric(rows["nodes"], errors="coerce") if len(rows) else pd.Series(dtype=float)
    if not (nodes > 1).any():
        return ("nodes", lambda row: "")
    return ("nodes", lambda row: _num(int(row["nodes"])))


def _perf_columns() -> list[tuple[str, Cell]]:
    return [("FLOPs/token", column("flops_per_token")), labelled("tflops_per_gpu"),
            (LABELS["mfu"], lambda row: fmt_percent(row["mfu"]))]


BATCH_COLUMNS: list[tuple[str, Cell]] = [
    ("engine", lambda row: row["engine"]),
    ("options", lambda row: row.get("engine_options") or ""),
    labelled("micro_batch"),
    labelled("seq_length"),
]
#: Model state and the prediction's errors (blank where not compared: such a column is left out).
STATE_COLUMNS: list[tuple[str, Cell]] = [
    labelled("state_mib"), ("state error", error("state_error_pct")),
    ("peak mem error", error("peak_mem_error_pct")), ("step time error", error("step_time_error_pct")),
]
RSS_HEADER = "process RSS (MiB)"
MOVABLE = {"scaling", "engine", "options", LABELS["micro_batch"], LABELS["seq_length"], "FLOPs/token", "peak memory", "CPUs", "nodes",
           *(header for header, _ in STATE_COLUMNS)}


def on_cpu(rows: pd.DataFrame) -> bool:
    """Whether the rows' peak memory is all the process's RSS (CPU runs), none CUDA's."""
    kinds = set(rows["mem_kind"].dropna()) - {""}
    return kinds == {"rss"}


def memory_columns(rows: pd.DataFrame, relative: tuple[tuple[str, Cell], ...] = ()) -> list[tuple[str, Cell]]:
    """The memory columns of a table: on a GPU the peak (CUDA max allocated) first, then ``relative`` and the
    model state; on the CPU the model state first, then ``relative``, then the process's peak RSS, marked as
    such (flat across layouts: mostly the runtime, not what TP and EP divide)."""
    if on_cpu(rows):
        return [STATE_COLUMNS[0], *relative, *STATE_COLUMNS[1:], (RSS_HEADER, column("peak_mem_mib"))]
    return [labelled("peak_mem_mib"), ("peak memory", _mem_kind), *relative, *STATE_COLUMNS]


def dp_table(study: Study, frame: pd.DataFrame, model: str) -> str:
    rows = scaling_rows(study, frame)
    rows = rows[rows["model"] == model].sort_values(["engine", "option_set", "mode", "micro_batch", "seq_length", "gpus"])
    columns: list[tuple[str, Cell]] = [
        ("scaling", lambda row: row["mode"]), *BATCH_COLUMNS, labelled("gpus"), nodes_column(rows), ("CPUs", _cpus),
        labelled("global_batch"), labelled("step_time_s"), labelled("tokens_per_s"), labelled("tokens_per_s_per_gpu"),
        ("speedup", column("speedup")), ("efficiency", _efficiency), *_perf_columns(), *memory_columns(rows),
        ("wall-clock (s)", column("wall_s")), *_reference_column(rows), (LABELS["status"], _status),
    ]
    return render(rows, columns, MOVABLE)


def mp_table(frame: pd.DataFrame, model: str) -> str:
    rows = frame[(frame["track"] == "model_parallel") & (frame["model"] == model)]
    rows = rows.sort_values(["engine", "micro_batch", "seq_length", "gpus", "tp", "ep", "sp"])
    cpu = on_cpu(rows)
    measure = "state_mib" if cpu else "peak_mem_mib"  # what the table leads with (``memory_columns``)
    ok_mem = pd.to_numeric(rows.loc[rows["status"].eq("ok"), measure], errors="coerce").dropna()
    smallest = ok_mem.min() if len(ok_mem) else None

    def vs_smallest(row: pd.Series) -> str:
        if not smallest or row["status"] != "ok" or pd.isna(row[measure]):
            return ""
        return _num(row[measure] / smallest)

    columns: list[tuple[str, Cell]] = [
        *BATCH_COLUMNS, labelled("gpus"), nodes_column(rows), ("CPUs", _cpus), labelled("tp"), labelled("ep"),
        (LABELS["sp"], lambda row: fmt_number(bool(row["sp"]))), labelled("dp"),
        labelled("global_batch"), labelled("step_time_s"), labelled("tokens_per_s"), labelled("tokens_per_s_per_gpu"),
        *_perf_columns(),
        *memory_columns(rows, (("state vs smallest" if cpu else "mem vs smallest", vs_smallest),)),
        ("params/GPU (run)", column("params_per_gpu")),
        ("params/GPU (formula)", column("params_per_gpu_formula")), ("TP comm (MiB)", column("comm_tp_mib")),
        ("EP all-to-all (MiB)", column("comm_ep_mib")), ("DP all-reduce (MiB)", column("comm_dp_mib")),
        *_reference_column(rows), (LABELS["status"], _status),
    ]
    return render(rows, columns, MOVABLE)


def layout_label(row: pd.Series) -> str:
    return f"tp{row['tp']} ep{row['ep']} dp{row['dp']}" + (" sp" if row["sp"] else "")


def best_layouts(study: Study, frame: pd.DataFrame) -> pd.DataFrame:
    """Per model and GPU count (and engine, option set and batch shape), the model-parallel layout with the most
    tokens/s/GPU among the ``ok`` runs, with ``kind`` (dense or MoE), ``layout`` and ``layouts`` (how
    many were tried). Only GPU counts where a dense and a MoE model both have one: like with like."""
    mp = frame[(frame["track"] == "model_parallel") & frame["status"].eq("ok")
               & frame["tokens_per_s_per_gpu"].notna()].copy()
    if mp.empty:
        return mp.assign(kind=[], layout=[], layouts=[])
    mp["kind"] = mp["model"].map(lambda m: "MoE" if study.models[m].is_moe else "dense")
    mp["layout"] = mp.apply(layout_label, axis=1)
    like = ["engine", "option_set", "micro_batch", "seq_length", "gpus"]
    mp["layouts"] = mp.groupby([*like, "model"])["run"].transform("count")
    best = mp.sort_values("tokens_per_s_per_gpu", ascending=False).drop_duplicates([*like, "model"])
    both = best.groupby(like)["kind"].transform("nunique").eq(2)
    return best[both].sort_values([*like, "kind", "model"])


def dense_vs_moe_section(study: Study, frame: pd.DataFrame) -> str:
    best = best_layouts(study, frame)
    if best.empty:
        return ""
    columns: list[tuple[str, Cell]] = [
        *BATCH_COLUMNS, labelled("gpus"), ("model", lambda row: row["model"]), ("kind", lambda r: r["kind"]),
        ("best layout", lambda row: row["layout"]), ("layouts run", column("layouts")),
        labelled("tokens_per_s_per_gpu"),
        *([labelled("state_mib"), (RSS_HEADER, column("peak_mem_mib"))] if on_cpu(best)
          else [labelled("peak_mem_mib"), ("peak memory", _mem_kind)]),
    ]
    return ("### Dense vs mixture of experts\n\nAt each GPU count where both ran, each model's model-parallel layout "
            "with the most tokens/s/GPU (the same points as the plot `dense_vs_moe.png`, which labels them).\n\n"
            + render(best, columns, MOVABLE))


def mfu_notes(frame: pd.DataFrame) -> str:
    """Which peaks the MFU column is against, and why any of it is blank."""
    measured = frame["tflops_per_gpu"].notna()
    peaks = sorted(set(frame.loc[measured & frame["mfu"].notna(), "mfu_note"]))
    blank = sorted(set(frame.loc[measured & frame["mfu"].isna(), "mfu_note"]))
    out = ""
    if peaks:
        out += " MFU against: " + "; ".join(peaks) + "."
    if blank:
        out += " MFU blank: " + "; ".join(blank) + "."
    return out


def track_section(study: Study, frame: pd.DataFrame, track: str) -> list[str]:
    rows = frame[frame["track"] == track]
    if rows.empty:
        return []
    out = [f"## {TRACK_TITLES[track]}", ""]
    if track == "data_parallel":
        modes = [m for m in SCALING_DEFINITIONS if m in set(scaling_rows(study, frame)["mode"])]
        several = rows.get("option_set", pd.Series(dtype=object)).fillna("").ne("").any()
        same = "engine, option set," if several else "engine,"
        out += [f"Speedup = tokens/s(N) / tokens/s(1 GPU) of the same {same} scaling mode and batch shape; "
                "efficiency = speedup / N, T the median step time: "
                + "; ".join(SCALING_DEFINITIONS[m] for m in modes) + ". " + FLOPS_LORA, ""]
        verdicts = set(scaling_rows(study, frame)["above_ideal"])
        for verdict, note in ((NOISE, NOISE_NOTE), (BEYOND_SPREAD, BEYOND_SPREAD_NOTE)):
            if verdict in verdicts:
                out += [note, ""]
    else:
        out += [COMM_NOTE + " " + FLOPS_FULL, ""]
    for model in study.models:
        if (rows["model"] == model).any():
            table = dp_table(study, frame, model) if track == "data_parallel" else mp_table(frame, model)
            out += [f"### {model} ({TRACK_TITLES[track].split(' (')[0].lower()})", "", table, ""]
    if track == "model_parallel" and (section := dense_vs_moe_section(study, frame)):
        out += [section, ""]
    return out


def not_ok_section(frame: pd.DataFrame) -> list[str]:
    """The runs that failed (redone by the next invocation), then those the plan skipped (no failure)."""
    out = []
    bad = frame[~frame["status"].isin(NOT_FAILED)]
    if not bad.empty:
        out += ["## Runs not ok", "", "Their rows above keep the status; their figures stay blank and the plots leave "
                "them out. Running the workflow again redoes them and rewrites these tables.", ""]
        out += [f"- `{row['run_dir']}`: {_status(row)}" for _, row in bad.iterrows()] + [""]
    skipped = frame[frame["status"].eq("skipped")]
    if not skipped.empty:
        out += ["## Runs skipped", "", "Not trained: the plan predicts them out of memory on the target GPU "
                "(`plan.skip_predicted_oom`; `results/plan.md` has the prediction). Their rows above keep the status; "
                "their measured figures stay blank.", ""]
        out += [f"- `{row['run_dir']}`: {_status(row)}" for _, row in skipped.iterrows()] + [""]
    return out


def references_section(frame: pd.DataFrame) -> list[str]:
    matched = frame[frame["ref_name"].fillna("") != ""].drop_duplicates("ref_name")
    out = ["## Reference values", ""]
    if matched.empty:
        return out + ["No entry of `config/references.yaml` matches these runs.", ""]
    out += ["From `config/references.yaml`: one verdict per aspect, " + " and ".join(
        f"{a} ({', '.join(m)})" for a, m in ASPECTS.items()) + ": `within` value x (1 + lower) .. value x "
        "(1 + upper), `below`, `above`; the deviation in brackets where it is 1 % or more. Entries that match:", ""]
    out += [f"- `{row.ref_name}`: {row.ref_source}" for row in matched.itertuples()]
    return out + [""]


def plots_section(plots: Mapping[str, Path], tables_path: Path) -> list[str]:
    """Relative links from tables.md to the plots (``plots``: title -> PNG path)."""
    out = ["## Plots", "", "Runs that are not `ok` are left out of the plots, never drawn as zero; the loss curves "
           "draw the steps such a run logged, dashed.", ""]
    for title, path in plots.items():
        out.append(f"- [{title}]({os.path.relpath(path, tables_path.parent).replace(os.sep, '/')})")
    return out + [""]


def provenance_section(frame: pd.DataFrame) -> list[str]:
    """Who ran the study, on what, with which software (the per-row values are in the CSV)."""
    def values(key: str) -> str:
        found = sorted({str(v) for v in frame.get(key, pd.Series(dtype=object)).dropna()} - {"", "None"})
        return ", ".join(f"`{v}`" for v in found) or "-"

    dates = sorted(d for d in frame["date"].dropna() if d)
    versions = ", ".join(f"{lib} {values(f'{lib}_version')}" for lib in LIBRARIES)
    rows = [["participant", values("participant")], ["devices (as the runs report them)", values("device")],
            ["device models", values("device_model")], ["hosts", values("host")],
            ["git commit", values("git_commit")], ["container", values("container")],
            [f"versions (from the {values('versions_from').strip('`')})", versions],
            ["runs started", f"{dates[0]} .. {dates[-1]}" if dates else "-"],
            ["CSV schema_version", values("schema_version")]]
    return ["## Provenance", "", markdown(pd.DataFrame(rows, columns=["", " "])), ""]


def render_tables(study: Study, frame: pd.DataFrame, plots: Mapping[str, Path] | None = None,
                  tables_path: Path = Path("results/tables.md")) -> str:
    counts = frame["status"].value_counts().sort_index()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    out = ["# Fine-tuning scaling study", "",
           f"Configuration: `{study.source}`; engine `{study.config['engine']}`; {len(frame)} runs ({summary}).", ""]
    bad = int((~frame["status"].isin(NOT_FAILED)).sum())
    if bad:
        out += [f"**Partial results**: {bad} of {len(frame)} runs not ok (see *Runs not ok* below).", ""]
    intro = ("Every figure comes from a run's own log; `results/scaling.csv` names the log lines (column `source`). "
             "Step time is the median over the steps after the warm-up. " + MFU_FORMULA + mfu_notes(frame))
    if frame["device"].eq("cpu").any():
        intro += (" On the CPU a \"GPU\" is a process; CPUs is how many CPUs the job had, shared by its processes; "
                  "its tables lead with the model state per process, which TP and EP divide, and give the "
                  "process's peak resident set size (process RSS, mostly the runtime) after it.")
    out += [intro, ""]
    if frame["oversubscribed"].eq(True).any():
        out += [OVERSUBSCRIBED_NOTE, ""]
    out += [PREDICTION_NOTE + (" " + PREDICTION_CPU_NOTE if frame["mem_kind"].eq("rss").any() else ""), ""]
    synthetic = sorted(set(frame.loc[frame["weights"] == "synthetic", "model"]))
    if synthetic:
        out += [f"Models with synthetic (seeded random) weights: {', '.join(synthetic)}: step time and memory "
                "are real, losses are not those of the pretrained model.", ""]
    for track in ("data_parallel", "model_parallel"):
        out += track_section(study, frame, track)
    out += not_ok_section(frame)
    out += references_section(frame)
    if plots:
        out += plots_section(plots, tables_path)
    out += provenance_section(frame)
    return "\n".join(out).rstrip() + "\n"
