"""The run stage: one fine-tuning job per run.

- ``configure``: the files the configure_run rule writes (run.json, run.sbatch);
- ``sbatch``: scheduler resources and the standalone sbatch scripts;
- ``launch``: start a job from its run.json (its ranks on one node, srun and torchrun on several) and record
  what happened;
- ``ranks``: the ranks of a job on one node, started with torchrun's environment, stopped together;
- ``logformat``: the one per-step line format, and reading step lines back (ours and NeMo's);
- ``data``: the training batches;
- ``outcome``: how every engine's job ends in its log (done line, error line).

The engines' training code (``ftscale.engines.<name>.train``, started by ``launch``) belongs to
this stage. Imports only the engines' specs, ``ftscale.study`` and ``ftscale.importing``.
"""
