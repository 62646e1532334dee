"""The private Slurm cluster fixture (slurm_cluster.py, beside this file) for the tests of this folder."""

from slurm_cluster import slurm_cluster  # noqa: F401
