"""Parse one run's files into a record: pure functions, path in, record out.

Every pattern lives in ``PATTERNS`` (per-step metrics, layout read-back, the end of a run) and
``FAILURES`` (what went wrong, first match wins), for both engines' log formats. A run that claims
to be complete but lacks a metric raises ``ParseError`` naming the file and the pattern: never a
silent zero. Warm-up steps are left out of the step-time median; a restarted log (steps seen
again) keeps the last attempt; a truncated log yields status ``incomplete``. Only an ``ok`` run has
figures: a failed, killed or incomplete one keeps its status, reason, steps done and wall time, and
nothing it measured before it stopped but the loss of each step it logged (``RunRecord.losses``, for the
loss curves: a loss is what the step computed, whatever happened after it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ftscale.run.logformat import PATTERNS, parse_steps
from ftscale.study.paths import RunPaths
from ftscale.study.run import Run

# (status, reason, pattern): the first that matches names what went wrong. Triton's OutOfMemoryError "out of
# resource" is a kernel configuration asking for more shared memory than the GPU has: Inductor's max-autotune
# logs it for each configuration it drops, and the run goes on, so it is no OOM.
FAILURES: list[tuple[str, str, re.Pattern[str]]] = [
    ("oom", "out of GPU memory", re.compile(
        r"\[ftscale\] error=oom|CUDA out of memory|OutOfMemoryError(?!: out of resource)")),
    ("failed", "Slurm time limit", re.compile(r"DUE TO TIME LIMIT")),
    ("failed", "node failure", re.compile(r"DUE TO NODE FAILURE|NODE_FAIL")),
    # the job cancelled (scancel), not one of its steps: srun --kill-on-bad-exit cancels the step of a run across
    # nodes when one node's torchrun fails ("*** STEP 9.0 ON n1 CANCELLED AT"), and that failure is the reason
    ("cancelled", "cancelled", re.compile(r"\[ftscale\] error=cancelled|\*\*\* JOB \d+ ON \S+ CANCELLED AT")),
    ("failed", "NCCL timeout", re.compile(r"Watchdog caught collective operation timeout|NCCL.{0,80}timed? ?out", re.I)),
    ("failed", "NCCL error", re.compile(r"NCCL error|ncclInternalError|ncclSystemError|ncclUnhandledCudaError")),
    ("failed", "missing checkpoint", re.compile(
        r"(FileNotFoundError|OSError).{0,200}(checkpoint|model|config\.json|No such file)|"
        r"does not appear to have a file named|Can't load the (model|configuration)")),
    ("failed", "a rank was killed (SIGKILL: out of host memory?)", re.compile(r"Signal 9 \(SIGKILL\)|exitcode\s*:\s*-9")),
    ("failed", "error", re.compile(r"\[ftscale\] error=(?P<kind>\w+) (?P<msg>.*)")),
    # last: a rendezvous lost after a rank failed (the node that served it lost its torchrun) is a consequence,
    # and that rank's failure is the reason; with no rank's failure in the log, the nodes never met
    ("failed", "the nodes never all met at the rendezvous (torchrun's c10d rendezvous timed out or its host was "
     "unreachable)", re.compile(r"Rendezvous(Timeout|Connection)Error")),
]

#: Statuses that are no failure: ``skipped`` is the plan's decision (``plan.skip_predicted_oom``), not the
#: run's fault; the workflow neither fails nor redoes such a run.
NOT_FAILED = ("ok", "skipped")

#: The run's fields every row repeats (its identity, batch and schedule), after its name (column ``run``).
RUN_KEYS = ("track", "model", "engine", "gpus", "tp", "ep", "dp", "sp", "micro_batch", "global_batch", "seq_length",
            "steps", "warmup_steps")


class ParseError(ValueError):
    """A run that claims completion lacks a metric: names the file and the pattern."""


@dataclass
class RunRecord:
    """A run and what it measured; every number comes from the lines named in ``source``."""

    run: Run
    status: str
    reason: str = ""
    steps_done: int = 0
    step_time_s: float | None = None
    step_time_spread: float | None = None  # (max - min) / median of the timed steps' times
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    peak_mem_mib: float | None = None
    reserved_mib: float | None = None
    mem_kind: str = ""
    state_mib: float | None = None  # parameters + gradients + optimizer state of the largest rank (embedded)
    wall_s: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    layout: dict = field(default_factory=dict)
    # (step, loss) of every step line that has a loss, whatever the status: the loss curves (not in the CSV)
    losses: list[tuple[int, float]] = field(default_factory=list)
    source: str = ""
    run_dir: str = ""

    def to_dict(self) -> dict:
        """One flat row: the run's name (``run``), its ``RUN_KEYS``, scaling mode and weights, then the
        measurements."""
        measured = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run"}
        return {"run": self.run.name, **{k: getattr(self.run, k) for k in RUN_KEYS},
                "scaling": self.run.scaling, "weights": self.run.weights, **measured}


def clipped(text: str, limit: int = 200) -> str:
    """``text`` whole, or its first words up to ``limit`` characters and an ellipsis (never cut mid-word)."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def classify_failure(text: str) -> tuple[str, str] | None:
    """(status, reason) of the first failure pattern that matches; for an engine's error line the reason is
    its message (its kind as well where the kind is not the status)."""
    for status, reason, pattern in FAILURES:
        if m := pattern.search(text):
            if "msg" in pattern.groupindex:
                message = clipped(m["msg"])
                return status, message if m["kind"] == status else f"{m['kind']}: {message}"
            return status, reason
    return None


def _require(rec: dict, key: str, path: Path, pattern: str) -> float:
    if rec.get(key) is None:
        raise ParseError(f"{path}:{rec.get('line', '?')}: step {rec.get('step')} has no '{key}' "
                         f"(pattern '{pattern}'): the metric is missing from the log")
    return rec[key]


def slurm_logs(run_dir: Path, job_id: str | None, root: Path = Path(".")) -> list[Path]:
    """Slurm's own output for a job: what says "DUE TO TIME LIMIT" or "NODE FAILURE", which the
    job's processes never see. The executor plugin keeps it (for failed jobs) under
    .snakemake/slurm_logs/rule_<rule>/<wildcards>/<job id>.log; a hand-submitted run.sbatch writes
    slurm-<job id>.out into the run directory."""
    if not job_id:
        return []
    found = [run_dir / f"slurm-{job_id}.out"]
    plugin_logs = root / ".snakemake" / "slurm_logs"
    if plugin_logs.is_dir():
        found += sorted(plugin_logs.glob(f"rule_*/**/{job_id}.log"))
    return [p for p in found if p.is_file()]


def sanity(run: Run, steps: list[dict], done: bool, launch: dict, log_text: str, log: Path) -> tuple[str, str]:
    """Did the run do what was asked? (status, reason), from the failure patterns, the launcher's exit
    code, the steps seen and the engine's end line; no metric is read here (ReFrame's sanity check).
    A run the plan skipped (``plan.skip_predicted_oom``) is ``skipped`` with the plan's reason."""
    if skipped := PATTERNS["skipped"].search(log_text):
        return "skipped", skipped["reason"]
    if failure := classify_failure(log_text):
        return failure
    code = launch.get("returncode")
    if code not in (None, 0):
        return "failed", f"exit code {code}"
    seen = len(steps)
    ended = done or (code == 0 and not run.spec.writes_done_line)  # the log's end line, or a clean exit
    if ended and seen >= run.steps:
        if code == 0 or not launch:  # without a launch record the log's end line is the evidence
            return "ok", ""
        return "incomplete", (f"the log shows all {run.steps} steps and the run's end line, but launch.json "
                              "has no exit code (returncode null): the launcher stopped before the job exited "
                              "(killed while shutting down?)")
    if done:
        raise ParseError(f"{log}: the log's end line says the run finished, but only {seen} of its {run.steps} steps "
                         f"match the step pattern ('{run.spec.step_pattern}' of ftscale.run.logformat.PATTERNS): "
                         "the metrics are missing from the log")
    if seen >= run.steps:
        return "incomplete", (f"the log has all {run.steps} steps but no end line ([ftscale] done) and no exit code 0: "
                              "the job stopped before it finished")
    return "incomplete", (f"log ends after {seen} of {run.steps} steps with no error"
                          + ("" if launch.get("end") else "; the launcher never finished (killed?)"))


def performance(run: Run, steps: list[dict], log: Path, require_memory: bool) -> dict:
    """What the run measured: the median step time after the warm-up and what follows from it, the spread
    of those step times ((max - min) / median: how far one step's time strays, what an efficiency above 1
    is held against), peak memory over every step, the first and last loss, and the log lines they come
    from."""
    out: dict = {}
    timed = [s for s in steps if s["step"] > run.warmup_steps]
    if timed:
        name = run.spec.step_pattern
        times = [_require(s, "step_time_s", log, name) for s in timed]
        out["step_time_s"] = statistics.median(times)
        out["step_time_spread"] = (max(times) - min(times)) / out["step_time_s"]
        out["tokens_per_s"] = run.tokens_per_step / out["step_time_s"]
        out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / run.gpus
        mems = [s["peak_mem_mib"] for s in steps if s.get("peak_mem_mib") is not None]
        if require_memory and not mems:
            raise ParseError(f"{log}: no peak memory in any step line (pattern '{name}'; "
                             "NeMo needs NEMO_LOG_MEMORY_USAGE=1)")
        out["peak_mem_mib"] = max(mems) if mems else None
        reserved = [s["reserved_mib"] for s in steps if s.get("reserved_mib") is not None]
        out["reserved_mib"] = max(reserved) if reserved else None
        out["mem_kind"] = steps[-1].get("mem_kind", "")
        states = [s["state_mib"] for s in steps if s.get("state_mib") is not None]
        out["state_mib"] = max(states) if states else None
        out["source"] = f"{log}:{timed[0]['line']}-{timed[-1]['line']}"
    if steps:
        out["loss_first"] = steps[0].get("loss")
        out["loss_last"] = steps[-1].get("loss")
    return out


def parse_run(run_dir: Path | str, extra_logs: list[Path] | None = None, root: Path = Path(".")) -> RunRecord:
    """The record of one run directory (run.json, train.log, launch.json), with Slurm's own logs of
    the job (given, or found by its job id under ``root``): its ``sanity`` (status and reason), then
    its ``performance``."""
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    run = Run.load(paths.run)
    record = RunRecord(run=run, status="not_run", run_dir=str(run_dir))
    log = paths.log
    if not log.is_file():
        record.reason = "no log: the job has not run"
        return record
    text = log.read_text(errors="replace")
    launch = json.loads(paths.launch.read_text()) if paths.launch.is_file() else {}
    record.wall_s = launch.get("wall_s")
    if extra_logs is None:
        extra_logs = slurm_logs(run_dir, launch.get("slurm_job_id"), root)
    extra = "\n".join(p.read_text(errors="replace") for p in extra_logs if p.is_file())
    steps, layout, done = parse_steps(text)
    record.layout = {k: v for k, v in layout.items() if k != "line"}
    record.steps_done = len(steps)
    record.losses = [(s["step"], s["loss"]) for s in steps if s.get("loss") is not None]
    record.status, record.reason = sanity(run, steps, done, launch, text + "\n" + extra, log)
    if record.status == "ok":  # a run that did not finish measured nothing: its figures stay blank
        for key, value in performance(run, steps, log, require_memory=True).items():
            setattr(record, key, value)
    return record
