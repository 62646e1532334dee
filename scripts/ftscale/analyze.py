"""The analyze stage: every planned run's record -> results/scaling.csv and results/tables.md."""

from __future__ import annotations

from pathlib import Path

from ftscale.config import Study
from ftscale.parse import RunRecord, parse_run
from ftscale.tables import render_tables, write_csv


def collect(study: Study, root: Path = Path(".")) -> list[RunRecord]:
    """One record per planned run, in plan order; a run that never started is ``not_run``."""
    return [parse_run(root / run.directory) if (root / run.directory / "run.json").is_file()
            else _not_run(run) for run in study.runs]


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
