"""ftscale: library code of the fine-tuning scaling-study workflow, one package per stage.

    engines    one package per engine (embedded, nemo, automodel): a light spec each (typed options,
               checks, LoRA names, log pattern, planner terms, launch) and its training code; one registry
    study      what to run: schemas, models as data, Layout, Run, paths, the shared checks, the sweep
    estimate   analytic figures of a run: FLOPs, parameters, communication, memory, the plan
    importing  models/<m>/model: written once, read-only
    run        one job: configure, launch, log format, data, how a job ends
    analyze    logs -> records -> results/ (CSV, tables, plots, comparison)

Imports run forward only: the engines' specs, then study -> estimate -> importing -> run (with the engines'
training code) -> analyze; ``cli``, ``dag`` and ``workflow`` (what the rules call) sit on top. The Snakefile
and rules/ only wire files together. tests/integration/test_structure.py keeps it so.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ftscale")
except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"
