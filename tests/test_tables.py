"""Scaling maths: speedup and efficiency for weak and strong scaling, failed rows kept."""

from __future__ import annotations

import pytest

from ftscale.analyze.parse import RunRecord
from ftscale.analyze.tables import scaling


def rec(gpus: int, gbs: int, step_time: float, status: str = "ok") -> RunRecord:
    seq = 100
    tps = gbs * seq / step_time if status == "ok" else None
    return RunRecord(run=f"gpus{gpus}", track="data_parallel", model="m", engine="embedded", gpus=gpus, tp=1,
                     ep=1, dp=gpus, sp=False, micro_batch=1, global_batch=gbs, seq_length=seq, steps=10,
                     warmup_steps=1, status=status, step_time_s=step_time if status == "ok" else None,
                     tokens_per_s=tps)


def test_weak_scaling_efficiency_is_step_time_ratio():
    # global batch grows with N; step time grows from 1.0 s to 1.25 s at 4 GPUs
    rows = [rec(1, 8, 1.0), rec(2, 16, 1.1), rec(4, 32, 1.25)]
    (s1, e1), (s2, e2), (s4, e4) = scaling(rows)
    assert (s1, e1) == (1.0, 1.0)
    assert e2 == pytest.approx(1.0 / 1.1) and s2 == pytest.approx(2 / 1.1)
    assert e4 == pytest.approx(1.0 / 1.25) and s4 == pytest.approx(4 / 1.25)


def test_strong_scaling_efficiency():
    # global batch fixed; step time 1.0 -> 0.3 at 4 GPUs: speedup 3.33, efficiency 0.833
    rows = [rec(1, 8, 1.0), rec(4, 8, 0.3)]
    (_, _), (s4, e4) = scaling(rows)
    assert s4 == pytest.approx(1.0 / 0.3)
    assert e4 == pytest.approx(1.0 / (4 * 0.3))


def test_failed_rows_keep_status_and_get_no_derived_numbers():
    rows = [rec(1, 8, 1.0), rec(2, 16, 0.0, status="oom"), rec(4, 32, 1.2)]
    out = scaling(rows)
    assert out[1] == (None, None)
    assert out[2][1] == pytest.approx(1 / 1.2)


def test_no_baseline_means_no_speedup():
    rows = [rec(1, 8, 0.0, status="failed"), rec(2, 16, 1.0)]
    assert scaling(rows) == [(None, None), (None, None)]
