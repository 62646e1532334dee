"""The analyze stage: every run's files -> records -> results/ (scaling.csv, tables.md, plots, the
participant comparison).

- ``parse``: one run's files into a ``RunRecord`` (status and reason apart from the metrics);
- ``references``, ``provenance``: flags against reference values; where each row comes from;
- ``tables``, ``plots``, ``compare``: what people read; ``results``: the stage's entry points.

Imports ``ftscale.study``, ``ftscale.estimate`` and ``ftscale.run.logformat`` (the log format it reads).
"""
