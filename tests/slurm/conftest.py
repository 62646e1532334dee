"""The private Slurm cluster fixtures (slurm_cluster.py, beside this file) for the tests of this folder."""

from slurm_cluster import slurm_cluster, slurm_two_nodes  # noqa: F401
