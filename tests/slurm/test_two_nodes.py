"""Runs across two nodes of a real Slurm cluster (``slurm_two_nodes``: two slurmd on this host), trained for real
with gloo, through the SLURM executor plugin and by hand; and what ends such a run: a rank killed on one node, a
node set down, a rendezvous that cannot complete. Each ends with its reason, soon, and only that run is redone.

Needs Debian's slurm-wlm and munge (.ci/slurm/install); in CI these tests fail rather than skip.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from workflow import copy_workflow, snakemake

from ftscale.analyze.parse import parse_run

# The plugin waits 40 s before its first status query by default; the test cluster answers at once.
FAST = ["--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5"]
CONFIG = "tests/config/slurm_two_nodes.yaml"
FAULTS = "tests/config/slurm_two_nodes_faults.yaml"
#: A step's loss on two nodes may differ from the same run's on one node by this much at most. The log prints six
#: decimals, and gloo's all-reduce of two ranks adds in the same order on one node and on two: they are equal.
LOSS_TOLERANCE = 1e-6
LONG = "experiments/model_parallel/tiny_llama/embedded_tp2_ep1_dp1_sp_mbs2_gbs4_seq64"
SHORT = "experiments/data_parallel/tiny_llama/embedded_gpus2_mbs2_gbs8_seq64"


def rows(work: Path) -> dict[str, dict]:
    return {f"{r['track']}/{r['model']}/{r['run']}": r for r in csv.DictReader((work / "results/scaling.csv").open())}


def layout(run_dir: Path) -> dict[str, str]:
    line = next(ln for ln in (run_dir / "train.log").read_text().splitlines() if ln.startswith("[ftscale] layout "))
    return dict(field.split("=", 1) for field in line.split()[2:])


def wait_for_steps(run_dir: Path, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    log = run_dir / "train.log"
    while not (log.is_file() and "step=" in log.read_text(errors="replace")):
        assert proc is None or proc.poll() is None, "the workflow ended before the run trained"
        assert time.monotonic() < deadline, f"{run_dir} trained no step in {timeout} s"
        time.sleep(0.5)


def rank_on(node: str, run_dir: Path) -> int:
    """The pid of the run's training rank that srun started on ``node`` (its SLURMD_NODENAME)."""
    run_json = str(run_dir / "run.json").split("/experiments/", 1)[1]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in cmd]
        if ("ftscale.engines.embedded.train" in words and "torch.distributed.run" not in words
                and any(w.endswith(run_json) for w in words) and f"SLURMD_NODENAME={node}".encode() in env):
            return int(proc.name)
    raise AssertionError(f"no rank of {run_dir} on {node}")


@pytest.fixture(scope="module")
def two_node_study(slurm_two_nodes, tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("two_nodes"))
    proc = snakemake(work, "results/tables.md", "--profile", "profiles/slurm", "--configfile", CONFIG, *FAST,
                     env=slurm_two_nodes.environ(), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + slurm_two_nodes.logs()
    return work


def test_dp_tp_and_ep_runs_span_two_nodes(two_node_study, slurm_two_nodes):
    table = rows(two_node_study)
    assert len(table) == 4, table
    for key, row in table.items():
        assert (row["status"], row["nodes"], row["gpus_per_node"]) == ("ok", "2", "1"), row
        run_dir = two_node_study / "experiments" / key
        assert (layout(run_dir)["nodes"], layout(run_dir)["node_names"]) == ("2", "n1,n2")
        launch = json.loads((run_dir / "launch.json").read_text())
        assert launch["slurm_nodelist"] == "n[1-2]"
        assert slurm_two_nodes.job(launch["slurm_job_id"])["NumNodes"] == "2"
    tables = (two_node_study / "results/tables.md").read_text()
    assert tables.count("; nodes 2;") == 4  # each table says its runs spanned two nodes


def test_losses_equal_those_of_the_same_runs_on_one_node(two_node_study, tmp_path):
    one_node = copy_workflow(tmp_path)
    snakemake(one_node, "results/tables.md", "--cores", "2", "--configfile", CONFIG, "--config", "gpus_per_node=8")
    assert {r["nodes"] for r in rows(one_node).values()} == {"1"}
    for key in rows(two_node_study):
        two = dict(parse_run(two_node_study / "experiments" / key, root=two_node_study).losses)
        one = dict(parse_run(one_node / "experiments" / key, root=one_node).losses)
        assert sorted(two) == sorted(one) == [1, 2, 3, 4]
        assert max(abs(two[step] - one[step]) for step in one) <= LOSS_TOLERANCE, (key, one, two)


def test_sbatch_by_hand_runs_across_two_nodes(two_node_study, slurm_two_nodes):
    run_dir = two_node_study / SHORT
    for name in ("metrics.jsonl", "train.log", "launch.json"):
        (run_dir / name).unlink()
    jobid = slurm_two_nodes.run(["sbatch", "--parsable", str(run_dir / "run.sbatch")], cwd=two_node_study).stdout.strip()
    assert slurm_two_nodes.wait_job(jobid, timeout=180) == "COMPLETED", slurm_two_nodes.logs()
    assert json.loads((run_dir / "launch.json").read_text())["slurm_job_id"] == jobid
    assert layout(run_dir)["node_names"] == "n1,n2"
    assert parse_run(run_dir, root=two_node_study).status == "ok"


@pytest.fixture
def faults_study(slurm_two_nodes, tmp_path):
    return copy_workflow(tmp_path)


def test_a_rank_killed_on_one_node_ends_the_run_and_only_it_is_redone(faults_study, slurm_two_nodes):
    work = faults_study
    cmd = ["snakemake", "results/tables.md", "--profile", "profiles/slurm", "--configfile", FAULTS, "--keep-going",
           "--retries", "0", *FAST]
    start = time.monotonic()
    with subprocess.Popen(cmd, cwd=work, env=slurm_two_nodes.environ(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        wait_for_steps(work / LONG, proc)
        watched = status(work, slurm_two_nodes)[Path(LONG).name]
        assert (watched["state"], watched["nodes"]) == ("running", "n[1-2]") and watched["step"] >= 1, watched
        os.kill(rank_on("n2", work / LONG), signal.SIGKILL)
        killed = time.monotonic()
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    launch = json.loads((work / LONG / "launch.json").read_text())
    assert launch["end"] - launch["start"] < killed - start + 60, launch  # the run on n1 did not wait for its peer
    table = rows(work)
    assert table[f"data_parallel/tiny_llama/{Path(SHORT).name}"]["status"] == "ok"
    failed = table[f"model_parallel/tiny_llama/{Path(LONG).name}"]
    assert (failed["status"], failed["reason"]) == ("failed", "a rank was killed (SIGKILL: out of host memory?)"), (
        failed, output[-3000:])
    ended = status(work, slurm_two_nodes)[Path(LONG).name]
    assert (ended["state"], ended["nodes"], ended["reason"]) == ("failed", "n[1-2]", failed["reason"]), ended

    before = {j["JobID"] for j in slurm_two_nodes.squeue_jobs()}
    cfg = work / FAULTS
    cfg.write_text(cfg.read_text().replace("steps: 3000", "steps: 5"))
    snakemake(work, "results/tables.md", "--profile", "profiles/slurm", "--configfile", FAULTS, *FAST,
              env=slurm_two_nodes.environ())
    new = [slurm_two_nodes.job(j["JobID"]).get("Comment", "") for j in slurm_two_nodes.squeue_jobs()
           if j["JobID"] not in before]
    assert len(new) == 1 and "embedded_tp2_ep1_dp1_sp" in new[0], new
    assert rows(work)[f"model_parallel/tiny_llama/{Path(LONG).name}"]["status"] == "ok"


def status(work: Path, cluster) -> dict[str, dict]:
    """``ftscale status --json`` of the faults study, by run name."""
    out = cluster.run(["ftscale", "status", "--configfile", FAULTS, "--json"], cwd=work).stdout
    return {row["run"]: row for row in json.loads(out)["runs"]}


def prepared(work: Path, cluster) -> None:
    """The faults study's run files and imported model, for runs submitted by hand."""
    snakemake(work, "sbatch_scripts", "models/tiny_llama/model", "--cores", "2", "--configfile", FAULTS)


def test_a_node_set_down_ends_the_run_as_a_node_failure_not_requeued(faults_study, slurm_two_nodes):
    work, run_dir = faults_study, faults_study / LONG
    prepared(work, slurm_two_nodes)
    jobid = slurm_two_nodes.run(["sbatch", "--parsable", str(run_dir / "run.sbatch")], cwd=work).stdout.strip()
    try:
        wait_for_steps(run_dir)
        slurm_two_nodes.run(["scontrol", "update", "nodename=n2", "state=down", "reason=ftscale-test"])
        state = slurm_two_nodes.wait_job(jobid, timeout=60, states=("NODE_FAIL", "FAILED", "PENDING", "COMPLETED"))
    finally:
        slurm_two_nodes.run(["scontrol", "update", "nodename=n2", "state=resume"], check=False)
    assert state == "NODE_FAIL"  # not requeued (run.sbatch: --no-requeue): its log keeps why it ended
    rec = parse_run(run_dir, root=work)
    assert (rec.status, rec.reason) == ("failed", "node failure"), (run_dir / f"slurm-{jobid}.out").read_text()
    assert 0 < rec.steps_done < 3000


def test_a_rendezvous_that_cannot_complete_ends_within_its_timeout(faults_study, slurm_two_nodes):
    """The rendezvous host unreachable (a TEST-NET address): each node's torchrun gives up after
    FTSCALE_RENDEZVOUS_TIMEOUT_S and the run fails with that reason, instead of waiting for ever."""
    work, run_dir = faults_study, faults_study / SHORT
    prepared(work, slurm_two_nodes)
    env = {"MASTER_ADDR": "192.0.2.1", "FTSCALE_RENDEZVOUS_TIMEOUT_S": "10"}
    jobid = slurm_two_nodes.run(["sbatch", "--parsable", str(run_dir / "run.sbatch")], cwd=work,
                                env=env).stdout.strip()
    assert slurm_two_nodes.wait_job(jobid, timeout=90) == "FAILED", slurm_two_nodes.logs()
    rec = parse_run(run_dir, root=work)
    assert rec.status == "failed" and re.match(r"the nodes never all met at the rendezvous", rec.reason), rec.reason
    assert json.loads((run_dir / "launch.json").read_text())["wall_s"] < 60
