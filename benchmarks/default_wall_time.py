"""Wall time of the embedded default from scratch: import, every run, analysis.

    python benchmarks/default_wall_time.py [--cores N]

Copies the workflow into a temporary directory (no imported models, no experiments), runs
`snakemake --cores N results/tables.md` there, and prints the wall time, the job count and the
table's run count; the machine's cores and the versions are printed with it.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from workflow import copy_workflow, snakemake  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="all")
    args = parser.parse_args()
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = copy_workflow(Path(tmp))
        start = time.perf_counter()
        proc = snakemake(work, "results/tables.md", "--cores", args.cores)
        wall = time.perf_counter() - start
        rows = list(csv.DictReader((work / "results/scaling.csv").open()))
        jobs = (proc.stdout + proc.stderr).count("rule train:")
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"embedded default (config/config.yaml), --cores {args.cores}: {wall:.1f} s wall, "
          f"{ok}/{len(rows)} runs ok, {jobs} training jobs")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
