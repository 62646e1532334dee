"""The ranks of a one-node job, started by the launcher itself: torchrun's environment, one log, and
torchrun's way of stopping them when one fails or the job is cancelled. The ranks here are tiny real Python
programs: the run's engine interpreter (its ``python`` option) is a script that plays a rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runs import make_run

from ftscale.analyze.parse import parse_run
from ftscale.run.launch import exited_line, free_port, killed_line, run_job
from ftscale.run.ranks import Ended, job_envs, rank_env, start

#: What each rank of torchrun --standalone is told (its local elastic agent's worker environment).
TORCHRUN_VARIABLES = {
    "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
}

# each line in one write: unbuffered (PYTHONUNBUFFERED, -u), print writes the text and its newline apart
SHOW_ENV = ("import json, os, sys; sys.stdout.write(json.dumps({'env': {k: os.environ.get(k) for k in sys.argv[1:]}, "
            "'pid': os.getpid(), 'sid': os.getsid(0)}) + '\\n'); sys.stderr.write('to stderr\\n')")


def test_each_rank_gets_torchruns_environment_in_a_session_of_its_own():
    port = free_port()
    processes = start([sys.executable, "-c", SHOW_ENV, *sorted(TORCHRUN_VARIABLES)],
                      [{**os.environ, **env} for env in job_envs(3, port)])
    lines = processes.output.read().splitlines()
    assert processes.wait() == Ended(0)
    assert lines.count("to stderr") == 3  # stdout and stderr of every rank in the one pipe
    shown = sorted((json.loads(line) for line in lines if line.startswith("{")), key=lambda s: s["env"]["RANK"])
    assert [s["env"]["RANK"] for s in shown] == ["0", "1", "2"]
    for rank, seen in enumerate(shown):
        env = seen["env"]
        assert env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank) and env["GROUP_RANK"] == "0"
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == "3"
        assert env["GROUP_WORLD_SIZE"] == "1" and env["ROLE_NAME"] == "default"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", str(port))
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "False"  # rank 0 serves the store itself
        assert env["TORCHELASTIC_RESTART_COUNT"] == env["TORCHELASTIC_MAX_RESTARTS"] == "0"
        assert seen["sid"] == seen["pid"]  # as torchrun's workers: each leads its own session
    assert len({s["env"]["TORCHELASTIC_RUN_ID"] for s in shown}) == 1  # one run id for all ranks of a job


def test_the_environment_is_the_one_torchrun_standalone_gives(tmp_path):
    """Every variable torchrun adds for a worker, with the same value, but those that name its own agent: the
    address and port of its store, its run id, its error file and the signals the agent handles."""
    (tmp_path / "show.py").write_text("import json, os, sys\n"  # one file each: torchrun's workers write unbuffered
                                      "open(f'{sys.argv[1]}/env-{os.environ[\"RANK\"]}.json', 'w').write("
                                      "json.dumps(dict(os.environ)))\n")
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(tmp_path / "show.py"), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert torchrun.returncode == 0, torchrun.stderr
    workers = [json.loads((tmp_path / f"env-{rank}.json").read_text()) for rank in range(2)]
    agent_own = {"MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE",
                 "TORCHELASTIC_SIGNALS_TO_HANDLE", "TORCHELASTIC_USE_AGENT_STORE",
                 "OMP_NUM_THREADS",  # torchrun's 1 for several workers; the launcher sets each rank's CPU share
                 "LINES", "COLUMNS"}  # the terminal's size, which torchrun passes on under pytest
    for rank, worker in enumerate(workers):
        added = {k: v for k, v in worker.items() if os.environ.get(k) != v}
        ours = rank_env(rank, 2, 29500, "a-run-id")
        assert set(added) - agent_own == set(ours) - agent_own <= TORCHRUN_VARIABLES
        assert {k: added[k] for k in set(added) - agent_own} == {k: ours[k] for k in set(ours) - agent_own}


def fake_interpreter(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the engine's interpreter: it runs ``body`` (Python, with ``rank``, the
    directory ``here`` and os, signal, sys, time imported) whatever arguments the launcher gives it."""
    script = tmp_path / "fake_python"
    script.write_text(f"#!{sys.executable}\nimport os, signal, sys, time\nfrom pathlib import Path\n"
                      f"here = Path({str(tmp_path)!r})\nrank = int(os.environ['RANK'])\n"
                      f"(here / f'pid-{{rank}}').write_text(str(os.getpid()))\n{body}\n")
    script.chmod(0o755)
    return str(script)


def rank_job(tmp_path: Path, body: str, gpus: int = 3) -> Path:
    run = make_run(gpus=gpus, engine_options={"python": fake_interpreter(tmp_path, body)})
    (tmp_path / "run.json").write_text(json.dumps(run.to_dict()))
    return tmp_path / "run.json"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_failing_rank_stops_the_others_and_its_exit_code_is_the_jobs(tmp_path):
    run_json = rank_job(tmp_path, "if rank == 1:\n"
                                  "    time.sleep(1)\n"
                                  "    print('[ftscale] error=failed rank 1: ValueError: bad shape', flush=True)\n"
                                  "    sys.exit(3)\n"
                                  "time.sleep(120)")
    began = time.monotonic()
    code = run_job(run_json, tmp_path / "train.log", tmp_path / "launch.json", cpus=3)
    assert code == 3 and time.monotonic() - began < 60
    pids = [int((tmp_path / f"pid-{rank}").read_text()) for rank in range(3)]
    assert not any(alive(pid) for pid in pids)
    log = (tmp_path / "train.log").read_text()
    assert "[ftscale] error=failed rank 1: ValueError: bad shape" in log and exited_line(3, pids[1], 1) in log
    record = json.loads((tmp_path / "launch.json").read_text())
    assert record["returncode"] == 3 and record["signal"] is None
    assert record["command"].endswith("ftscale.engines.embedded.train " + f"{run_json}  # 3 ranks")
    rec = parse_run(tmp_path, root=tmp_path)
    assert (rec.status, rec.reason) == ("failed", "rank 1: ValueError: bad shape")


def test_a_rank_killed_by_sigkill_is_said_as_torchrun_says_it(tmp_path):
    """The host's OOM killer ends one rank: the others are stopped, the log names the rank and the signal."""
    run_json = rank_job(tmp_path, "if rank == 2:\n    os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(120)")
    code = run_job(run_json, tmp_path / "train.log", tmp_path / "launch.json", cpus=3)
    assert code == 128 + 9
    killed = int((tmp_path / "pid-2").read_text())
    assert killed_line(-9, killed, 2) in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "launch.json").read_text())["returncode"] == -9
    rec = parse_run(tmp_path, root=tmp_path)
    assert (rec.status, rec.reason) == ("failed", "a rank was killed (SIGKILL: out of host memory?)")


def test_a_rank_that_ignores_sigterm_gets_sigkill_after_the_grace():
    stubborn = ("import os, signal, sys, time\nif os.environ['RANK'] == '0':\n    time.sleep(0.5); sys.exit(1)\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ignoring', flush=True)\ntime.sleep(120)")
    processes = start([sys.executable, "-c", stubborn], [{**os.environ, "RANK": str(r)} for r in range(2)], grace_s=1)
    began = time.monotonic()
    ended = processes.wait()
    assert ended == Ended(1, 0, processes.procs[0].pid) and time.monotonic() - began < 30
    assert processes.procs[1].returncode == -signal.SIGKILL
    processes.output.close()


def test_sigterm_to_the_launcher_reaches_every_rank(tmp_path):
    """scancel or a time limit: the launcher passes the signal to each rank, the log and launch.json say so."""
    run_json = rank_job(tmp_path, "signal.signal(signal.SIGTERM, lambda *_: (open(here / f'term-{rank}', 'a').write('x'), "
                                  "time.sleep(0.5 + rank), sys.exit(143)))\n(here / f'ready-{rank}').write_text('1')\ntime.sleep(120)")
    launcher = subprocess.Popen([sys.executable, "-m", "ftscale.cli", "train", str(run_json), "--cpus", "3",
                                 "--log", str(tmp_path / "train.log"), "--launch-record", str(tmp_path / "launch.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{rank}").exists() for rank in range(3)) and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, out
    assert [(tmp_path / f"term-{rank}").read_text() for rank in range(3)] == ["x"] * 3  # one SIGTERM each
    assert "[ftscale] error=cancelled the job received SIGTERM" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "launch.json").read_text())["signal"] == "SIGTERM"
