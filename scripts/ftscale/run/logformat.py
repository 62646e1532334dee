"""The one line format every engine's per-step log uses (the parser reads it in ftscale.parse).

    [ftscale] step=3/12 loss=6.9312 step_time_s=0.1234 tokens=1024 tokens_per_s=8298.2 peak_mem_mib=455.1 reserved_mib=0.0 mem_kind=rss state_mib=1.904

- ``step``: optimizer step, 1-based, over the run's total steps;
- ``loss``: mean training loss of the step over all micro-batches and data-parallel ranks;
- ``step_time_s``: wall time of the whole optimizer step (all micro-batches, gradient sync and
  optimizer), synchronized across ranks;
- ``tokens``: tokens in the global batch; ``tokens_per_s`` = tokens / step_time_s (whole job);
- ``peak_mem_mib``: the largest peak over ranks: CUDA max allocated (``mem_kind=cuda``) or the
  process's peak resident set size on the CPU (``mem_kind=rss``); ``reserved_mib``: CUDA max
  reserved (0 on the CPU);
- ``state_mib``: the largest over ranks of the bytes a rank's parameters, gradients and optimizer
  state hold, summed from the tensors (DTensor shards counted locally) after the optimizer step: on
  the CPU too, so that TP and EP visibly divide it. Logs written before it existed lack it.

NeMo 2's own per-step line (its ProgressPrinter; memory fields with NEMO_LOG_MEMORY_USAGE=1) and NeMo
AutoModel's (``step N | ... | mem X GiB | tps T(P/gpu)``) are read back into the same records by
``parse_steps``: every pattern of a step line is in ``PATTERNS``.

Other lines: ``[ftscale] layout key=value ...`` (what the engine actually built, read back from the
model), ``[ftscale] done steps=N`` at a clean end, ``[ftscale] error=KIND message`` on failure.
"""

from __future__ import annotations

import re

PREFIX = "[ftscale]"


def step_line(step: int, steps: int, loss: float, step_time_s: float, tokens: int, peak_mem_mib: float,
              reserved_mib: float, mem_kind: str, state_mib: float | None = None) -> str:
    return (
        f"{PREFIX} step={step}/{steps} loss={loss:.6f} step_time_s={step_time_s:.6f} tokens={tokens} "
        f"tokens_per_s={tokens / step_time_s:.1f} peak_mem_mib={peak_mem_mib:.1f} "
        f"reserved_mib={reserved_mib:.1f} mem_kind={mem_kind}"
        + ("" if state_mib is None else f" state_mib={state_mib:.3f}")  # KiB: a tiny model's state is a few MiB
    )


def skipped_line(reason: str) -> str:
    """What a job the plan skipped writes instead of training (``ftscale.run.launch.skip_job``)."""
    return f"{PREFIX} skipped {' '.join(reason.split())}"


def kv_line(kind: str, **fields: object) -> str:
    return f"{PREFIX} {kind} " + " ".join(f"{k}={v}" for k, v in fields.items())


def error_line(kind: str, message: str) -> str:
    return f"{PREFIX} error={kind} {' '.join(message.split())[:500]}"


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is CUDA's OutOfMemoryError (by name: this module imports no torch)."""
    return type(err).__name__ == "OutOfMemoryError"


def failure_line(err: BaseException, rank: int) -> str:
    """The error line of an engine's job that ended with ``err`` on ``rank`` (``oom`` for CUDA's
    OutOfMemoryError, else ``failed``); the engines print it after the traceback."""
    return error_line("oom" if is_oom(err) else "failed", f"rank {rank}: {type(err).__name__}: {err}")


PATTERNS: dict[str, re.Pattern[str]] = {
    # ftscale.logformat (embedded engine)
    "embedded_step": re.compile(
        r"\[ftscale\] step=(?P<step>\d+)/(?P<steps>\d+) loss=(?P<loss>\S+) step_time_s=(?P<step_time_s>\S+) "
        r"tokens=(?P<tokens>\d+) tokens_per_s=\S+ peak_mem_mib=(?P<peak_mem_mib>\S+) "
        r"reserved_mib=(?P<reserved_mib>\S+) mem_kind=(?P<mem_kind>\w+)(?: state_mib=(?P<state_mib>\S+))?"
    ),
    "skipped": re.compile(r"\[ftscale\] skipped (?P<reason>.*)"),
    "layout": re.compile(r"\[ftscale\] layout (?P<fields>.*)"),
    "embedded_done": re.compile(r"\[ftscale\] done steps=(?P<steps>\d+)"),
    # Lightning's own end of Trainer.fit (NeMo 2): the run's steps done, whether or not the done line followed
    "lightning_max_steps": re.compile(r"`Trainer\.fit` stopped: `max_steps=(?P<steps>\d+)` reached"),
    # NeMo 2 ProgressPrinter; memory fields need NEMO_LOG_MEMORY_USAGE=1
    "nemo_step": re.compile(r"Training epoch \d+, iteration (?P<iteration>\d+)/(?P<last>\d+) \|.*"),
    "nemo_step_time": re.compile(r"train_step_timing in s: (?P<v>[-+.\deE]+)"),
    "nemo_loss": re.compile(r"reduced_train_loss: (?P<v>[-+.\deE]+|nan)"),
    "nemo_gbs": re.compile(r"global_batch_size: (?P<v>\d+)"),
    "nemo_mem_alloc": re.compile(r"max_memory_allocated: (?P<v>[-+.\deE]+)"),
    "nemo_mem_reserved": re.compile(r"max_memory_reserved: (?P<v>[-+.\deE]+)"),
    "nemo_tflops": re.compile(r"TFLOPS_per_GPU: (?P<v>[-+.\deE]+)"),
    # NeMo AutoModel's TrainFinetuneRecipeForNextTokenPrediction.log_train_metrics (0-based step;
    # mem = CUDA max allocated over the step, GiB; tps = tokens of the global batch, tail padding
    # excluded, over the wall time since the previous step's end)
    "automodel_step": re.compile(
        r"step (?P<step>\d+) \| epoch \d+ \| loss (?P<loss>\S+) \| grad_norm \S+ \| lr \S+ \| "
        r"mem (?P<mem_gib>[-+.\deE]+) GiB \| tps (?P<tps>[-+.\deE]+)\((?P<tps_per_gpu>[-+.\deE]+)/gpu\)"
    ),
}


def parse_layout(fields: str) -> dict:
    out: dict = {}
    for item in fields.split():
        key, _, value = item.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def parse_steps(text: str) -> tuple[list[dict], dict, bool]:
    """Per-step records (last attempt of each step), the layout line, and whether an end line was seen (the
    ``[ftscale] done`` line, or Lightning's ``max_steps`` reached)."""
    steps: dict[int, dict] = {}
    layout: dict = {}
    done = False
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a log cut mid-line: its last line is half-written
    for lineno, line in enumerate(lines, start=1):
        if m := PATTERNS["embedded_step"].search(line):
            rec = {k: (float(v) if k not in ("mem_kind",) else v) for k, v in m.groupdict().items() if v is not None}
            rec["step"], rec["steps"], rec["line"] = int(rec["step"]), int(rec["steps"]), lineno
            steps[rec["step"]] = rec
        elif m := PATTERNS["nemo_step"].search(line):
            rec = {"step": int(m["iteration"]) + 1, "steps": int(m["last"]) + 1, "line": lineno,
                   "mem_kind": "cuda"}
            for key, pattern in (("step_time_s", "nemo_step_time"), ("loss", "nemo_loss"), ("gbs", "nemo_gbs"),
                                 ("peak_mem_mib", "nemo_mem_alloc"), ("reserved_mib", "nemo_mem_reserved"),
                                 ("tflops_per_gpu", "nemo_tflops")):
                if found := PATTERNS[pattern].search(line):
                    rec[key] = float(found["v"])
            for key in ("peak_mem_mib", "reserved_mib"):
                if key in rec:
                    rec[key] /= 2**20  # NeMo logs bytes
            steps[rec["step"]] = rec
        elif m := PATTERNS["automodel_step"].search(line):
            # Step time from AutoModel's tokens/s and the batch of the layout line printed before training.
            tokens = layout.get("global_batch", 0) * layout.get("seq_length", 0)
            tps = float(m["tps"])
            rec = {"step": int(m["step"]) + 1, "steps": layout.get("steps"), "line": lineno, "mem_kind": "cuda",
                   "loss": float(m["loss"]), "peak_mem_mib": float(m["mem_gib"]) * 1024, "tokens_per_s": tps}
            if tokens and tps > 0:
                rec["tokens"], rec["step_time_s"] = float(tokens), tokens / tps
            steps[rec["step"]] = rec
        elif m := PATTERNS["layout"].search(line):
            layout = parse_layout(m["fields"])
            layout["line"] = lineno
        elif PATTERNS["embedded_done"].search(line) or PATTERNS["lightning_max_steps"].search(line):
            done = True
    return [steps[k] for k in sorted(steps)], layout, done
