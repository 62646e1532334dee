"""What the configure_run rule writes into a run directory: run.json and run.sbatch."""

from __future__ import annotations

import json
from pathlib import Path


def write_text(text: str, path: str | Path, log: str | Path | None = None) -> None:
    Path(path).write_text(text)
    if log:
        with open(log, "a") as out:
            out.write(f"wrote {path}\n")


def write_run_files(run: dict, sbatch: str, run_path: str | Path, sbatch_path: str | Path,
                    log: str | Path | None = None) -> None:
    """The run's resolved configuration (read by the engines and the analysis) and its sbatch script."""
    write_text(json.dumps(run, indent=2, sort_keys=True) + "\n", run_path, log)
    write_text(sbatch, sbatch_path, log)
