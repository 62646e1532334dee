"""Command line of the workflow's jobs (what the rules and the standalone sbatch files call).

    ftscale import MODEL [--out DIR]                  the Hugging Face checkpoint, once (models/<m>/model)
    ftscale import-nemo MODEL [--out DIR] [--hf DIR] [--transformer-impl local]
                                                      NeMo's conversion of it, once (models/<m>/nemo)
    ftscale train RUN_DIR/run.json [--cpus N] [--log FILE] [--launch-record FILE]
    ftscale check-config FILE [FILE ...]              validate config files as the workflow would
    ftscale status [--configfile FILE ...] [--json]   every run of the study: its state, step and time left
    ftscale --version

Run from the workflow's root directory (the repository checkout): models/ and experiments/ are
found there.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from ftscale import __version__
from ftscale.importing.checkpoint import import_model
from ftscale.run.launch import run_job
from ftscale.study.models import load_model
from ftscale.study.paths import RunPaths
from ftscale.study.run import Run, RunFileError
from ftscale.study.schema import ConfigError
from ftscale.workflow import DEFAULT_CONFIGFILE, study_of_files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ftscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a model into models/<name>/model/ (once)")
    imp.add_argument("model")
    imp.add_argument("--out", type=Path, help="default: models/<name>/model")
    nemo = sub.add_parser("import-nemo", help="convert the imported model to a NeMo 2 checkpoint (once)")
    nemo.add_argument("model")
    nemo.add_argument("--out", type=Path, help="default: models/<name>/nemo")
    nemo.add_argument("--hf", type=Path, help="the Hugging Face import to convert (default: models/<name>/model)")
    nemo.add_argument("--transformer-impl", default="transformer_engine", choices=["transformer_engine", "local"])
    train = sub.add_parser("train", help="run one training job from its run.json")
    train.add_argument("run_json", type=Path)
    train.add_argument("--log", type=Path, help="default: train.log beside run.json")
    train.add_argument("--launch-record", type=Path, help="default: launch.json beside run.json")
    train.add_argument("--cpus", type=int, help="CPUs of the job, shared equally by its ranks (default: all available)")
    check = sub.add_parser("check-config", help="validate config files as `snakemake --configfile FILE ...` would",
                           description="Snakemake reads --configfile itself, before the workflow starts, and its "
                           "message for a YAML syntax error names neither the file nor the line: this does.")
    check.add_argument("configfiles", nargs="+", type=Path, metavar="FILE")
    status = sub.add_parser("status", help="every run of the study: its state, Slurm job, step and time left",
                            description="The study as `snakemake [--configfile FILE ...]` runs it, from the "
                            "workflow's root directory: each run's state (planned, skipped, queued, running, ok, "
                            "failed, cancelled, interrupted, unknown), its Slurm job and nodes, and for a running "
                            "run its step and the time left (median step time so far x steps left).")
    status.add_argument("--configfile", nargs="+", type=Path, default=[DEFAULT_CONFIGFILE], metavar="FILE",
                        dest="configfiles", help=f"as Snakemake's --configfile (default: {DEFAULT_CONFIGFILE})")
    status.add_argument("--json", action="store_true", help="one JSON object: the summary and every run")
    return parser


def _check_config(files: list[Path]) -> int:
    """The files read and merged as Snakemake merges --configfile FILE FILE ..., then the whole study validated
    and planned; prints the number of runs."""
    study = study_of_files(files, root=Path.cwd())
    print(f"{study.source}: valid: {len(study.runs)} runs of {len(study.models)} model(s)")
    return 0


def _status(files: list[Path], as_json: bool) -> int:
    """The state of every run of the study (``ftscale.analyze.status``), Slurm asked first."""
    from ftscale.analyze.jobs import query_squeue  # the tables' pandas, which a training job need not load
    from ftscale.analyze.status import render_status, study_states, summary

    root = Path.cwd()
    study = study_of_files(files, root=root)
    view = query_squeue()
    states = study_states(study, root, view)
    if as_json:
        print(json.dumps({"source": study.source, "summary": summary(states), "slurm": view.note or "squeue",
                          "runs": [s.to_dict() for s in states]}, indent=2))
    else:
        print(render_status(states, view))
    return 0


def _train(args: argparse.Namespace) -> int:
    if not args.run_json.is_file():
        raise ConfigError(f"{args.run_json}: no such run file (a run directory's run.json, written by the workflow)")
    try:
        Run.load(args.run_json)
    except RunFileError as err:
        raise ConfigError(str(err)) from None
    paths = RunPaths(args.run_json.parent)
    return run_job(args.run_json, args.log or paths.log, args.launch_record or paths.launch, cpus=args.cpus)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "import":
            model = load_model(args.model, Path.cwd())
            import_model(model, args.out or model.checkpoint, root=Path.cwd())
            gc.freeze()  # the exit's garbage collections would walk every object torch made
            return 0
        if args.command == "import-nemo":
            from ftscale.engines.nemo.convert import convert_to_nemo

            model = load_model(args.model, Path.cwd())
            convert_to_nemo(model, args.hf or model.checkpoint, args.out or model.paths.nemo_checkpoint,
                            {"transformer_impl": args.transformer_impl})
            return 0
        if args.command == "check-config":
            return _check_config(args.configfiles)
        if args.command == "status":
            return _status(args.configfiles, args.json)
        return _train(args)
    except ConfigError as err:
        print(f"ftscale: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
