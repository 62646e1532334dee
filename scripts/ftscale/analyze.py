"""The analyze stage: every planned run's record -> results/scaling.csv and results/tables.md."""

from __future__ import annotations

import os
from pathlib import Path

from ftscale.config import Study
from ftscale.parse import RunRecord, parse_run
from ftscale.tables import render_tables, write_csv


def collect(study: Study, root: Path = Path(".")) -> list[RunRecord]:
    """One record per planned run, in plan order; a run that never started is ``not_run``."""
    records = []
    for run in study.runs:
        if (root / run.directory / "run.json").is_file():
            record = parse_run(root / run.directory)
            record.run_dir = run.directory  # the run's identity, whatever the root
        else:
            record = _not_run(run)
        records.append(record)
    return records


def _not_run(run) -> RunRecord:  # type: ignore[no-untyped-def]
    d = run.to_dict()
    fields = {k: d[k] for k in ("track", "model", "engine", "gpus", "tp", "ep", "dp", "sp", "micro_batch",
                                "global_batch", "seq_length", "steps", "warmup_steps")}
    return RunRecord(run=run.name, status="not_run", reason="never configured", run_dir=run.directory,
                     scaling=run.scaling, weights=run.weights, **fields)


def write_results(study: Study, csv_path: Path, tables_path: Path, root: Path = Path(".")) -> list[RunRecord]:
    records = collect(study, root)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(records, study, csv_path)
    tables_path.write_text(render_tables(study, records))
    return records


PARTIAL_NOTE = ("**Partial results**: some jobs failed or did not run (see the status column). Running the "
                "workflow again redoes only those runs and rewrites these tables.")


def write_partial_results(study: Study, csv_path: Path, tables_path: Path, root: Path = Path(".")) -> None:
    """Tables after a failed workflow (called from Snakemake's onerror).

    The files are dated 1970 so that Snakemake sees them as older than the runs' inputs: the next
    invocation reruns what failed (Snakemake never reruns upstream jobs for an output that looks up
    to date, even when their outputs are missing) and then rewrites the tables.
    """
    try:
        records = collect(study, root)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_csv(records, study, csv_path)
        tables = render_tables(study, records).replace("\n\n", f"\n\n{PARTIAL_NOTE}\n\n", 1)
        tables_path.write_text(tables)
        for path in (csv_path, tables_path):
            os.utime(path, (1, 1))  # 1, not 0: Snakemake reads an mtime of 0 as "none"
        bad = sum(r.status != "ok" for r in records)
        print(f"[ftscale] partial {tables_path} written: {bad} of {len(records)} runs not ok; run again to redo them")
    except Exception as err:  # noqa: BLE001 - a courtesy after a failure: never hide the original error
        print(f"[ftscale] could not write partial tables: {err}")
