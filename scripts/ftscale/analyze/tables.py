"""Aggregate run records into results/scaling.csv and the scaling tables of results/tables.md.

Scaling metrics (data-parallel track), for N GPUs against the 1-GPU run of the same model and batch:
- speedup S(N) = throughput(N) / throughput(1), throughput in tokens/s of the whole job;
- efficiency E(N) = S(N) / N.
For weak scaling (global batch grows with N) this is E = T(1) / T(N), T the step time; for strong
scaling (global batch fixed) it is E = T(1) / (N * T(N)). Both are the throughput ratio over N.
Rows that are not ``ok`` keep their status and reason; their derived columns stay blank.

Model FLOPs and MFU (``model_perf``), per record:
- FLOPs/token from ``ftscale.estimate.flops.training_flops_per_token`` (the run's model, sequence length and
  LoRA setting; full fine-tuning on the model-parallel track);
- TFLOP/s/GPU = tokens/s/GPU x FLOPs/token / 1e12;
- MFU = TFLOP/s/GPU / peak TFLOP/s of the device the run reported on its layout line
  (``ftscale.estimate.flops.peak_tflops_for``); blank with the reason where there is no peak (CPU, unknown GPU).

Every row also carries its reference flags (``ftscale.analyze.references``) and its provenance
(``ftscale.analyze.provenance``): ``Extras``, computed by ``ftscale.analyze.results.derive``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ftscale.analyze.parse import RunRecord
from ftscale.analyze.provenance import RUN_COLUMNS, STUDY_COLUMNS, device_name
from ftscale.analyze.references import METRICS, RefResult
from ftscale.estimate import flops as flops_mod
from ftscale.estimate.comm import CommBytes, comm_bytes_per_step, params_per_gpu
from ftscale.study.layout import Layout
from ftscale.study.sweep import Study

CSV_COLUMNS = [
    "schema_version", "participant",
    "track", "model", "run", "engine", "weights", "scaling", "gpus", "tp", "ep", "dp", "sp", "micro_batch",
    "global_batch", "seq_length", "steps", "warmup_steps", "steps_done", "step_time_s", "tokens_per_s",
    "tokens_per_s_per_gpu", "speedup", "efficiency", "flops_per_token", "tflops_per_gpu", "mfu", "mfu_note",
    "peak_mem_mib", "reserved_mib", "mem_kind", "wall_s", "loss_first", "loss_last", "status", "reason",
    *(f"ref_{m}" for m in METRICS), "ref_name", "ref_source",
    "source", *RUN_COLUMNS, *STUDY_COLUMNS,
]

MFU_FORMULA = ("TFLOP/s/GPU = tokens/s/GPU x FLOPs/token / 1e12; MFU = TFLOP/s/GPU / peak TFLOP/s of the run's "
               "device (dense bf16 tensor-core peak: " +
               ", ".join(f"{k} {v}" for k, v in flops_mod.PEAK_TFLOPS.items() if v) + "). FLOPs/token: model "
               "FLOPs of `scripts/ftscale/estimate/flops.py` (matrix multiplies only, full s x s attention scores)")
FLOPS_LORA = "LoRA: frozen weights 2 x forward, attention scores and adapters 3 x forward"
FLOPS_FULL = "full fine-tuning: 3 x forward"


@dataclass(frozen=True)
class Perf:
    """Model FLOPs of one record; ``mfu_note`` names the peak used, or why MFU is blank."""

    flops_per_token: int | None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    mfu_note: str = ""


@dataclass(frozen=True)
class Extras:
    """What the analysis adds to a record: model FLOPs, reference flags, provenance columns."""

    perf: Perf
    ref: RefResult = field(default_factory=lambda: RefResult(None))
    provenance: Mapping[str, object] = field(default_factory=dict)


def model_perf(arch: Mapping, record: RunRecord, lora: Mapping | None) -> Perf:
    """FLOPs/token, TFLOP/s/GPU and MFU of one record (formulas in the module docstring).

    ``lora`` is the run's LoRA setting (run.json), ``None`` for full fine-tuning.
    """
    per_token = flops_mod.training_flops_per_token(arch, record.seq_length, lora).total
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


def _si(value: float | None) -> str:
    """2183168 -> '2.18 M' (FLOPs per token span 1e6 to 1e11)."""
    if value is None:
        return ""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _perf_cells(x: Extras) -> list[object]:
    return [_si(x.perf.flops_per_token), x.perf.tflops_per_gpu, _pct(x.perf.mfu)]


def perf_note(extras: Iterable[Extras], lora: bool) -> str:
    """The formula under a table, and why any MFU cell of it is blank."""
    blank = sorted({x.perf.mfu_note for x in extras if x.perf.mfu is None and x.perf.tflops_per_gpu is not None})
    peaks = sorted({x.perf.mfu_note for x in extras if x.perf.mfu is not None})
    out = f"{MFU_FORMULA}; {FLOPS_LORA if lora else FLOPS_FULL}."
    if peaks:
        out += " MFU against: " + "; ".join(peaks) + "."
    if blank:
        out += " MFU blank: " + "; ".join(blank) + "."
    return out


def reference_note(extras: Iterable[Extras]) -> str:
    """The reference entries a table's flags come from (name: source)."""
    entries = {x.ref.entry.name: x.ref.entry for x in extras if x.ref.entry is not None}
    if not entries:
        return ("Reference: no entry of `config/references.yaml` matches these runs (flag `no reference`).")
    return "Reference (`config/references.yaml`, bounds value x (1 + lower) .. value x (1 + upper)): " + "; ".join(
        f"`{name}`: {e.source.strip()}" for name, e in entries.items())


def dp_section(study: Study, records: dict[str, RunRecord], model: str, extras: Mapping[str, Extras]) -> str:
    parts = []
    for mode, runs in study.scaling_groups(model).items():
        recs = [records[r.directory] for r in runs]
        sc = scaling(recs)
        header = ["GPUs", "micro batch", "global batch", "step time (s)", "tokens/s", "tokens/s/GPU",
                  "speedup", "efficiency", "FLOPs/token", "TFLOP/s/GPU", "MFU", "peak mem/GPU (MiB)",
                  "wall-clock (s)", "reference", "status"]
        rows = [[r.gpus, r.micro_batch, r.global_batch, r.step_time_s, r.tokens_per_s, r.tokens_per_s_per_gpu,
                 speedup, eff, *_perf_cells(extras[r.run_dir]), _mem(r), r.wall_s,
                 extras[r.run_dir].ref.summary(), _status(r)] for r, (speedup, eff) in zip(recs, sc)]
        definition = ("E = T(1) / T(N), T the median step time (global batch grows with N)" if mode.startswith("weak")
                      else "E = T(1) / (N x T(N)), T the median step time (global batch fixed)")
        group = [extras[r.run_dir] for r in recs]
        parts.append(f"#### {model}: {mode} scaling\n\n{markdown_table(header, rows)}\n\n"
                     f"Speedup = tokens/s(N) / tokens/s(1); efficiency {definition}.\n\n"
                     f"{perf_note(group, lora=True)}\n\n{reference_note(group)}")
    return "\n\n".join(parts)


def comm_per_step(study: Study, r: RunRecord) -> CommBytes:
    """Analytic bytes communicated per step per GPU (ftscale.estimate.comm), in the run's precision."""
    run = study.run_by_dir(r.run_dir) if r.run_dir in {x.directory for x in study.runs} else None
    bf16 = (r.layout.get("dtype") == "bfloat16") or (run is not None and run.precision == "bf16")
    nbytes = 2 if bf16 else 4
    return comm_bytes_per_step(study.models[r.model].arch, Layout(tp=r.tp, ep=r.ep, dp=r.dp, sp=r.sp),
                               micro_batch=r.micro_batch, seq_length=r.seq_length,
                               grad_accum=r.global_batch // (r.micro_batch * r.ep * r.dp),
                               act_bytes=nbytes, grad_bytes=nbytes, lora=None)


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


def mp_section(study: Study, records: dict[str, RunRecord], model: str, extras: Mapping[str, Extras]) -> str:
    recs = [records[r.directory] for r in study.runs_of("model_parallel") if r.model == model]
    if not recs:
        return ""
    ok_mem = [r.peak_mem_mib for r in recs if r.status == "ok" and r.peak_mem_mib]
    smallest = min(ok_mem) if ok_mem else None
    header = ["GPUs", "TP", "EP", "SP", "DP", "step time (s)", "tokens/s", "tokens/s/GPU", "FLOPs/token",
              "TFLOP/s/GPU", "MFU", "peak mem/GPU (MiB)", "mem vs smallest", "params/GPU (run)",
              "params/GPU (formula)", "TP comm (MiB)", "EP all-to-all (MiB)", "DP all-reduce (MiB)", "reference",
              "status"]
    rows = []
    recs = sorted(recs, key=lambda r: (r.gpus, r.tp, r.ep))
    for r in recs:
        rel = r.peak_mem_mib / smallest if (smallest and r.peak_mem_mib and r.status == "ok") else None
        comm = comm_per_step(study, r)
        tp_comm = comm.tp_allreduce + comm.tp_allgather + comm.tp_reducescatter
        rows.append([r.gpus, r.tp, r.ep, r.sp, r.dp, r.step_time_s, r.tokens_per_s, r.tokens_per_s_per_gpu,
                     *_perf_cells(extras[r.run_dir]), _mem(r), rel, r.layout.get("params_per_rank"),
                     params_per_gpu(study.models[model].arch, r.tp, r.ep), _mib(tp_comm), _mib(comm.ep_alltoall),
                     _mib(comm.dp_allreduce), extras[r.run_dir].ref.summary(), _status(r)])
    note = ("Communication: analytic bytes sent per GPU per optimizer step (ring collectives; formulas in "
            "`scripts/ftscale/estimate/comm.py`): TP = all-reduces, or all-gather + reduce-scatter with SP, of the "
            "activations (4 per layer and micro-batch); EP = dispatch and combine all-to-all of the routed "
            "tokens, forward and backward; DP = one gradient all-reduce (non-expert weights over ep x dp "
            "replicas, experts over dp). params/GPU (run) is read back from the sharded model.")
    group = [extras[r.run_dir] for r in recs]
    return (f"#### {model}: model parallel (full fine-tuning)\n\n{markdown_table(header, rows)}\n\n{note}\n\n"
            f"{perf_note(group, lora=False)}\n\n{reference_note(group)}")


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


def csv_row(r: RunRecord, x: Extras, speedup: float | None, efficiency: float | None) -> dict:
    """One row of results/scaling.csv (columns ``CSV_COLUMNS``)."""
    row = r.to_dict()
    row.update(speedup=speedup, efficiency=efficiency, flops_per_token=x.perf.flops_per_token,
               tflops_per_gpu=x.perf.tflops_per_gpu, mfu=x.perf.mfu, mfu_note=x.perf.mfu_note,
               ref_name=x.ref.entry.name if x.ref.entry else "",
               ref_source=" ".join(x.ref.entry.source.split()) if x.ref.entry else "")
    row.update({f"ref_{m}": x.ref.flag(m) for m in METRICS})
    row.update(x.provenance)
    return row


def write_csv(records: list[RunRecord], study: Study, path: Path, extras: Mapping[str, Extras]) -> None:
    sc = scaling_by_dir(study, {r.run_dir: r for r in records})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(csv_row(r, extras[r.run_dir], *sc.get(r.run_dir, (None, None))))
    path.write_text(buf.getvalue())


def provenance_section(records: list[RunRecord], extras: Mapping[str, Extras]) -> str:
    """Who ran the study, on what, with which software (the per-row values are in the CSV)."""
    def values(key: str) -> str:
        found = sorted({str(extras[r.run_dir].provenance.get(key, "")) for r in records} - {"", "None"})
        return ", ".join(f"`{v}`" for v in found) or "-"

    dates = sorted(str(extras[r.run_dir].provenance.get("date")) for r in records
                   if extras[r.run_dir].provenance.get("date"))
    versions = ", ".join(f"{lib} {values(f'{lib}_version')}" for lib in ("ftscale", "torch", "transformers",
                                                                          "peft", "nemo"))
    rows = [["participant", values("participant")], ["devices (as the runs report them)", values("device")],
            ["device models", values("device_model")], ["hosts", values("host")],
            ["git commit", values("git_commit")], ["container", values("container")],
            [f"versions (from the {values('versions_from').strip('`')})", versions],
            ["runs started", f"{dates[0]} .. {dates[-1]}" if dates else "-"],
            ["CSV schema_version", values("schema_version")]]
    return "## Provenance\n\n" + markdown_table(["", ""], rows)


def plots_section(plots: Mapping[str, Path], tables_path: Path) -> str:
    """Relative links from tables.md to the plots (``plots``: title -> PNG path)."""
    lines = ["## Plots", ""]
    for title, path in plots.items():
        rel = os.path.relpath(path, tables_path.parent).replace(os.sep, "/")
        lines.append(f"- [{title}]({rel})")
    lines.append("\nFailed runs are left out of the plots (their rows above keep the reason).")
    return "\n".join(lines)


def render_tables(study: Study, records: list[RunRecord], extras: Mapping[str, Extras],
                  plots: Mapping[str, Path] | None = None, tables_path: Path = Path("results/tables.md")) -> str:
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
    if plots:
        out += ["", plots_section(plots, tables_path)]
    if study.config["tracks"]["data_parallel"]["enabled"]:
        out += ["", "## Data parallel (LoRA)", ""]
        out += [dp_section(study, by_dir, m, extras) + "\n" for m in study.models]
    if study.config["tracks"]["model_parallel"]["enabled"] and study.runs_of("model_parallel"):
        out += ["", "## Model parallel (full fine-tuning)", ""]
        out += [s + "\n" for m in study.models if (s := mp_section(study, by_dir, m, extras))]
        if comparison := dense_vs_moe(study, records):
            out.append(comparison + "\n")
    out += ["", provenance_section(records, extras)]
    return "\n".join(out).rstrip() + "\n"
