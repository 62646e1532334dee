"""The analyze stage: every planned run's record -> one frame (``ftscale.analyze.frame``) ->
results/scaling.csv, results/tables.md and the plots under results/plots/.

Each record gets its model FLOPs and MFU (``ftscale.analyze.frame.model_perf``), its verdicts against
config/references.yaml (``ftscale.analyze.references``), the planner's prediction against the config's
``plan`` target (``ftscale.analyze.frame.prediction_columns``) and its provenance
(``ftscale.analyze.provenance``): ``derive``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from ftscale.analyze.frame import Extras, build_frame, csv_frame, model_perf, prediction_columns
from ftscale.analyze.parse import NOT_FAILED, RunRecord, parse_run
from ftscale.analyze.plots import write_plots
from ftscale.analyze.provenance import device_name, environment, run_provenance
from ftscale.analyze.references import Reference, check, load_references
from ftscale.analyze.tables import render_tables
from ftscale.estimate.flops import peak_tflops_for
from ftscale.estimate.plan import Target
from ftscale.study.paths import RunPaths
from ftscale.study.run import Run
from ftscale.study.sweep import Study

REFERENCES = Path("config/references.yaml")
#: Rewritten when the main command starts and finds runs to redo; an input of the tables.
REDO_FILE = Path("results/redo.txt")
#: What the tables were built from: every run's files, by content (``run_fingerprints``); written by the
#: tables job after the tables.
TABLES_INPUTS = Path("results/logs/tables.inputs.json")
CHANGED = "changed since the tables were written"
#: The files of a run that the analysis reads.
ANALYSED_FILES = ("run", "log", "launch", "metrics")


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


def _not_run(run: Run) -> RunRecord:
    return RunRecord(run=run, status="not_run", reason="never configured", run_dir=run.directory)


def launch_record(record: RunRecord, root: Path = Path(".")) -> dict:
    """The run's launch.json ({} when absent)."""
    paths = RunPaths(root / record.run_dir)
    return json.loads(paths.launch.read_text()) if paths.launch.is_file() else {}


def reference_facts(record: RunRecord) -> dict:
    """The keys a reference entry's ``where`` can name, as this record has them."""
    run = record.run
    facts = {k: getattr(run, k) for k in ("model", "track", "gpus", "tp", "ep", "dp", "sp", "micro_batch",
                                          "global_batch", "seq_length", "scaling", "engine")}
    facts["run"] = run.name
    facts["device"] = peak_tflops_for(device_name(record.layout)).key
    return facts


def derive(study: Study, records: list[RunRecord], root: Path = Path("."),
           references: list[Reference] | None = None, env: dict | None = None) -> dict[str, Extras]:
    """Model FLOPs / MFU, reference flags, the planner's prediction and provenance of every record, by run
    directory. ``env``: the study-wide provenance (``provenance.environment``) when it is not this machine's,
    as for runs analysed again elsewhere (benchmarks/gpu/reanalyse_examples.py)."""
    env = env or environment(study.config, root)
    target = Target.from_config(study.config)
    out = {}
    for r in records:
        launch = launch_record(r, root)
        perf = model_perf(study.models[r.run.model].arch, r)
        measured = {"step_time_s": r.step_time_s, "tokens_per_s_per_gpu": r.tokens_per_s_per_gpu,
                    "peak_mem_mib": r.peak_mem_mib, "tflops_per_gpu": perf.tflops_per_gpu}
        ref = check(references or [], reference_facts(r), measured if r.status == "ok" else None)
        predicted = prediction_columns(study.models[r.run.model].spec, r, target)
        out[r.run_dir] = Extras(perf=perf, ref=ref, predicted=predicted,
                                provenance=run_provenance(r.layout, r.run, launch, env),
                                options=r.run.spec.options_label(r.run, r.layout or None))
    return out


def references_path(study: Study, root: Path = Path(".")) -> Path:
    return root / study.config.get("references", REFERENCES)


class ResultsError(OSError):
    """The results cannot be written (say, results/ is read-only): names the file."""


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        raise ResultsError(f"{err.filename or path}: cannot write: {err.strerror}") from None


def analysis_frame(study: Study, records: list[RunRecord], root: Path = Path("."),
                   env: dict | None = None) -> pd.DataFrame:
    """The frame every output reads (``ftscale.analyze.frame``)."""
    references = load_references(references_path(study, root))
    return build_frame(study, records, derive(study, records, root, references, env))


def _write_all(study: Study, records: list[RunRecord], csv_path: Path, tables_path: Path, plots_dir: Path,
               root: Path, env: dict | None = None) -> tuple[list[Path], pd.DataFrame]:
    frame = analysis_frame(study, records, root, env)
    for path in (csv_path, tables_path, plots_dir):
        try:
            (path if path is plots_dir else path.parent).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResultsError(f"{err.filename}: cannot create the results directory: {err.strerror}") from None
    try:
        csv_frame(frame).to_csv(csv_path, index=False, lineterminator="\n")
        plots = write_plots(study, frame, plots_dir)
        tables_path.write_text(render_tables(study, frame, plots, tables_path))
    except OSError as err:
        raise ResultsError(f"{err.filename}: cannot write the results: {err.strerror}") from None
    return [csv_path, tables_path, *plots.values()], frame





def write_results(study: Study, csv_path: Path, tables_path: Path, root: Path = Path("."),
                  plots_dir: Path | None = None, log: Path | None = None, env: dict | None = None) -> list[RunRecord]:
    """results/scaling.csv, results/tables.md and the plots (default: plots/ beside the tables).

    ``log`` gets the files written and, per run, its status, MFU note and reference entry; ``env`` as
    for ``derive``.
    """
    records = collect(study, root)
    written, frame = _write_all(study, records, csv_path, tables_path, plots_dir or tables_path.parent / "plots",
                                root, env)
    if log:
        lines = [f"wrote {p}" for p in written]
        for _, row in frame.iterrows():
            lines.append(f"{row['run_dir']}: {row['status']} {row['reason']}; MFU: {row['mfu_note']}; reference: "
                         f"{row['ref_name'] or 'none'}: {row['ref_summary']}")
        _write_text(Path(log), "\n".join(lines) + "\n")
    return records


def not_ok_message(records: list[RunRecord], tables_path: Path) -> str | None:
    """Why the workflow must end non-zero after writing the tables: the runs that are not ``ok`` (a run the
    plan skipped is no failure)."""
    bad = [r for r in records if r.status not in NOT_FAILED]
    if not bad:
        return None
    listed = "; ".join(f"{r.run_dir}: {r.status}" + (f" ({r.reason})" if r.reason else "") for r in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"{tables_path}: {len(bad)} of {len(records)} runs not ok: {listed}{more}. The tables are written "
            "(partial); run the same command again to redo these runs.")


class RunsNotOk(Exception):
    """A run of the tables is not ``ok``: the tables are written, and the workflow must end non-zero."""


def write_tables(study: Study, csv_path: Path, tables_path: Path, plots_dir: Path, log: Path,
                 root: Path = Path("."), inputs: Path = TABLES_INPUTS) -> list[RunRecord]:
    """The tables job: ``write_results`` and the record of what they were built from (``inputs``), then
    ``RunsNotOk`` naming the runs that are not ok, so that the workflow ends non-zero as after a failed job
    (Snakemake's onerror then rewrites the tables marked partial)."""
    records = write_results(study, csv_path, tables_path, root=root, plots_dir=plots_dir, log=log)
    write_tables_inputs(study, inputs, root)
    if message := not_ok_message(records, tables_path):
        raise RunsNotOk(message)
    return records


def write_partial_results(study: Study, csv_path: Path, tables_path: Path, root: Path = Path("."),
                          plots_dir: Path | None = None) -> None:
    """Tables after a failed workflow (called from Snakemake's onerror).

    The files are dated 1970 so that Snakemake sees them as older than the runs' inputs: the next
    invocation reruns what failed (Snakemake never reruns upstream jobs for an output that looks up
    to date, even when their outputs are missing) and then rewrites the tables.
    """
    try:
        records = collect(study, root)
        if all(r.status in NOT_FAILED for r in records):
            return  # every run is fine: what failed was elsewhere (e.g. the comparison); tables stay as they are
        written, _ = _write_all(study, records, csv_path, tables_path, plots_dir or tables_path.parent / "plots",
                                root)
        for path in written:
            os.utime(path, (1, 1))  # 1, not 0: Snakemake reads an mtime of 0 as "none"
        bad = sum(r.status not in NOT_FAILED for r in records)
        print(f"[ftscale] partial {tables_path} written: {bad} of {len(records)} runs not ok; run again to redo them")
    except Exception as err:  # noqa: BLE001 - a courtesy after a failure: never hide the original error
        print(f"[ftscale] could not write partial tables: {err}")


#: The tables' CSV of the last invocation: which runs had finished, for those whose directory is gone.
PREVIOUS_RESULTS = Path("results/scaling.csv")


def finished_before(root: Path = Path("."), previous: Path = PREVIOUS_RESULTS) -> set[tuple[str, str, str]]:
    """(track, model, run) of every ``ok`` row of the last results/scaling.csv (none when there is none or it
    cannot be read: then only the runs' own files tell)."""
    path = root / previous
    try:
        rows = pd.read_csv(path, usecols=["track", "model", "run", "status"], dtype=str)
    except (OSError, ValueError):  # no file yet (a first run), or one without these columns
        return set()
    ok = rows[rows["status"] == "ok"]
    return set(zip(ok["track"], ok["model"], ok["run"]))


def runs_to_redo(study: Study, root: Path = Path("."), previous: Path = PREVIOUS_RESULTS) -> dict[str, str]:
    """Run directory -> why it must run again: it had finished, and then its metrics.jsonl was deleted (its
    log still shows a finished run, or the last results list it ``ok``: its directory may be gone), or its log
    no longer shows a finished run although metrics.jsonl exists (the log was damaged after the run finished).
    A run that never ran or never finished is no run to do *again*: the workflow runs it anyway (none on a
    first run). A run the plan skipped is not redone while the plan still skips it."""
    redo = {}
    earlier = finished_before(root, previous)
    for run in study.runs:
        if not (root / run.paths.metrics).is_file():
            if (run.track, run.model, run.name) in earlier:
                redo[run.directory] = "metrics.jsonl missing (the last results list the run ok)"
            elif (root / run.paths.log).is_file() and _parsed_status(root / run.directory, root) == "ok":
                redo[run.directory] = "metrics.jsonl missing (the log shows a finished run)"
            continue
        try:
            record = parse_run(root / run.directory, root=root)
        except (ValueError, OSError) as err:  # ParseError, bad JSON, unreadable file
            redo[run.directory] = f"its files do not parse: {err}"
            continue
        if record.status != "ok" and not (record.status == "skipped" and run.skip_reason):
            redo[run.directory] = f"metrics.jsonl exists but the log says {record.status}: {record.reason}"
    return redo


def _parsed_status(run_dir: Path, root: Path) -> str:
    try:
        return parse_run(run_dir, root=root).status
    except (ValueError, OSError):
        return "unreadable"


def run_fingerprints(study: Study, root: Path = Path(".")) -> dict[str, dict[str, str | None]]:
    """Run directory -> file -> the SHA-256 of each file of ``ANALYSED_FILES`` (None when absent)."""
    out = {}
    for run in study.runs:
        files = {}
        for role in ANALYSED_FILES:
            path = root / getattr(run.paths, role)
            try:
                files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                files[path.name] = None
            except OSError as err:
                raise ResultsError(f"{path}: cannot read: {err.strerror}") from None
        out[run.directory] = files
    return out


def write_tables_inputs(study: Study, path: Path = TABLES_INPUTS, root: Path = Path(".")) -> None:
    _write_text(root / path, json.dumps({"runs": run_fingerprints(study, root)}, indent=1, sort_keys=True) + "\n")


def tables_inputs(path: Path) -> dict[str, dict] | None:
    """The run fingerprints the tables were built from (None when unknown: no file, or not readable)."""
    try:
        return json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def runs_to_do_again(study: Study, root: Path = Path("."), inputs: Path = TABLES_INPUTS) -> dict[str, str]:
    """What the tables must be rebuilt for, by run directory, though Snakemake sees nothing to do:
    ``runs_to_redo`` among the runs the tables were built from, and every such run whose files changed
    since (redone by hand, or the tables job failed after its runs finished). A run the tables were not
    built from needs no mark: the tables' set of input files changed, and Snakemake reruns them for it.
    Without a record of the tables' inputs (no tables yet), every run of ``runs_to_redo``. Reads only."""
    redo = runs_to_redo(study, root)
    built_from = tables_inputs(root / inputs)
    if built_from is None:
        return redo
    now = run_fingerprints(study, root)
    todo = {d: why for d, why in redo.items() if d in built_from}
    for directory, files in now.items():
        if directory in built_from and directory not in todo and built_from[directory] != files:
            changed = sorted(name for name in files if built_from[directory].get(name) != files[name])
            todo[directory] = f"{CHANGED}: {', '.join(changed)}"
    return todo


def check_writable(directory: Path) -> None:
    """ResultsError naming ``directory`` when no file can be created there (read-only, no permission)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ResultsError(f"{directory}: cannot write: {err.strerror}") from None


def mark_for_redo(study: Study, root: Path = Path("."), redo_file: Path = REDO_FILE,
                  inputs: Path = TABLES_INPUTS, write: bool = True) -> dict[str, str]:
    """Make Snakemake redo what ``runs_to_do_again`` finds, from the main command alone; returns it.
    With ``write=False`` (a dry run) nothing is changed: the runs are only returned.

    Snakemake reruns a job whose output is missing only when a job downstream of it runs too, and
    the tables, up to date by time stamps and checksums, would not ("Nothing to be done"). So
    ``redo_file``, an input of the tables, is rewritten (with the date: new content each time) when
    there is something to redo, and left alone otherwise: the tables run again, and with them every
    run whose metrics.jsonl is missing. A damaged run's metrics.jsonl, which its log contradicts, is
    moved aside to metrics.jsonl.stale (kept, not deleted) so that the run counts as missing.
    """
    todo = runs_to_do_again(study, root, inputs)
    path = root / redo_file
    if not write:
        return todo
    check_writable(path.parent)
    for directory in todo:
        metrics = root / RunPaths(Path(directory)).metrics
        if metrics.is_file() and not todo[directory].startswith(CHANGED):  # a damaged run, not a changed one
            metrics.replace(metrics.with_name(metrics.name + ".stale"))
    if todo or not path.exists():
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        lines = [f"# runs to do again, found when the workflow started at {stamp} (ftscale.analyze.results)"]
        lines += [f"{d}: {why}" for d, why in todo.items()]
        _write_text(path, "\n".join(lines) + "\n")
    return todo
