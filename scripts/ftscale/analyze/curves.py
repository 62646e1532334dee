"""Two runs' loss curves side by side: how far one run's training loss is from a reference run's, window by
window of optimizer steps (``loss_gaps``), as a markdown table (``gap_table``).

    python3 -m ftscale.analyze.curves REFERENCE_RUN_DIR OTHER_RUN_DIR [--window 25]

Each run directory's train.log is read (its step lines, ``ftscale.run.logformat``); the two runs must have
logged the same steps. Window means are compared, not single steps: one step's loss moves with its batch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ftscale.analyze.tables import markdown
from ftscale.run.logformat import parse_steps


@dataclass(frozen=True)
class WindowGap:
    """Steps ``first``..``last`` (1-based, inclusive): each run's mean loss and the other's less the reference's."""

    first: int
    last: int
    reference: float
    other: float

    @property
    def gap(self) -> float:
        return self.other - self.reference

    @property
    def relative(self) -> float:
        return self.gap / self.reference


def step_losses(run_dir: Path) -> list[float]:
    """The loss of every step a run logged, in step order."""
    log = run_dir / "train.log"
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no train.log")
    steps, _, _ = parse_steps(log.read_text(errors="replace"))
    return [s["loss"] for s in sorted(steps, key=lambda s: s["step"])]


def loss_gaps(reference: Sequence[float], other: Sequence[float], window: int = 25) -> list[WindowGap]:
    """Window means of two loss curves of the same steps; the last window may be shorter."""
    if len(reference) != len(other):
        raise ValueError(f"the runs logged {len(reference)} and {len(other)} steps: not the same steps")
    if window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    gaps = []
    for start in range(0, len(reference), window):
        ref, oth = reference[start:start + window], other[start:start + window]
        gaps.append(WindowGap(start + 1, start + len(ref), sum(ref) / len(ref), sum(oth) / len(oth)))
    return gaps


def gap_table(gaps: Sequence[WindowGap], reference: str, other: str) -> str:
    rows = [{"steps": f"{g.first}-{g.last}", f"{reference} loss": f"{g.reference:.3f}", f"{other} loss": f"{g.other:.3f}",
             "difference": f"{g.gap:+.3f}", "relative": f"{g.relative:+.1%}"} for g in gaps]
    return markdown(pd.DataFrame(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--window", type=int, default=25)
    args = parser.parse_args(argv)
    try:
        gaps = loss_gaps(step_losses(args.reference), step_losses(args.other), args.window)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(gap_table(gaps, args.reference.name, args.other.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
