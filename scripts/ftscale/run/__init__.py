"""The run stage: one fine-tuning job per run.

- ``configure``: the files the configure_run rule writes (run.json, run.sbatch);
- ``sbatch``: scheduler resources and the standalone sbatch scripts;
- ``launch``: start a job from its run.json (torchrun, srun) and record what happened;
- ``logformat``: the one per-step line format, and reading step lines back (ours and NeMo's);
- ``data``: the training batches;
- ``outcome``: how every engine's job ends in its log (done line, error line).

The engines' training code (``ftscale.engines.<name>.train``, started by ``launch`` under torchrun) belongs to
this stage. Imports only the engines' specs, ``ftscale.study`` and ``ftscale.importing``.
"""
