"""The launch command of a run: on one node the engine's module, which the launcher starts once per rank
(tests/unit/run/test_ranks.py), one torchrun per node through srun on several."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from runs import make_run

from ftscale.analyze.parse import classify_failure, parse_run
from ftscale.run.launch import (
    RENDEZVOUS_TIMEOUT_S,
    killed_line,
    launch_command,
    launched_processes,
    rendezvous_endpoint,
    rendezvous_timeout_s,
    run_job,
)
from ftscale.run.ranks import job_envs


def test_on_one_node_each_rank_runs_the_module_with_torchruns_environment():
    for gpus in (1, 4):
        cmd = launch_command(make_run(gpus=gpus), "d/run.json", python="py")
        assert cmd == ["py", "-u", "-m", "ftscale.engines.embedded.train", "d/run.json"]
        assert launched_processes(make_run(gpus=gpus)) == gpus
    assert launched_processes(make_run(engine="nemo", gpus=16, nodes=2)) == 1  # srun
    env = job_envs(1, 29511)[0]
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_PORT": "29511"}
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["TORCHELASTIC_RUN_ID"]


def test_a_rank_killed_by_a_signal_is_said_in_the_words_the_analysis_reads():
    from ftscale.analyze.parse import classify_failure

    assert classify_failure(killed_line(-9, 123)) == ("failed", "a rank was killed (SIGKILL: out of host memory?)")


def test_several_nodes_start_one_torchrun_per_node_through_srun():
    cmd = launch_command(make_run(engine="nemo", gpus=16, nodes=2), "d/run.json", python="py",
                         rendezvous="node1:29411", rendezvous_timeout=30)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd and "--rdzv-backend=c10d" in cmd
    assert "--rdzv-endpoint=node1:29411" in cmd and "--rdzv-conf=join_timeout=30,read_timeout=30" in cmd
    assert cmd[-3:] == ["-m", "ftscale.engines.nemo.train", "d/run.json"]


def test_the_rendezvous_is_this_host_on_a_free_port_unless_the_job_says():
    host, port = rendezvous_endpoint({}).rsplit(":", 1)
    assert host == socket.gethostname() and 0 < int(port) < 65536
    assert rendezvous_endpoint({"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29999"}) == "10.0.0.7:29999"
    assert rendezvous_timeout_s({}) == RENDEZVOUS_TIMEOUT_S
    assert rendezvous_timeout_s({"FTSCALE_RENDEZVOUS_TIMEOUT_S": "15"}) == 15
    with pytest.raises(ValueError, match="FTSCALE_RENDEZVOUS_TIMEOUT_S='soon'"):
        rendezvous_timeout_s({"FTSCALE_RENDEZVOUS_TIMEOUT_S": "soon"})


def test_a_rendezvous_that_never_completes_is_named_as_such():
    log = "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\nsrun: error: n1: task 0: Exited"
    assert classify_failure(log)[1].startswith("the nodes never all met at the rendezvous")


def test_run_job_records_a_failure_with_its_exit_code(tmp_path):
    """A job whose engine cannot start still leaves launch.json with the exit code and the log."""
    run = make_run(model="no_such_model")  # its checkpoint does not exist: the engine will fail
    (tmp_path / "run.json").write_text(json.dumps(run.to_dict()))
    code = run_job(tmp_path / "run.json", tmp_path / "train.log", tmp_path / "launch.json", cpus=1)
    record = json.loads((tmp_path / "launch.json").read_text())
    assert code != 0 and record["returncode"] == code and record["end"] >= record["start"]
    assert record["threads_per_rank"] == 1 and record["command"].startswith(sys.executable)
    assert "[ftscale] error=failed" in (tmp_path / "train.log").read_text()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_progress_shows_first_step_then_at_most_one_line_per_interval(capsys):
    import io

    from ftscale.run.launch import copy_with_progress
    from ftscale.run.logformat import step_line

    lines = ["loading weights\n"] + [step_line(s, 5, 1.0, 0.1, 10, 1.0, 0.0, "rss") + "\n" for s in range(1, 6)]
    out = io.StringIO()
    copy_with_progress(iter(lines), out, "run1", every_s=3600)
    assert out.getvalue() == "".join(lines)  # the log gets everything
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 1 and shown[0].startswith("[ftscale] run1: [ftscale] step=1/5")


def _disk_full_on_launch_record(monkeypatch, after: int = 0) -> None:
    """launch.json's writes fail as on a full disk, after ``after`` successful ones."""
    real = Path.write_text
    seen = []

    def write_text(self, data, *args, **kwargs):
        if self.name == "launch.tmp":
            seen.append(self)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_full_disk_at_the_first_launch_record_fails_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    run = make_run(model="no_such_model")
    (tmp_path / "run.json").write_text(json.dumps(run.to_dict()))
    _disk_full_on_launch_record(monkeypatch)
    code = run_job(tmp_path / "run.json", tmp_path / "train.log", tmp_path / "launch.json", cpus=1)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"[ftscale] {run.name}: {tmp_path}/launch.json: cannot write the launch record: "
                           "No space left on device")
    assert not (tmp_path / "launch.json").exists() and not (tmp_path / "launch.tmp").exists()
    record = parse_run(tmp_path, root=tmp_path)
    assert record.status == "failed" and "No space left on device" in record.reason, record.reason


def test_a_full_disk_at_the_last_launch_record_fails_the_run_with_that_reason(tmp_path, monkeypatch, capsys):
    run = make_run(model="no_such_model")
    (tmp_path / "run.json").write_text(json.dumps(run.to_dict()))
    _disk_full_on_launch_record(monkeypatch, after=1)
    code = run_job(tmp_path / "run.json", tmp_path / "train.log", tmp_path / "launch.json", cpus=1)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"{tmp_path}/launch.json: cannot write the launch record: No space left on device" in err
    assert json.loads((tmp_path / "launch.json").read_text())["returncode"] is None  # the first record stays
    assert "[ftscale] error=io " in (tmp_path / "train.log").read_text()
    assert parse_run(tmp_path, root=tmp_path).status == "failed"


def test_a_run_across_nodes_without_srun_fails_with_its_reason(tmp_path, monkeypatch):
    """Inside a container image (or outside Slurm) there is no srun to start a torchrun per node."""
    run = make_run(gpus=2, nodes=2, dp=2)
    (tmp_path / "run.json").write_text(json.dumps(run.to_dict()))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert run_job(tmp_path / "run.json", tmp_path / "train.log", tmp_path / "launch.json", cpus=1) == 1
    status, reason = classify_failure((tmp_path / "train.log").read_text())
    assert status == "failed" and "srun" in reason and "container: none" in reason
