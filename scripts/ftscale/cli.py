"""Command line of the workflow's jobs (what the rules and the standalone sbatch files call).

    ftscale import MODEL [--out DIR]                  the Hugging Face checkpoint, once (models/<m>/model)
    ftscale import-nemo MODEL [--out DIR] [--hf DIR] [--transformer-impl local]
                                                      NeMo's conversion of it, once (models/<m>/nemo)
    ftscale train RUN_DIR/run.json [--cpus N] [--log FILE] [--launch-record FILE]
    ftscale check-config FILE [FILE ...]              validate config files as the workflow would
    ftscale --version

Run from the workflow's root directory (the repository checkout): models/ and experiments/ are
found there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ftscale import __version__
from ftscale.importing.checkpoint import import_model
from ftscale.run.launch import run_job
from ftscale.study.models import load_model
from ftscale.study.paths import RunPaths
from ftscale.study.run import Run, RunFileError
from ftscale.study.schema import ConfigError
from ftscale.study.sweep import load_config_file
from ftscale.workflow import workflow_study


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
    return parser


def _check_config(files: list[Path]) -> int:
    """Each file read (file and line of a YAML error), merged as Snakemake merges --configfile FILE
    FILE ..., then the whole study validated and planned; prints the number of runs."""
    config: dict = {}
    for path in files:
        config = _merged(config, load_config_file(path))
    study = workflow_study(config, files, root=Path.cwd())
    print(f"{study.source}: valid: {len(study.runs)} runs of {len(study.models)} model(s)")
    return 0


def _merged(base: dict, update: dict) -> dict:
    """Snakemake's update_config: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
            return 0
        if args.command == "import-nemo":
            from ftscale.engines.nemo.convert import convert_to_nemo

            model = load_model(args.model, Path.cwd())
            convert_to_nemo(model, args.hf or model.checkpoint, args.out or model.paths.nemo_checkpoint,
                            {"transformer_impl": args.transformer_impl})
            return 0
        if args.command == "check-config":
            return _check_config(args.configfiles)
        return _train(args)
    except ConfigError as err:
        print(f"ftscale: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
