"""The analyze stage: every planned run's record -> results/scaling.csv, results/tables.md and the
plots under results/plots/.

Each record gets its model FLOPs and MFU (``ftscale.analyze.tables.model_perf``), its flags against
config/references.yaml (``ftscale.analyze.references``) and its provenance (``ftscale.analyze.provenance``): ``derive``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftscale.analyze.parse import RUN_KEYS, RunRecord, parse_run
from ftscale.analyze.plots import write_plots
from ftscale.analyze.provenance import device_name, environment, run_provenance
from ftscale.analyze.references import Reference, check, load_references
from ftscale.analyze.tables import Extras, model_perf, render_tables, write_csv
from ftscale.estimate.flops import peak_tflops_for
from ftscale.study.paths import RunPaths
from ftscale.study.sweep import Study

REFERENCES = Path("config/references.yaml")


def collect(study: Study, root: Path = Path(".")) -> list[RunRecord]:
    """One record per planned run, in plan order; a run that never started is ``not_run``."""
    records = []
    for run in study.runs:
        if (root / run.paths.run).is_file():
            record = parse_run(root / run.directory, root=root)
            record.run_dir = run.directory  # the run's identity, whatever the root
        else:
            record = _not_run(run)
        records.append(record)
    return records


def _not_run(run) -> RunRecord:  # type: ignore[no-untyped-def]
    d = run.to_dict()
    fields = {k: d[k] for k in RUN_KEYS}
    return RunRecord(run=run.name, status="not_run", reason="never configured", run_dir=run.directory,
                     scaling=run.scaling, weights=run.weights, **fields)


def run_files(study: Study, record: RunRecord, root: Path = Path(".")) -> tuple[dict, dict]:
    """The run's run.json (the plan's run dict when it never started) and launch.json ({} when absent)."""
    paths = RunPaths(root / record.run_dir)
    if paths.run.is_file():
        run_json = json.loads(paths.run.read_text())
    else:
        run_json = study.run_by_dir(record.run_dir).to_dict()
    launch = json.loads(paths.launch.read_text()) if paths.launch.is_file() else {}
    return run_json, launch


def reference_facts(record: RunRecord) -> dict:
    """The keys a reference entry's ``where`` can name, as this record has them."""
    facts = {k: getattr(record, k) for k in ("model", "track", "run", "gpus", "tp", "ep", "dp", "sp", "micro_batch",
                                             "global_batch", "seq_length", "scaling", "engine")}
    facts["device"] = peak_tflops_for(device_name(record.layout)).key
    return facts


def derive(study: Study, records: list[RunRecord], root: Path = Path("."),
           references: list[Reference] | None = None) -> dict[str, Extras]:
    """Model FLOPs / MFU, reference flags and provenance of every record, by run directory."""
    env = environment(study.config, root)
    out = {}
    for r in records:
        run_json, launch = run_files(study, r, root)
        perf = model_perf(study.models[r.model].arch, r, run_json.get("lora"))  # LoRA: None on the MP track
        measured = {"step_time_s": r.step_time_s, "tokens_per_s_per_gpu": r.tokens_per_s_per_gpu,
                    "peak_mem_mib": r.peak_mem_mib, "tflops_per_gpu": perf.tflops_per_gpu}
        ref = check(references or [], reference_facts(r), measured)
        out[r.run_dir] = Extras(perf=perf, ref=ref, provenance=run_provenance(r.layout, run_json, launch, env))
    return out


def references_path(study: Study, root: Path = Path(".")) -> Path:
    return root / study.config.get("references", REFERENCES)


def _write_all(study: Study, records: list[RunRecord], csv_path: Path, tables_path: Path, plots_dir: Path,
               root: Path, partial: bool = False) -> tuple[list[Path], dict[str, Extras]]:
    extras = derive(study, records, root, load_references(references_path(study, root)))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tables_path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(records, study, csv_path, extras)
    plots = write_plots(study, records, plots_dir)
    tables = render_tables(study, records, extras, plots, tables_path)
    if partial:
        tables = tables.replace("\n\n", f"\n\n{PARTIAL_NOTE}\n\n", 1)
    tables_path.write_text(tables)
    return [csv_path, tables_path, *plots.values()], extras


def write_results(study: Study, csv_path: Path, tables_path: Path, root: Path = Path("."),
                  plots_dir: Path | None = None, log: Path | None = None) -> list[RunRecord]:
    """results/scaling.csv, results/tables.md and the plots (default: plots/ beside the tables).

    ``log`` gets the files written and, per run, its status, MFU note and reference entry.
    """
    records = collect(study, root)
    written, extras = _write_all(study, records, csv_path, tables_path, plots_dir or tables_path.parent / "plots",
                                 root)
    if log:
        lines = [f"wrote {p}" for p in written]
        for r in records:
            x = extras[r.run_dir]
            lines.append(f"{r.run_dir}: {r.status} {r.reason}; MFU: {x.perf.mfu_note}; reference: "
                         f"{x.ref.entry.name if x.ref.entry else 'none'}: {x.ref.summary()}")
        Path(log).write_text("\n".join(lines) + "\n")
    return records


PARTIAL_NOTE = ("**Partial results**: some jobs failed or did not run (see the status column). Running the "
                "workflow again redoes only those runs and rewrites these tables.")


def write_partial_results(study: Study, csv_path: Path, tables_path: Path, root: Path = Path("."),
                          plots_dir: Path | None = None) -> None:
    """Tables after a failed workflow (called from Snakemake's onerror).

    The files are dated 1970 so that Snakemake sees them as older than the runs' inputs: the next
    invocation reruns what failed (Snakemake never reruns upstream jobs for an output that looks up
    to date, even when their outputs are missing) and then rewrites the tables.
    """
    try:
        records = collect(study, root)
        if all(r.status == "ok" for r in records):
            return  # every run is fine: what failed was elsewhere (e.g. the comparison); tables stay as they are
        written, _ = _write_all(study, records, csv_path, tables_path, plots_dir or tables_path.parent / "plots",
                                root, partial=True)
        for path in written:
            os.utime(path, (1, 1))  # 1, not 0: Snakemake reads an mtime of 0 as "none"
        bad = sum(r.status != "ok" for r in records)
        print(f"[ftscale] partial {tables_path} written: {bad} of {len(records)} runs not ok; run again to redo them")
    except Exception as err:  # noqa: BLE001 - a courtesy after a failure: never hide the original error
        print(f"[ftscale] could not write partial tables: {err}")
