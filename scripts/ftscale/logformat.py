"""The one line format every engine's per-step log uses (the parser reads it in ftscale.parse).

    [ftscale] step=3/12 loss=6.9312 step_time_s=0.1234 tokens=1024 tokens_per_s=8298.2 peak_mem_mib=455.1 reserved_mib=0.0 mem_kind=rss

- ``step``: optimizer step, 1-based, over the run's total steps;
- ``loss``: mean training loss of the step over all micro-batches and data-parallel ranks;
- ``step_time_s``: wall time of the whole optimizer step (all micro-batches, gradient sync and
  optimizer), synchronized across ranks;
- ``tokens``: tokens in the global batch; ``tokens_per_s`` = tokens / step_time_s (whole job);
- ``peak_mem_mib``: the largest peak over ranks: CUDA max allocated (``mem_kind=cuda``) or the
  process's peak resident set size on the CPU (``mem_kind=rss``); ``reserved_mib``: CUDA max
  reserved (0 on the CPU).

Other lines: ``[ftscale] layout key=value ...`` (what the engine actually built, read back from the
model), ``[ftscale] done steps=N`` at a clean end, ``[ftscale] error=KIND message`` on failure.
"""

from __future__ import annotations

PREFIX = "[ftscale]"


def step_line(step: int, steps: int, loss: float, step_time_s: float, tokens: int, peak_mem_mib: float,
              reserved_mib: float, mem_kind: str) -> str:
    return (
        f"{PREFIX} step={step}/{steps} loss={loss:.6f} step_time_s={step_time_s:.6f} tokens={tokens} "
        f"tokens_per_s={tokens / step_time_s:.1f} peak_mem_mib={peak_mem_mib:.1f} "
        f"reserved_mib={reserved_mib:.1f} mem_kind={mem_kind}"
    )


def kv_line(kind: str, **fields: object) -> str:
    return f"{PREFIX} {kind} " + " ".join(f"{k}={v}" for k, v in fields.items())


def error_line(kind: str, message: str) -> str:
    return f"{PREFIX} error={kind} {' '.join(message.split())[:500]}"
