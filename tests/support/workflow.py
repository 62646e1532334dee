"""Helpers to run the real workflow in a temporary copy of the repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from paths import REPO

COPIED = ["Snakefile", "rules", "config", "models", "tests/config", "profiles"]


def copy_workflow(dest: Path) -> Path:
    """The workflow's own files (no imported checkpoints, experiments or results) in ``dest``."""
    for name in COPIED:
        src = REPO / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("model", "*.log", "*.tsv", "__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, env: dict | None = None, check: bool = True,
              timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["snakemake", *args], cwd=workdir, capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
