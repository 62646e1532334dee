"""What is allocated at the peak of a CUDA memory snapshot (``profile_step.py --memory-snapshot``): the
allocator's trace replayed, and the blocks alive at the highest total, grouped by the innermost frame of
this repository, transformers, peft or torch that allocated them.

    python3 benchmarks/gpu/memory_at_peak.py SNAPSHOT.pickle [--top 25]

Blocks allocated before the recording began are counted as one "before the recording" group (their
size is the recording's first total, taken from the snapshot's segments less what the trace frees).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import defaultdict

#: Where an allocation is attributed: the innermost Python frame in one of these (the source line Dynamo keeps for
#: compiled code), else the innermost Python frame, else the autograd function of a C++-only stack (backward).
FRAME_HINTS = ("transformers/", "peft/", "ftscale/", "torch/_inductor", "torch/nn/functional", "torch/autograd",
               "torch/_functorch")


def frame_label(frames: list[dict]) -> str:
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    for f in python:
        if any(hint in f["filename"] for hint in FRAME_HINTS):
            return f"{f['filename'].split('site-packages/')[-1].split('scripts/')[-1]}:{f.get('line')} {f.get('name')}"
    if python:
        return f"{python[0]['filename'].rsplit('/', 1)[-1]}:{python[0].get('line')} {python[0].get('name')}"
    autograd = [f["name"] for f in frames if "autograd" in f.get("name", "")]
    return f"C++ {autograd[0][:90]}" if autograd else "C++ (no Python frame)"


def live_at_peak(snapshot: dict) -> tuple[float, dict[str, float], float]:
    """(peak MiB: alive from before the recording plus the trace's highest total; MiB alive at the trace's peak by
    frame; MiB alive from before the recording)."""
    trace = [e for t in snapshot["device_traces"] for e in t]
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], frame_label(e.get("frames", [])))
            total += e["size"]
        elif e["action"] == "free_completed":
            if e["addr"] in live:
                total -= live.pop(e["addr"])[0]
        if total > peak:
            peak, at_peak = total, dict(live)
    allocated_now = sum(b["size"] for seg in snapshot["segments"] for b in seg["blocks"]
                        if b["state"] == "active_allocated")
    before = allocated_now - sum(size for size, _ in live.values())  # alive from before the recording
    groups: dict[str, float] = defaultdict(float)
    for size, label in at_peak.values():
        groups[label] += size / 2**20
    return (peak / 2**20 + before / 2**20), dict(groups), before / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    peak, groups, before = live_at_peak(snapshot)
    print(f"peak {peak:,.0f} MiB: {before:,.0f} MiB alive from before the recording, then by frame:")
    for label, mib in sorted(groups.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{mib:10,.1f} MiB  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
