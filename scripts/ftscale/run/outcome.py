"""How every engine's job ends in its log: rank 0's done line, or the traceback and the error line.

The analysis reads these lines back (ftscale.analyze.parse): ``[ftscale] done steps=N`` marks a finished
job, ``[ftscale] error=oom|failed rank R: Type: message`` a failed one.
"""

from __future__ import annotations

import traceback
from typing import Callable

from ftscale.run.logformat import error_line, failure_line, is_oom, kv_line
from ftscale.study.check import run_errors
from ftscale.study.run import Run

#: Exit code of a job that ran out of device memory (any other failure exits 1; a refused launch 2).
EXIT_OOM = 3
EXIT_REFUSED = 2


def refused(run: Run, model: dict, environ: dict) -> int | None:
    """``EXIT_REFUSED`` after printing a config error line for each reason the job cannot run: the run is
    not valid for its engine (``run_errors``), or torchrun launched it with other sizes than it asks for;
    None when it can run."""
    errors = run_errors(run, model)
    for key, variable in (("gpus", "WORLD_SIZE"), ("gpus_per_node", "LOCAL_WORLD_SIZE")):
        launched = environ.get(variable)
        if launched is not None and int(launched) != getattr(run, key):
            errors.append(f"run {run.name}: {key} = {getattr(run, key)!r}: launched with {variable} = {launched}")
    for e in errors:
        print(error_line("config", e), flush=True)
    return EXIT_REFUSED if errors else None


def reported(body: Callable[[], None], rank: int, steps: int) -> int:
    """Runs an engine's job ``body`` (a run of ``steps`` steps) and says how it ended: on success rank 0
    prints the done line; any exception prints its traceback and
    ``failure_line``. Returns 0, ``EXIT_OOM`` or 1."""
    try:
        body()
    except Exception as err:  # noqa: BLE001 - the log must say why the job ended
        traceback.print_exc()
        print(failure_line(err, rank), flush=True)
        return EXIT_OOM if is_oom(err) else 1
    if rank == 0:
        print(kv_line("done", steps=steps), flush=True)
    return 0
