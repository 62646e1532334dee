"""``ftscale status`` on the files real runs write: short CPU jobs of the tiny LLaMA (ok, failed, skipped), a long
one watched while it trains, then cancelled; Slurm's view is given as squeue prints it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paths import REPO
from runs import make_run
from workflow import copy_workflow

from ftscale.analyze.jobs import SlurmView, parse_squeue, plugin_comment, query_squeue
from ftscale.analyze.parse import parse_run
from ftscale.analyze.status import fmt_duration, render_status, run_state, summary
from ftscale.importing.checkpoint import import_model
from ftscale.run.launch import run_job
from ftscale.run.sbatch import run_job_name
from ftscale.study.models import load_model
from ftscale.study.run import Run
from ftscale.workflow import study_of_files

OK = make_run(steps=3)
FAILED = make_run(model="tiny_mixtral")  # never imported: its checkpoint is missing
SKIPPED = make_run(seq_length=64, skip_reason="predicted peak 90 GiB > 80 GiB usable")
LONG = make_run(seq_length=16, steps=100_000, warmup_steps=1)
NOT_ASKED = SlurmView(note="no squeue on this host: Slurm not asked", asked=False)
NO_JOBS = SlurmView()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "scripts")}


def start(root: Path, run: Run) -> subprocess.Popen:
    """The run's job as the workflow's train rule starts it: its run.json, then ``ftscale train``."""
    directory = root / run.directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.json").write_text(json.dumps(run.to_dict()))
    return subprocess.Popen([sys.executable, "-m", "ftscale.cli", "train", str(run.paths.run), "--cpus", "1"],
                            cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def squeue_line(job_id: str, state: str, work_dir: Path, comment: str = "(null)", name: str = "a1b2c3-uuid",
                nodes: str = "", reason: str = "None") -> str:
    """One line as ``squeue --Format=JobID:|,Name:|,State:|,NodeList:|,Reason:|,WorkDir:|,Comment:|`` prints it."""
    return f"{job_id}|{name}|{state}|{nodes}|{reason}|{work_dir}|{comment}|"


def view(*lines: str) -> SlurmView:
    return SlurmView(jobs=tuple(parse_squeue("\n".join(lines) + "\n")))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A study root with the tiny LLaMA imported, and the ok, failed and skipped runs done for real."""
    work = tmp_path_factory.mktemp("study")
    for model in ("tiny_llama", "tiny_mixtral"):
        (work / "models" / model).mkdir(parents=True)
        shutil.copy(REPO / "models" / model / "model.yaml", work / "models" / model / "model.yaml")
    import_model(load_model("tiny_llama", work), work / "models/tiny_llama/model", root=work)
    jobs = [start(work, run) for run in (OK, FAILED)]
    for job in jobs:
        job.communicate(timeout=300)
    skipped = work / SKIPPED.directory
    skipped.mkdir(parents=True)
    (skipped / "run.json").write_text(json.dumps(SKIPPED.to_dict()))
    assert run_job(skipped / "run.json", skipped / "train.log", skipped / "launch.json") == 0
    return work


def test_runs_that_ended_have_the_analysis_state_and_reason(root):
    ok = run_state(OK, root, NO_JOBS)
    assert (ok.state, ok.reason, ok.step, ok.job_id) == ("ok", "", 3, "")
    assert ok.step_time_s == parse_run(root / OK.directory).step_time_s  # the tables' median
    assert ok.elapsed_s == json.loads((root / OK.directory / "launch.json").read_text())["wall_s"]
    failed = run_state(FAILED, root, NO_JOBS)
    assert (failed.state, failed.reason) == ("failed", "missing checkpoint"), (root / FAILED.directory / "train.log").read_text()
    skipped = run_state(SKIPPED, root, NO_JOBS)
    assert (skipped.state, skipped.reason) == ("skipped", SKIPPED.skip_reason)
    planned = run_state(make_run(seq_length=128), root, NO_JOBS)
    assert (planned.state, planned.step, planned.reason) == ("planned", None, "")


def test_a_queued_slurm_job_is_found_by_the_plugins_comment_or_the_sbatch_job_name(root):
    planned = make_run(seq_length=128)
    by_plugin = view(squeue_line("41", "PENDING", root, comment=plugin_comment(planned), reason="Priority"))
    state = run_state(planned, root, by_plugin)
    assert (state.state, state.job_id, state.reason) == ("queued", "41", "Priority")
    by_hand = view(squeue_line("42", "PENDING", root, name=run_job_name(planned), reason="Resources"))
    assert run_state(planned, root, by_hand).job_id == "42"
    elsewhere = view(squeue_line("43", "PENDING", root / "other", comment=plugin_comment(planned)))
    assert run_state(planned, root, elsewhere).state == "planned"  # the same run of another study
    # A failed run queued again: the new job, not the old log.
    again = run_state(FAILED, root, view(squeue_line("44", "PENDING", root, comment=plugin_comment(FAILED))))
    assert (again.state, again.job_id) == ("queued", "44")
    # Its job started, its launcher not yet: running, no step yet.
    started = run_state(FAILED, root, view(squeue_line("44", "RUNNING", root, comment=plugin_comment(FAILED),
                                                       nodes="gpu07")))
    assert (started.state, started.nodes, started.step) == ("running", "gpu07", None)
    assert started.reason.startswith("starting")


def wait_for_steps(log: Path, job: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().count("[ftscale] step=") >= count):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() is not None else ""
        time.sleep(0.2)


def test_a_running_run_shows_its_step_and_time_left_then_how_it_ended(root):
    directory = root / LONG.directory
    job = start(root, LONG)
    try:
        wait_for_steps(directory / "train.log", job, 4)
        running = run_state(LONG, root, NOT_ASKED)  # a local run: its launcher's pid on this host
        launch = json.loads((directory / "launch.json").read_text())
        assert launch["pid"] == job.pid and launch["end"] is None
        assert running.state == "running" and running.job_id == "" and running.nodes == launch["host"]
        assert 4 <= running.step < LONG.steps and running.elapsed_s > 0
        assert running.left_s == pytest.approx(running.step_time_s * (LONG.steps - running.step))
        snapshot = {name: (directory / name).read_text() for name in ("launch.json", "train.log")}

        # The same files as a Slurm job's: Slurm says where it runs; with no squeue here, nobody can tell.
        as_slurm = {**launch, "slurm_job_id": "4242"}
        (directory / "launch.json").write_text(json.dumps(as_slurm))
        slurm = run_state(LONG, root, view(squeue_line("4242", "RUNNING", root, nodes="gpu[01-02]")))
        assert (slurm.state, slurm.job_id, slurm.nodes) == ("running", "4242", "gpu[01-02]") and slurm.step >= 4
        unknown = run_state(LONG, root, NOT_ASKED)
        assert unknown.state == "unknown" and "no squeue" in unknown.reason and unknown.step >= 4
        gone = run_state(LONG, root, NO_JOBS)  # squeue no longer lists it, its record has no end
        assert gone.state == "interrupted" and "never finished" in gone.reason
        (directory / "launch.json").write_text(json.dumps(launch))
    finally:
        job.send_signal(signal.SIGTERM)  # what scancel sends
        job.communicate(timeout=120)
    cancelled = run_state(LONG, root, NO_JOBS)
    assert (cancelled.state, cancelled.reason) == ("cancelled", "") and cancelled.step >= 4  # its reason: its state

    # Killed outright (its record never got an end, its launcher is gone): interrupted.
    for name, text in snapshot.items():
        (directory / name).write_text(text)
    killed = run_state(LONG, root, NO_JOBS)
    assert killed.state == "interrupted" and "never finished" in killed.reason


def test_a_local_run_of_another_host_is_unknown(root):
    directory = root / LONG.directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.json").write_text(json.dumps(LONG.to_dict()))
    (directory / "train.log").write_text("")
    (directory / "launch.json").write_text(json.dumps({"run": LONG.name, "host": "elsewhere", "pid": 1,
                                                       "slurm_job_id": None, "start": time.time(), "end": None}))
    state = run_state(LONG, root, NO_JOBS, host="here")
    assert state.state == "unknown" and "elsewhere" in state.reason


def test_squeue_missing_or_failing_is_said_not_hidden(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert query_squeue().note.startswith("no squeue")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/squeue")
    failing = query_squeue(lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "squeue: fatal: no config\n"))
    assert not failing.asked and "squeue: fatal: no config" in failing.note
    answered = query_squeue(lambda cmd: subprocess.CompletedProcess(cmd, 0, squeue_line("7", "RUNNING", Path("/x"),
                                                                                         comment="c"), ""))
    assert answered.asked and answered.jobs[0].comment == "c" and answered.jobs[0].reason == ""


def test_the_table_and_summary(root):
    states = [run_state(run, root, NOT_ASKED) for run in (OK, FAILED, SKIPPED, make_run(seq_length=128))]
    assert summary(states) == "4 runs: 1 planned, 1 skipped, 1 ok, 1 failed"
    text = render_status(states, NOT_ASKED)
    assert "| missing checkpoint" in text.replace("  ", " ") and "3/3" in text
    assert "job" not in text.splitlines()[0]  # no run has a Slurm job: the column is left out
    assert text.splitlines()[-1] == "(no squeue on this host: Slurm not asked)"
    assert [fmt_duration(s) for s in (None, 5.4, 725, 11040, 183600)] == ["", "5s", "12m05s", "3h04m", "2d03h"]


def test_ftscale_status_reads_the_study_as_the_workflow_and_imports_no_torch(tmp_path):
    work = copy_workflow(tmp_path)
    code = ("import json, sys; from ftscale.cli import main; "
            "main(['status', '--configfile', 'config/config.yaml', 'tests/config/slurm.yaml', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["source"] == "config/config.yaml, tests/config/slurm.yaml"
    assert report["summary"] == "4 runs: 4 planned"  # the files merged as Snakemake merges them
    assert "experiments/data_parallel/tiny_llama/embedded_gpus1_mbs2_gbs4_seq64" in {r["directory"] for r in report["runs"]}
    default = subprocess.run([sys.executable, "-m", "ftscale.cli", "status"], cwd=work, env=env(),
                             capture_output=True, text=True, timeout=60)
    runs = len(study_of_files([work / "config/config.yaml"], root=work).runs)
    assert default.returncode == 0 and f"\n{runs} runs: {runs} planned" in default.stdout, default.stderr
