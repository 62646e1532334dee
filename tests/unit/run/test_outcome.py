"""ftscale.run.outcome: how every engine's job ends in its log, read back by the parser."""

import pytest
from runs import make_run

from ftscale.analyze.parse import classify_failure
from ftscale.run.outcome import EXIT_OOM, EXIT_REFUSED, refused, reported


class OutOfMemoryError(RuntimeError):
    """Named as CUDA's: the outcome tells an OOM by the exception's name (no torch import)."""


def fail(err: Exception):
    def body():
        raise err
    return body


def test_a_finished_job_prints_done_on_rank_0_only(capsys):
    assert reported(lambda: None, 0, 12) == 0
    assert capsys.readouterr().out == "[ftscale] done steps=12\n"
    assert reported(lambda: None, 1, 12) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("err, code, status", [(ValueError("bad shape"), 1, "failed"),
                                               (OutOfMemoryError("CUDA out of memory"), EXIT_OOM, "oom")])
def test_a_failed_job_leaves_its_traceback_and_an_error_line_the_parser_reads(capsys, err, code, status):
    assert reported(fail(err), 1, 12) == code
    out, errout = capsys.readouterr()
    assert out == f"[ftscale] error={status} rank 1: {type(err).__name__}: {err}\n"
    assert "Traceback" in errout and "done" not in out
    assert classify_failure(out)[0] == status


def test_a_launch_that_does_not_match_the_run_is_refused_with_the_reasons(capsys):
    run = make_run(engine="automodel", gpus=2, dp=2, global_batch=4, seq_length=128, steps=10, warmup_steps=2,
                   learning_rate=1e-4, precision="bf16", device="cuda",
                   lora={"rank": 8, "alpha": 16, "targets": ["q_proj"]})
    model = {"name": "tiny_llama", "synthetic_at_load": False}
    assert refused(run, model, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) is None
    assert capsys.readouterr().out == ""
    assert refused(run, model, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "1"}) == EXIT_REFUSED
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[ftscale] error=config run {run.name}: gpus = 2: launched with WORLD_SIZE = 4",
                     f"[ftscale] error=config run {run.name}: gpus_per_node = 2: launched with LOCAL_WORLD_SIZE = 1"]


@pytest.mark.parametrize("line, status", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
    ("[ftscale] error=oom rank 0: OutOfMemoryError: CUDA out of memory.", "oom"),
    ("OutOfMemoryError: Allocation on device", "oom"),
    # Inductor's max-autotune drops a Triton configuration that needs more shared memory, and goes on (H200 log)
    ("[rank0]:E1202 01:18:25.244000 650 torch/_inductor/select_algorithm.py:3924] [0/0] No valid triton configs. "
     "OutOfMemoryError: out of resource: triton_mm Required: 262144 Hardware limit:232448 Reducing block sizes or "
     "`num_stages` may help.. ", None),
])
def test_an_oom_is_cuda_memory_not_a_triton_configuration_autotune_drops(line, status):
    assert (classify_failure(line) or (None,))[0] == status
