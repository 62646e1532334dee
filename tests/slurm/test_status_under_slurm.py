"""``ftscale status`` while a real study runs under the SLURM executor plugin: its train jobs queued behind
another job, then the long run running (job id, node, step k of N, time left), then how each ended."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from paths import REPO
from workflow import copy_workflow

# The plugin waits 40 s before its first status query by default; the test cluster answers at once.
FAST = ["--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5"]
CONFIG = "tests/config/slurm_cancel.yaml"  # a 4-step run and a 3000-step one
LONG = "experiments/model_parallel/tiny_llama/embedded_tp2_ep1_dp1_sp_mbs2_gbs4_seq64"
SHORT = "experiments/data_parallel/tiny_llama/embedded_gpus1_mbs2_gbs4_seq64"


def status(cluster, work: Path, *args: str) -> subprocess.CompletedProcess:
    env = cluster.environ({"PYTHONPATH": str(REPO / "scripts")})
    out = subprocess.run([sys.executable, "-m", "ftscale.cli", "status", "--configfile", CONFIG, *args], cwd=work,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def states(cluster, work: Path) -> dict[str, dict]:
    return {r["directory"]: r for r in json.loads(status(cluster, work, "--json").stdout)["runs"]}


def wait_until(check, proc: subprocess.Popen, cluster, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert proc.poll() is None and time.monotonic() < deadline, cluster.logs()
        time.sleep(1)


def test_status_follows_a_study_on_slurm(slurm_cluster, tmp_path):
    work = copy_workflow(tmp_path)
    blocker = slurm_cluster.run(["sbatch", "--parsable", "--gpus=8", "--output=/dev/null", "--wrap", "sleep 600"],
                                cwd=tmp_path).stdout.strip()
    cmd = ["snakemake", "results/tables.md", "--profile", "profiles/slurm", "--configfile", CONFIG, "--keep-going",
           "--retries", "0", *FAST]
    proc = subprocess.Popen(cmd, cwd=work, env=slurm_cluster.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # Every GPU is taken: the train jobs wait, found by the plugin's comment before they have any file.
        queued = wait_until(lambda: (s := states(slurm_cluster, work))[LONG]["state"] == "queued"
                            and s[SHORT]["state"] == "queued" and s, proc, slurm_cluster)
        assert queued[LONG]["reason"] in ("", "Resources", "Priority") and queued[LONG]["job_id"]  # squeue's words
        assert not (work / LONG / "launch.json").exists()
        print(status(slurm_cluster, work).stdout)
        slurm_cluster.run(["scancel", blocker])

        running = wait_until(lambda: (r := states(slurm_cluster, work)[LONG])["state"] == "running"
                             and (r["step"] or 0) >= 3 and r, proc, slurm_cluster)
        table = status(slurm_cluster, work).stdout
        print(table)
        launch = json.loads((work / LONG / "launch.json").read_text())
        assert running["job_id"] == launch["slurm_job_id"] == queued[LONG]["job_id"]
        assert running["nodes"] == "localhost" and running["steps"] == 3000 and 3 <= running["step"] < 3000
        assert running["left_s"] > 0 and running["elapsed_s"] > 0
        (row,) = [line.split("|")[1:-1] for line in table.splitlines() if LONG.rsplit("/", 1)[1] in line]
        cells = [cell.strip() for cell in row]
        assert cells[3:6] == ["running", running["job_id"], "localhost"], table
        step, steps = map(int, cells[6].split("/"))
        assert step >= running["step"] and steps == 3000, table  # it goes on between the two calls
        assert table.splitlines()[-1] in ("2 runs: 1 running, 1 ok", "2 runs: 2 running"), table  # the short one?

        slurm_cluster.run(["scancel", running["job_id"]])
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a failed check: Snakemake would wait for its jobs
            slurm_cluster.cancel_jobs()
            proc.terminate()
            proc.communicate(timeout=120)
    assert proc.returncode != 0  # the cancelled run fails the workflow (--keep-going finishes the rest)
    ended = states(slurm_cluster, work)
    assert ended[SHORT]["state"] == "ok" and ended[SHORT]["step"] == 4, output[-3000:]
    assert (ended[LONG]["state"], ended[LONG]["reason"]) == ("cancelled", ""), output[-3000:]
    assert ended[LONG]["step"] >= running["step"] and ended[LONG]["job_id"] == running["job_id"]
    final = status(slurm_cluster, work).stdout
    print(final)
    assert final.splitlines()[-1] == "2 runs: 1 ok, 1 cancelled"
