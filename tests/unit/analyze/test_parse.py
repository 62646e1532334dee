"""The log parser on fixtures: complete, restarted, truncated, out of memory, a crashed rank."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
from paths import FIXTURES
from runs import make_run

from ftscale.analyze.parse import ParseError, parse_run
from ftscale.run.logformat import PATTERNS, parse_steps, step_line

EMBEDDED = FIXTURES / "embedded"


def step_times(log: Path) -> list[float]:
    return [float(line.split("step_time_s=")[1].split()[0]) for line in log.read_text().splitlines() if "step_time_s=" in line]


def test_complete_run():
    rec = parse_run(EMBEDDED / "complete")
    assert rec.status == "ok" and rec.reason == ""
    assert rec.steps_done == 12
    times = step_times(EMBEDDED / "complete" / "train.log")
    assert rec.step_time_s == pytest.approx(statistics.median(times[2:]))  # 2 warm-up steps left out
    assert rec.tokens_per_s == pytest.approx(16 * 128 / rec.step_time_s)
    assert rec.tokens_per_s_per_gpu == pytest.approx(rec.tokens_per_s / 2)
    assert rec.peak_mem_mib == pytest.approx(461.1) and rec.mem_kind == "rss"
    assert rec.wall_s == pytest.approx(9.541)
    assert rec.layout["dp"] == 2 and rec.layout["trainable_per_rank"] == 14336
    assert rec.source.endswith("train.log:4-13")  # steps 3..12 (line 1 is the layout)


def test_truncated_log_is_incomplete_not_ok():
    rec = parse_run(EMBEDDED / "truncated")
    assert rec.status == "incomplete"
    assert "after 5 of 12 steps" in rec.reason and "never finished" in rec.reason
    assert rec.steps_done == 5


def test_oom_is_recognised():
    rec = parse_run(EMBEDDED / "oom")
    assert (rec.status, rec.reason) == ("oom", "out of GPU memory")


def test_crashed_rank_is_failed_with_reason():
    rec = parse_run(EMBEDDED / "crashed_rank")
    assert rec.status == "failed"
    assert "SIGKILL" in rec.reason


def test_restarted_log_keeps_last_attempt(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(EMBEDDED / "complete", run)
    log = run / "train.log"
    first = "".join(step_line(s, 12, 9.0, 5.0, 2048, 1.0, 0.0, "rss") + "\n" for s in range(1, 6))
    log.write_text(first + log.read_text())
    rec = parse_run(run)
    assert rec.status == "ok"
    assert rec.step_time_s < 1.0  # the 5-second first attempt is gone


def test_ok_run_without_metrics_is_an_error_naming_file(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(EMBEDDED / "complete", run)
    (run / "train.log").write_text("[ftscale] done steps=12\n" + "".join(
        f"[ftscale] step={s}/12 loss=1.0\n" for s in range(1, 13)))
    launch = json.loads((run / "launch.json").read_text())
    assert launch["returncode"] == 0
    with pytest.raises(ParseError, match=r"train.log: the log's end line says the run finished, but only 0 of its 12 "
                                         r"steps match the step pattern \('embedded_step'"):
        parse_run(run)


def test_missing_log_is_not_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(EMBEDDED / "complete" / "run.json", run)
    rec = parse_run(run)
    assert rec.status == "not_run" and rec.step_time_s is None


def test_nonzero_exit_without_known_pattern_is_failed(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(EMBEDDED / "complete", run)
    launch = json.loads((run / "launch.json").read_text())
    launch["returncode"] = 7
    (run / "launch.json").write_text(json.dumps(launch))
    rec = parse_run(run)
    assert (rec.status, rec.reason) == ("failed", "exit code 7")


def test_step_line_round_trips_through_the_parser():
    line = step_line(3, 10, 2.5, 0.25, 4096, 123.4, 200.0, "cuda")
    assert PATTERNS["embedded_step"].search(line)
    steps, _, _ = parse_steps(line + "\n")
    assert steps[0]["step"] == 3 and steps[0]["step_time_s"] == 0.25 and steps[0]["peak_mem_mib"] == 123.4


NEMO_FIXTURES = FIXTURES / "nemo"


def nemo_run(tmp_path: Path, log: str, returncode: int | None) -> Path:
    """A run directory of the NeMo engine (llama31_8b, 8 GPUs, LoRA, 50 steps) around a fixture log."""
    run = make_run(model="llama31_8b", engine="nemo", gpus=8, micro_batch=1, global_batch=128, seq_length=2048,
                   steps=50, warmup_steps=10, scaling="weak", precision="bf16", device="cuda")
    d = tmp_path / log
    d.mkdir()
    (d / "run.json").write_text(json.dumps(run.to_dict()))
    shutil.copy(NEMO_FIXTURES / log, d / "train.log")
    (d / "launch.json").write_text(json.dumps({"returncode": returncode, "wall_s": 600.0,
                                               "end": None if returncode is None else 1.0}))
    return d


def nemo_step_times(log: Path) -> list[float]:
    return [float(line.split("train_step_timing in s: ")[1].split()[0])
            for line in log.read_text().splitlines() if line.startswith("Training epoch")]


def test_nemo_complete_log():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rec = parse_run(nemo_run(Path(tmp), "complete.log", 0))
    times = nemo_step_times(NEMO_FIXTURES / "complete.log")
    assert rec.status == "ok" and rec.steps_done == 50
    assert rec.step_time_s == pytest.approx(statistics.median(times[10:]))
    assert rec.tokens_per_s == pytest.approx(128 * 2048 / rec.step_time_s)
    allocated = [int(line.split("max_memory_allocated: ")[1].split()[0])
                 for line in (NEMO_FIXTURES / "complete.log").read_text().splitlines() if "max_memory_allocated" in line]
    assert rec.peak_mem_mib == pytest.approx(max(allocated) / 2**20) and rec.mem_kind == "cuda"


@pytest.mark.parametrize("log, status, reason", [
    ("oom.log", "oom", "out of GPU memory"),
    ("nccl_timeout.log", "failed", "NCCL timeout"),
])
def test_nemo_failures(tmp_path, log, status, reason):
    rec = parse_run(nemo_run(tmp_path, log, 1))
    assert (rec.status, rec.reason) == (status, reason)


def test_nemo_truncated_log(tmp_path):
    rec = parse_run(nemo_run(tmp_path, "truncated.log", None))
    assert rec.status == "incomplete" and rec.steps_done == 31
    assert rec.step_time_s is None  # a run that did not finish has no figures: the status says why


FIGURES = ("step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "peak_mem_mib", "reserved_mib", "state_mib",
           "loss_first", "loss_last")


def test_a_run_killed_mid_training_keeps_no_figures():
    rec = parse_run(EMBEDDED / "truncated")
    assert rec.status == "incomplete" and rec.steps_done == 5
    assert all(getattr(rec, f) is None for f in FIGURES) and rec.mem_kind == "" and rec.source == ""


@pytest.mark.parametrize("fixture", ["oom", "crashed_rank"])
def test_a_failed_run_keeps_no_figures(fixture):
    rec = parse_run(EMBEDDED / fixture)
    assert rec.status != "ok" and all(getattr(rec, f) is None for f in FIGURES)


def test_a_complete_nemo_log_without_its_launch_record_is_ok(tmp_path):
    """Lightning's "`Trainer.fit` stopped: `max_steps=N` reached." ends a NeMo run: with every step seen and no
    launch.json, that line is the evidence."""
    d = nemo_run(tmp_path, "complete.log", 0)
    (d / "launch.json").unlink()
    text = (d / "train.log").read_text().replace("[ftscale] done steps=50\n", "")
    assert "`Trainer.fit` stopped: `max_steps=50` reached." in text and "[ftscale] done" not in text
    (d / "train.log").write_text(text)
    rec = parse_run(d)
    assert (rec.status, rec.reason, rec.steps_done) == ("ok", "", 50) and rec.step_time_s is not None


def test_a_finished_log_whose_launcher_left_no_exit_code_says_so(tmp_path):
    """launch.json with returncode null beside a log with every step and its end line: not the
    self-contradicting 'finished 12 steps but only 12 lines matched', but what is missing."""
    run = tmp_path / "run"
    shutil.copytree(EMBEDDED / "complete", run)
    launch = json.loads((run / "launch.json").read_text())
    (run / "launch.json").write_text(json.dumps({**launch, "returncode": None, "end": None}))
    rec = parse_run(run)
    assert rec.status == "incomplete" and "only" not in rec.reason
    assert "all 12 steps" in rec.reason and "launch.json has no exit code (returncode null)" in rec.reason


def test_an_engine_error_line_reads_once_and_is_cut_at_a_word(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(EMBEDDED / "truncated", run)
    message = "rank 0: RuntimeError: " + " ".join(f"word{i}" for i in range(80))
    with (run / "train.log").open("a") as log:
        log.write(f"[ftscale] error=failed {message}\n")
    rec = parse_run(run)
    assert rec.status == "failed" and rec.reason.startswith("rank 0: RuntimeError: word0 ")
    assert rec.reason.endswith(" ...") and rec.reason[:-4].split()[-1].startswith("word")
    assert message.startswith(rec.reason[:-4]) and rec.reason[:-4].split()[-1] in message.split()


def test_half_written_last_line_is_ignored(tmp_path):
    d = nemo_run(tmp_path, "truncated.log", None)
    text = (d / "train.log").read_text()
    (d / "train.log").write_text(text + "Training epoch 0, iteration 31/49 | lr: 4.1e-05 | global_batch_size: 12")
    rec = parse_run(d)
    assert rec.steps_done == 31


def _stopped_run(tmp_path: Path, job_id: str) -> Path:
    run = tmp_path / "experiments/data_parallel/tiny_llama/gpus2_mbs4_gbs16_seq128"
    shutil.copytree(EMBEDDED / "truncated", run)
    with (run / "train.log").open("a") as log:
        log.write("[ftscale] error=cancelled the job received SIGTERM (scancel, time limit or Ctrl-C)\n")
    launch = json.loads((run / "launch.json").read_text())
    launch.update(slurm_job_id=job_id, returncode=143, signal="SIGTERM", end=launch["start"] + 60)
    (run / "launch.json").write_text(json.dumps(launch))
    return run


def test_slurm_time_limit_reaches_the_record_from_the_plugins_log(tmp_path):
    run = _stopped_run(tmp_path, "77")
    assert parse_run(run, root=tmp_path).status == "cancelled"  # all the job itself saw was SIGTERM
    logs = tmp_path / ".snakemake/slurm_logs/rule_train/data_parallel_tiny_llama_gpus2_mbs4_gbs16_seq128"
    logs.mkdir(parents=True)
    (logs / "77.log").write_text("slurmstepd: error: *** JOB 77 ON node1 CANCELLED AT 2026-11-24T04:40:00 "
                                 "DUE TO TIME LIMIT ***\n")
    (logs / "78.log").write_text("slurmstepd: error: *** JOB 78 ON node1 CANCELLED AT 2026-11-24T04:40:00 "
                                 "DUE TO NODE FAILURE ***\n")  # another job's log: not this run's
    rec = parse_run(run, root=tmp_path)
    assert (rec.status, rec.reason) == ("failed", "Slurm time limit")


def test_node_failure_from_a_hand_submitted_jobs_output(tmp_path):
    run = _stopped_run(tmp_path, "91")
    (run / "slurm-91.out").write_text("slurmstepd: error: *** JOB 91 ON node3 CANCELLED AT 2026-11-24T05:00:00 "
                                      "DUE TO NODE FAILURE, SEE SLURMCTLD LOG FOR DETAILS ***\n")
    rec = parse_run(run, root=tmp_path)
    assert (rec.status, rec.reason) == ("failed", "node failure")
