"""Command line of the workflow's jobs (what the rules and the standalone sbatch files call).

    ftscale import MODEL [--out DIR] [--engine embedded|nemo]
    ftscale train RUN_DIR/run.json [--cpus N] [--log FILE] [--launch-record FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ftscale.config import ConfigError, load_model
from ftscale.launch import run_job
from ftscale.models import import_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a model into models/<name>/model/ (once)")
    imp.add_argument("model")
    imp.add_argument("--out", type=Path, help="default: models/<name>/model")
    imp.add_argument("--engine", default="embedded", choices=["embedded", "nemo"])
    train = sub.add_parser("train", help="run one training job from its run.json")
    train.add_argument("run_json", type=Path)
    train.add_argument("--log", type=Path, help="default: train.log beside run.json")
    train.add_argument("--launch-record", type=Path, help="default: launch.json beside run.json")
    train.add_argument("--cpus", type=int, help="CPUs of the job, shared equally by its ranks (default: all available)")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            model = load_model(args.model, Path.cwd())
            import_model(model, args.out or model.checkpoint, root=Path.cwd(), engine=args.engine)
            return 0
        run_dir = args.run_json.parent
        return run_job(args.run_json, args.log or run_dir / "train.log", args.launch_record or run_dir / "launch.json",
                       cpus=args.cpus)
    except ConfigError as err:
        print(f"ftscale: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
