"""ftscale: library code of the fine-tuning scaling-study workflow, one package per stage.

    study      what to run: schemas, models as data, Layout, Run, paths, engines' rules, the sweep
    estimate   analytic figures of a run: FLOPs, parameters, communication (no measurement)
    importing  models/<m>/model (and NeMo's conversion): written once, read-only
    run        one job: configure, launch, log format, data, engines
    analyze    logs -> records -> results/ (CSV, tables, plots, comparison)

Imports run forward only (a later package may import an earlier one, never the reverse); ``cli``,
``dag`` and ``workflow`` (what the rules call) sit on top. The Snakefile and rules/ only wire files together.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ftscale")
except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"
