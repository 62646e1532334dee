"""Render the workflow's graph of rules to a file: SVG through graphviz's dot, else Mermaid text."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def rulegraph(fmt: str, configfiles: list[str], target: str = "results/tables.md") -> str:
    """``snakemake --rulegraph`` of this workflow (run without taking the lock: a rule calls it)."""
    cmd = ["snakemake", "--nolock", "--quiet", "all", "--rulegraph", fmt, target]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def render(out: Path, configfiles: list[str]) -> None:
    """``out`` ending .svg needs dot (Debian's graphviz); .mmd is Mermaid (GitHub renders it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".mmd":
        out.write_text(rulegraph("mermaid-js", configfiles))
        return
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError(f"{out}: rendering SVG needs graphviz's `dot` (apt-get install graphviz); "
                           "without it, ask for results/dag.mmd (Mermaid) instead")
    svg = subprocess.run([dot, "-Tsvg"], input=rulegraph("dot", configfiles), capture_output=True, text=True,
                         check=True).stdout
    out.write_text(svg)


def default_target() -> str:
    """results/dag.svg where dot exists, else results/dag.mmd."""
    return "results/dag.svg" if shutil.which("dot") else "results/dag.mmd"
