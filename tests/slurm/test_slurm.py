"""The workflow on a real (private, single-node) Slurm cluster through the SLURM executor plugin.

Needs Debian's slurm-wlm and munge (.ci/slurm/install); in CI these tests fail rather than skip
when Slurm is missing (tests/slurm/slurm_cluster.py).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from workflow import copy_workflow, snakemake

# The plugin waits 40 s before its first status query by default; the test cluster answers at once.
FAST = ["--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5"]


def rows(work: Path) -> dict[str, dict]:
    return {f"{r['model']}/{r['run']}": r for r in csv.DictReader((work / "results/scaling.csv").open())}


def jobs_by_run(cluster) -> dict[str, dict]:
    """Slurm's view of every train job, keyed by <model>/<run> (from the plugin's job comment)."""
    out = {}
    for job in cluster.squeue_jobs():
        info = cluster.job(job["JobID"])
        m = re.search(r"rule_train_wildcards_(\w+?)_(tiny_\w+?)_(\S+)", info.get("Comment", ""))
        if m:
            out.setdefault(f"{m[2]}/{m[3]}", []).append(info)
    return out


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("slurm"))
    proc = snakemake(work, "results/tables.md", "--profile", "profiles/slurm", "--configfile",
                     "tests/config/slurm.yaml", *FAST, env=slurm_cluster.environ(), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + slurm_cluster.logs()
    return work


def test_profile_runs_everything_under_slurm_with_the_right_requests(slurm_run, slurm_cluster):
    table = rows(slurm_run)
    assert len(table) == 4 and all(r["status"] == "ok" for r in table.values()), table
    seen = jobs_by_run(slurm_cluster)
    for key, row in table.items():
        (job,) = [j for j in seen[key] if j["WorkDir"] == str(slurm_run)]
        gpus = int(row["gpus"])
        assert job["JobState"] == "COMPLETED"
        assert job["TresPerJob"] == f"gres:gpu:{gpus}", job
        assert job["NumCPUs"] == str(gpus)  # cpus_per_gpu = 1
        assert job["MinMemoryNode"] == f"{1500 * gpus}M"
        launch = json.loads((slurm_run / "experiments/data_parallel" / key / "launch.json").read_text())
        assert launch["slurm_job_id"] == job["JobId"]  # the row's log came from this very job


def test_sbatch_by_hand_is_picked_up_by_the_analysis(slurm_run, slurm_cluster):
    run_dir = slurm_run / "experiments/data_parallel/tiny_llama/embedded_gpus2_mbs2_gbs8_seq64"
    for name in ("metrics.jsonl", "train.log", "launch.json"):
        (run_dir / name).unlink()
    out = slurm_cluster.run(["sbatch", "--parsable", str(run_dir / "run.sbatch")], cwd=slurm_run)
    jobid = out.stdout.strip()
    assert slurm_cluster.wait_job(jobid, timeout=180) == "COMPLETED", slurm_cluster.logs()
    assert json.loads((run_dir / "launch.json").read_text())["slurm_job_id"] == jobid
    proc = snakemake(slurm_run, "results/tables.md", "--cores", "1", "--configfile", "tests/config/slurm.yaml")
    assert "rule train" not in proc.stdout + proc.stderr  # nothing retrained: the hand-run output is used
    row = rows(slurm_run)["tiny_llama/embedded_gpus2_mbs2_gbs8_seq64"]
    assert row["status"] == "ok" and row["source"].startswith(str(run_dir.relative_to(slurm_run)))


def test_cancelled_job_is_marked_and_only_it_is_rerun(slurm_cluster, tmp_path):
    work = copy_workflow(tmp_path)
    cmd = ["snakemake", "results/tables.md", "--profile", "profiles/slurm", "--configfile",
           "tests/config/slurm_cancel.yaml", "--keep-going", "--retries", "0", *FAST]
    long_run = work / "experiments/model_parallel/tiny_llama/embedded_tp2_ep1_dp1_sp_mbs2_gbs4_seq64"
    with subprocess.Popen(cmd, cwd=work, env=slurm_cluster.environ(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + 240
        while not ((long_run / "train.log").is_file() and "step=" in (long_run / "train.log").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, slurm_cluster.logs()
            time.sleep(0.5)
        jobid = json.loads((long_run / "launch.json").read_text())["slurm_job_id"]
        slurm_cluster.run(["scancel", jobid])
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    table = rows(work)
    assert table["tiny_llama/embedded_gpus1_mbs2_gbs4_seq64"]["status"] == "ok"
    cancelled = table["tiny_llama/embedded_tp2_ep1_dp1_sp_mbs2_gbs4_seq64"]
    assert cancelled["status"] == "cancelled", (cancelled, output[-3000:])
    assert 0 < int(cancelled["steps_done"]) < 3000  # what it measured before the cancel stays visible

    # Rerun the main command: only the cancelled run is submitted again (and it is short this time).
    before = {j["JobID"] for j in slurm_cluster.squeue_jobs()}
    cfg = work / "tests/config/slurm_cancel.yaml"
    cfg.write_text(cfg.read_text().replace("steps: 3000", "steps: 5"))
    proc2 = snakemake(work, "results/tables.md", "--profile", "profiles/slurm", "--configfile",
                      "tests/config/slurm_cancel.yaml", *FAST, env=slurm_cluster.environ())
    new = [slurm_cluster.job(j["JobID"]) for j in slurm_cluster.squeue_jobs() if j["JobID"] not in before]
    comments = [j.get("Comment", "") for j in new]
    assert len(new) == 1 and "embedded_tp2_ep1_dp1_sp" in comments[0], (comments, proc2.stdout[-2000:])
    assert rows(work)["tiny_llama/embedded_tp2_ep1_dp1_sp_mbs2_gbs4_seq64"]["status"] == "ok"


def test_dag_renders(slurm_run):
    snakemake(slurm_run, "dag", "--cores", "1", "--configfile", "tests/config/slurm.yaml")
    svg = (slurm_run / "results/dag.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for rule in ("import_model", "configure_run", "train", "tables"):
        assert f">{rule}</text>" in svg
    snakemake(slurm_run, "results/dag.mmd", "--cores", "1", "--configfile", "tests/config/slurm.yaml")
    assert "flowchart" in (slurm_run / "results/dag.mmd").read_text()


def test_profile_name_resolves_as_users_type_it(slurm_run, slurm_cluster):
    """`snakemake --profile slurm` (the README's main command) finds profiles/slurm after .ci/setup."""
    proc = snakemake(slurm_run, "results/tables.md", "--profile", "slurm", "-n", "--configfile",
                     "tests/config/slurm.yaml", env=slurm_cluster.environ(), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"Using profiles? slurm\b", proc.stdout + proc.stderr)  # beside the workflow's own profiles/default


def test_slurm_time_limit_reaches_the_record(slurm_run, slurm_cluster):
    """A real job stopped by Slurm's time limit: the reason comes from Slurm's own output."""
    from ftscale.analyze.parse import parse_run

    done = slurm_run / "experiments/data_parallel/tiny_llama/embedded_gpus1_mbs2_gbs4_seq64"
    probe = slurm_run / "experiments/data_parallel/tiny_llama/time_limit_probe"
    probe.mkdir()
    run = json.loads((done / "run.json").read_text())
    run.update(steps=10**6, run_dir=str(probe.relative_to(slurm_run)), name="time_limit_probe")
    (probe / "run.json").write_text(json.dumps(run))
    out = slurm_cluster.run(["sbatch", "--parsable", "--time=1", "--gpus=1", f"--output={probe}/slurm-%j.out",
                             "--wrap", f"ftscale train {probe}/run.json"], cwd=slurm_run)
    jobid = out.stdout.strip()
    assert slurm_cluster.wait_job(jobid, timeout=240) == "TIMEOUT", slurm_cluster.logs()
    rec = parse_run(probe, root=slurm_run)
    assert (rec.status, rec.reason) == ("failed", "Slurm time limit"), (probe / f"slurm-{jobid}.out").read_text()
    assert rec.steps_done > 0  # it trained until Slurm stopped it
