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

FRAME_HINTS = ("ftscale", "peft", "transformers", "torch/_inductor", "torch/nn", "torch/")


def frame_label(frames: list[dict]) -> str:
    for hint in FRAME_HINTS:
        for f in frames:
            if hint in f.get("filename", ""):
                name = f["filename"].split("site-packages/")[-1].split("scripts/")[-1]
                return f"{name}:{f.get('line')} {f.get('name')}"
    return frames[0]["name"] if frames else "?"


def live_at_peak(snapshot: dict) -> tuple[float, dict[str, float], float]:
    """(peak MiB over the trace, MiB alive at the peak by frame, MiB alive before the recording)."""
    trace = [e for t in snapshot["device_traces"] for e in t]
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    freed_unknown = 0
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], frame_label(e.get("frames", [])))
            total += e["size"]
        elif e["action"] == "free_completed":
            if e["addr"] in live:
                total -= live.pop(e["addr"])[0]
            else:
                freed_unknown += e["size"]
        if total > peak:
            peak, at_peak = total, dict(live)
    allocated_now = sum(b["size"] for seg in snapshot["segments"] for b in seg["blocks"]
                        if b["state"] == "active_allocated")
    before = allocated_now - sum(size for size, _ in live.values()) + 0  # alive from before the recording
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
