"""The study: what to run, validated before anything runs.

- ``schema``: JSON-schema validation of the YAML inputs (errors name file, key and value);
- ``models``: models as data (``models/<name>/model.yaml``);
- ``layout``: ``Layout`` (tp x ep x dp, sp) and the one place its rules are written;
- ``run``: ``Run``, one training job, whose identity is its name and its directory;
- ``paths``: every file a run or a model has, relative to the workflow's root directory;
- ``check``: the checks every engine shares, then the run's own engine's (``ftscale.engines``);
- ``sweep``: the configuration expanded into runs (``load_study``).

Nothing here imports a later stage (estimate, importing, run, analyze); the engines' specs come before it.
"""
