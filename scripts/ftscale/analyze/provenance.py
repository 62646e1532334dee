"""Where each row of results/scaling.csv comes from: who ran it, on what, with which software.

Per study (``environment``): participant, git commit, container, library versions.
Per run (``run_provenance``): device (from the run's own ``[ftscale] layout`` line), device model,
GPUs per node and nodes (run.json), the job's CPUs, host and date (launch.json).

The participant is ``$FTSCALE_PARTICIPANT``, else the config key ``participant``, else ``unknown``.
Library versions come from the run's layout line when the engine prints them (keys ``torch``,
``transformers``, ``peft``, ``nemo``), else from the environment that runs the analysis; the column
``versions_from`` says which (``run`` or ``analysis``).

``SCHEMA_VERSION`` is the version of the CSV's columns: bump it when a column changes meaning or
is removed, so that ftscale.compare refuses to mix files of different layouts.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import socket
import subprocess
from pathlib import Path

from ftscale.engines import engine, names
from ftscale.run.launch import cpu_model
from ftscale.study.paths import CODE_ROOT
from ftscale.study.run import Run

SCHEMA_VERSION = 2  # 2: one reference verdict per aspect (ref_throughput, ref_memory)
PARTICIPANT_ENV = "FTSCALE_PARTICIPANT"

#: The libraries whose versions each row records (column ``<name>_version``), by distribution name: the
#: embedded stack's, then each engine's own (``EngineSpec.packages``).
LIBRARIES: dict[str, str] = {
    "ftscale": "ftscale",
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    **{column: dist for spec in map(engine, names()) for column, dist in spec.packages.items()},
}

#: Provenance columns of results/scaling.csv, in order (``schema_version`` and ``participant`` lead the row).
RUN_COLUMNS = ["device", "device_model", "gpus_per_node", "nodes", "cpus", "host", "date"]
STUDY_COLUMNS = ["container", "git_commit", *(f"{name}_version" for name in LIBRARIES), "versions_from"]


def participant(config: dict) -> str:
    return os.environ.get(PARTICIPANT_ENV) or str(config.get("participant") or "") or "unknown"


def git_commit(*dirs: Path) -> str:
    """``git rev-parse HEAD`` of the first of ``dirs`` that is in a repository, with ``-dirty`` when
    tracked files differ from it; ``unknown`` when none is."""
    for d in dirs:
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=d,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if head:
            return head + ("-dirty" if dirty else "")
    return "unknown"


def library_versions() -> dict[str, str]:
    """Installed versions in this Python environment ('' when a library is not installed)."""
    out = {}
    for name, dist in LIBRARIES.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def environment(config: dict, root: Path = Path(".")) -> dict[str, object]:
    """The study-wide provenance fields (computed once per analysis)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "participant": participant(config),
        "container": config.get("container") or "none",
        "git_commit": git_commit(root, CODE_ROOT),
        "versions": library_versions(),
    }


def device_name(layout: dict) -> str:
    """The device the run reports on its layout line: ``device_name`` (a GPU's name, spaces written as
    underscores, as ``torch.cuda.get_device_name``), else ``device`` (``cpu``, ``cuda``); '' if neither."""
    if name := layout.get("device_name"):
        return str(name).replace("_", " ")
    return str(layout.get("device", ""))


def run_provenance(layout: dict, run: Run, launch: dict, env: dict) -> dict[str, object]:
    """The provenance columns of one row.

    ``device_model``: the GPU name; for a CPU run the CPU model its launcher recorded (launch.json
    ``cpu_model``), or this host's when the run ran here and its record has none, else 'unknown'.
    """
    device = device_name(layout)
    if device == "cpu":
        model = launch.get("cpu_model") or (cpu_model() if launch.get("host") == socket.gethostname() else "unknown")
    elif device and device != "cuda":
        model = device
    else:
        model = "unknown"
    start = launch.get("start")
    date = dt.datetime.fromtimestamp(start, dt.UTC).isoformat(timespec="seconds") if start else ""
    from_run = all(layout.get(name) for name in ("torch", "transformers"))
    versions = ({name: str(layout.get(name, "")) for name in LIBRARIES} if from_run else env["versions"])
    return {
        "schema_version": env["schema_version"],
        "participant": env["participant"],
        "device": device,
        "device_model": model,
        "gpus_per_node": run.gpus_per_node,
        "nodes": run.nodes,
        "cpus": launch.get("cpus"),
        "host": launch.get("host", ""),
        "date": date,
        "container": env["container"],
        "git_commit": env["git_commit"],
        **{f"{name}_version": versions.get(name, "") for name in LIBRARIES},
        "versions_from": "run" if from_run else "analysis",
    }
