"""The workshop plan (config/workshop.yaml, engine nemo) dry-runs on a machine with no GPU and no NeMo."""

from __future__ import annotations

import re

import pytest
from workflow import copy_workflow, snakemake

ARGS = ["--configfile", "config/workshop.yaml", "--config", "container=nvcr.io/nvidia/nemo:test"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("workshop"))


def jobs(output: str) -> list[dict]:
    """The dry run's job blocks: rule, wildcards and resources."""
    out = []
    for block in re.split(r"\n(?=rule \w+:)", output):
        if m := re.match(r"rule (\w+):", block):
            res = re.search(r"resources: (.*)", block)
            wc = re.search(r"wildcards: (.*)", block)
            out.append({"rule": m[1], "wildcards": wc[1] if wc else "",
                        "resources": dict(kv.split("=", 1) for kv in res[1].split(", ")) if res else {}})
    return out


def check_plan(output: str) -> None:
    plan = jobs(output)
    train = [j for j in plan if j["rule"] == "train"]
    # every run of the plan is a job, the predicted-OOM ones too (they write their files as skipped)
    assert len(train) == 20 and sum(j["rule"] == "import_model" for j in plan) == 2
    # the nemo engine reads NeMo's conversion of each imported model
    assert sum(j["rule"] == "import_nemo" for j in plan) == 2
    for job in train:
        name = re.search(r"name=(\S+)", job["wildcards"])[1]
        assert name.startswith("nemo_") and name.endswith("_bf16"), name
        if name.startswith("nemo_gpus"):
            gpus = int(re.match(r"nemo_gpus(\d+)", name)[1])
        else:
            tp, pp, ep, dp = (int(g or 1) for g in
                              re.match(r"nemo_tp(\d+)(?:_pp(\d+))?_ep(\d+)_dp(\d+)", name).groups())
            gpus = tp * pp * ep * dp
        per_node = min(gpus, 8)  # gpus_per_node: 8; a larger run spans whole nodes
        res = job["resources"]
        if gpus <= 8:
            assert res["gpu"] == str(gpus) and "gres" not in res and "mpi" not in res, job
        else:  # GPUs per node, one task (its torchrun) per node, the command unwrapped (docs/cluster.md)
            assert "gpu" not in res and res["gres"] == f"gpu:{per_node}", job
            assert (res["mpi"], res["tasks"], res["tasks_per_gpu"]) == ("srun", str(gpus // per_node), "0"), job
        assert res["nodes"] == str(gpus // per_node), job
        assert job["resources"]["cpus_per_task"] == str(8 * per_node)  # cpus_per_gpu: 8, per node
        assert job["resources"]["mem_mb"] == str(48000 * per_node)


def test_workshop_dry_run_shows_the_whole_plan(work):
    out = snakemake(work, "results/tables.md", "-n", *ARGS)
    check_plan(out.stdout + out.stderr)


def test_workshop_dry_run_through_the_slurm_profile(work):
    out = snakemake(work, "results/tables.md", "-n", "--profile", "profiles/slurm", *ARGS)
    check_plan(out.stdout + out.stderr)


def test_workshop_without_container_is_refused_before_any_job(work):
    out = snakemake(work, "results/tables.md", "-n", "--configfile", "config/workshop.yaml", check=False)
    assert out.returncode != 0
    assert "config/workshop.yaml: key 'container' = \"\": engine 'nemo' needs the NeMo container image" in out.stdout + out.stderr
