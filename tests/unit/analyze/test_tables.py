"""The analysis frame and the tables: speedup and efficiency for weak and strong scaling, failed rows
kept, one number format, every note once, extra columns flowing to the CSV."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from paths import FIXTURES, REPO
from runs import make_run

from ftscale.analyze.frame import CSV_COLUMNS, Extras, Perf, build_frame, csv_frame
from ftscale.analyze.parse import RunRecord
from ftscale.analyze.tables import fmt_number, render_tables
from ftscale.study.sweep import load_study

SEQ = 100


def study(modes: list[str], gpus: list[int] = [1, 2, 4]):  # noqa: B006 - read only
    cfg = {"models": ["tiny_llama"], "engine": "embedded",
           "batch": {"micro_batch": 1, "global_batch": 8, "seq_length": SEQ, "steps": 10, "warmup_steps": 1},
           "tracks": {"data_parallel": {"gpus": gpus, "scaling": modes}, "model_parallel": {"enabled": False}}}
    return load_study(cfg, "test", REPO)


def rec(gpus: int, gbs: int, step_time: float, status: str = "ok", **fields) -> RunRecord:
    tps = gbs * SEQ / step_time if status == "ok" else None
    name = f"embedded_gpus{gpus}_mbs1_gbs{gbs}_seq{SEQ}"
    run = make_run(gpus=gpus, micro_batch=1, global_batch=gbs, seq_length=SEQ, steps=10, warmup_steps=1,
                   scaling=fields.pop("scaling", None))
    assert run.name == name
    return RunRecord(run=run, status=status, reason="" if status == "ok" else "out of GPU memory",
                     step_time_s=step_time if status == "ok" else None, tokens_per_s=tps,
                     tokens_per_s_per_gpu=tps / gpus if tps else None, mem_kind="rss",
                     peak_mem_mib=400.0 if status == "ok" else None,
                     run_dir=f"experiments/data_parallel/tiny_llama/{name}", **fields)


def frame_of(st, records, provenance=None):
    extras = {r.run_dir: Extras(Perf(2_183_168), provenance=(provenance or {}).get(r.run.gpus, {})) for r in records}
    return build_frame(st, records, extras)


def by_run(frame, column):
    return dict(zip(frame["run"], frame[column]))


def test_weak_scaling_efficiency_is_step_time_ratio():
    # global batch grows with N; step time grows from 1.0 s to 1.25 s at 4 GPUs
    frame = frame_of(study(["weak"]), [rec(1, 8, 1.0), rec(2, 16, 1.1), rec(4, 32, 1.25)])
    speedup, eff = by_run(frame, "speedup"), by_run(frame, "efficiency")
    assert speedup["embedded_gpus1_mbs1_gbs8_seq100"] == 1.0 and eff["embedded_gpus1_mbs1_gbs8_seq100"] == 1.0
    assert eff["embedded_gpus2_mbs1_gbs16_seq100"] == pytest.approx(1.0 / 1.1)
    assert speedup["embedded_gpus2_mbs1_gbs16_seq100"] == pytest.approx(2 / 1.1)
    assert eff["embedded_gpus4_mbs1_gbs32_seq100"] == pytest.approx(1.0 / 1.25)


def test_strong_scaling_efficiency_and_the_shared_one_gpu_run():
    # global batch fixed; step time 1.0 -> 0.3 at 4 GPUs: speedup 3.33, efficiency 0.833
    records = [rec(1, 8, 1.0), rec(2, 16, 1.1), rec(4, 32, 1.25), rec(2, 8, 0.6), rec(4, 8, 0.3)]
    frame = frame_of(study(["weak", "strong"]), records)
    assert len(frame) == 5  # the 1-GPU run serves both modes, once in the CSV
    assert by_run(frame, "speedup")["embedded_gpus4_mbs1_gbs8_seq100"] == pytest.approx(1.0 / 0.3)
    assert by_run(frame, "efficiency")["embedded_gpus4_mbs1_gbs8_seq100"] == pytest.approx(1.0 / (4 * 0.3))
    md = render_tables(study(["weak", "strong"]), frame)
    table = re.sub(r" +", " ", md.split("### tiny_llama")[1].split("## ")[0])
    assert table.count("| weak ") == 3 and table.count("| strong ") == 3  # 1 GPU listed under each mode


def test_failed_rows_keep_status_and_get_no_derived_numbers():
    frame = frame_of(study(["weak"]), [rec(1, 8, 1.0), rec(2, 16, 0.0, status="oom"), rec(4, 32, 1.2)])
    assert frame["speedup"].isna().tolist() == [False, True, False]
    assert by_run(frame, "efficiency")["embedded_gpus4_mbs1_gbs32_seq100"] == pytest.approx(1 / 1.2)
    assert by_run(frame, "status")["embedded_gpus2_mbs1_gbs16_seq100"] == "oom"


def test_no_baseline_means_no_speedup():
    frame = frame_of(study(["weak"], [1, 2]), [rec(1, 8, 0.0, status="failed"), rec(2, 16, 1.0)])
    assert frame["speedup"].isna().all() and frame["efficiency"].isna().all()


@pytest.mark.parametrize("value, text", [
    (None, ""), (float("nan"), ""), (279168, "279,168"), (24539.4, "24,539"), (7445.3, "7,445"), (248.4, "248"),
    (2.2046, "2.2"), (0.030492, "0.0305"), (1.0, "1"), (True, "yes"), ("oom", "oom"),
])
def test_one_number_format(value, text):
    assert fmt_number(value) == text


def test_every_paragraph_once_constants_above_the_table_and_oversubscription():
    records = [rec(1, 8, 1.0), rec(2, 16, 1.1), rec(4, 32, 2.5)]
    cpus = {1: {"cpus": 2, "nodes": 1, "device": "cpu"}, 2: {"cpus": 2, "nodes": 1, "device": "cpu"},
            4: {"cpus": 2, "nodes": 1, "device": "cpu"}}
    frame = frame_of(study(["weak"]), records, cpus)
    assert by_run(frame, "oversubscribed") == {"embedded_gpus1_mbs1_gbs8_seq100": False,
                                               "embedded_gpus2_mbs1_gbs16_seq100": False,
                                               "embedded_gpus4_mbs1_gbs32_seq100": True}
    md = re.sub(r" +", " ", render_tables(study(["weak"]), frame))  # cells without their padding
    paragraphs = [p for p in md.split("\n\n") if p.strip() and not p.startswith("|")]
    repeated = [p for p, n in Counter(paragraphs).items() if n > 1]
    assert not repeated
    assert "scaling weak; engine embedded; micro batch 1; sequence 100; FLOPs/token 2,183,168" in md
    assert "| 4 | 2 (oversubscribed) | 32 |" in md and md.count("*oversubscribed*:") == 1
    assert "reference" not in md.split("### tiny_llama")[1].split("\n\n")[2].split("\n")[0]  # no entry: no column
    assert "No entry of `config/references.yaml` matches these runs." in md


def test_extra_numeric_columns_flow_to_the_csv(tmp_path):
    records = [rec(1, 8, 1.0), rec(2, 16, 1.1), rec(4, 32, 1.25)]
    extra = {g: {"energy_kwh": 0.1 * g, "queue_wait_s": 5.0 * g} for g in (1, 2, 4)}
    frame = frame_of(study(["weak"]), records, extra)
    csv = tmp_path / "scaling.csv"
    csv_frame(frame).to_csv(csv, index=False)
    header = csv.read_text().splitlines()[0].split(",")
    assert header[:len(CSV_COLUMNS)] == CSV_COLUMNS
    assert header[len(CSV_COLUMNS):] == ["energy_kwh", "queue_wait_s"]
    assert "run_dir" not in header


def test_an_engine_error_reads_failed_once(tmp_path):
    """The engine's ``[ftscale] error=failed MESSAGE`` line is the reason; the tables' status column adds the
    status once ('failed: rank 0: ...', not 'failed: failed: rank 0: ...')."""
    import shutil

    from ftscale.analyze.parse import parse_run

    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "embedded" / "truncated", run_dir)
    with (run_dir / "train.log").open("a") as log:
        log.write("[ftscale] error=failed rank 0: RuntimeError: boom\n")
    record = parse_run(run_dir)
    record.run_dir = record.run.directory
    cfg = {"models": ["tiny_llama"], "engine": "embedded",
           "batch": {"micro_batch": 4, "global_batch": 8, "seq_length": 128, "steps": 12, "warmup_steps": 2},
           "tracks": {"data_parallel": {"gpus": [2], "scaling": ["weak"]}, "model_parallel": {"enabled": False}}}
    st = load_study(cfg, "test", REPO)
    assert record.run_dir in {r.directory for r in st.runs}
    md = render_tables(st, build_frame(st, [record], {record.run_dir: Extras(Perf(None))}))
    assert "failed: rank 0: RuntimeError: boom" in md and "failed: failed" not in md


CPU_JOB = {"cpus": 2, "nodes": 1, "device": "cpu"}


def test_the_oversubscribed_note_is_written_once_when_both_tracks_have_such_runs():
    """Data-parallel and model-parallel runs on 4 processes and 2 CPUs: one note, in the introduction."""
    cfg = {"models": ["tiny_llama"], "engine": "embedded",
           "batch": {"micro_batch": 1, "global_batch": 8, "seq_length": SEQ, "steps": 10, "warmup_steps": 1},
           "tracks": {"data_parallel": {"gpus": [1, 4], "scaling": ["weak"]},
                      "model_parallel": {"layouts": {"tiny_llama": [{"tp": 2, "sp": True}, {"tp": 4, "sp": True}]}}}}
    st = load_study(cfg, "test", REPO)
    records = [RunRecord(run=run, status="ok", step_time_s=1.0, tokens_per_s=run.tokens_per_step,
                         tokens_per_s_per_gpu=run.tokens_per_step / run.gpus, mem_kind="rss", peak_mem_mib=400.0,
                         state_mib=8.0 / run.tp, run_dir=run.directory) for run in st.runs]
    extras = {r.run_dir: Extras(Perf(None), provenance=CPU_JOB) for r in records}
    frame = build_frame(st, records, extras)
    assert frame.groupby("track")["oversubscribed"].apply(lambda s: s.eq(True).any()).all()  # both tracks
    md = render_tables(st, frame)
    assert md.count("*oversubscribed*:") == 1
    assert md.index("*oversubscribed*:") < md.index("## Data parallel")
    assert md.count("(oversubscribed)") == 2  # the 4-process rows of both tracks say it in their CPUs cell
    mp = _header(md, "### tiny_llama (model parallel)")  # on the CPU, relative to the smallest model state
    assert mp.index("model state/GPU (MiB)") < mp.index("state vs smallest") < mp.index("process RSS (MiB)")
    section = md.split("### tiny_llama (model parallel)")[1].split("\n\n|", 1)[1].split("\n\n")[0]
    lines = ("|" + section).splitlines()
    cells = [dict(zip(mp, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [(c["TP"], c["state vs smallest"]) for c in cells] == [("2", "2"), ("4", "1")]  # 4 MiB / 2 MiB


def test_an_efficiency_above_one_says_whether_it_is_within_the_baselines_spread():
    """The 1-GPU run's steps spread by 20 % around its median: 1.11 at 2 GPUs is noise, 1.43 at 4 is not."""
    from ftscale.analyze.frame import BEYOND_SPREAD, NOISE, scaling_rows
    from ftscale.analyze.tables import BEYOND_SPREAD_NOTE, NOISE_NOTE

    st = study(["weak"])
    records = [rec(1, 8, 1.0, step_time_spread=0.2), rec(2, 16, 0.9, step_time_spread=0.05),
               rec(4, 32, 0.7, step_time_spread=0.05)]
    frame = frame_of(st, records)
    rows = scaling_rows(st, frame).set_index("run")
    assert rows["above_ideal"].to_dict() == {"embedded_gpus1_mbs1_gbs8_seq100": "",
                                             "embedded_gpus2_mbs1_gbs16_seq100": NOISE,
                                             "embedded_gpus4_mbs1_gbs32_seq100": BEYOND_SPREAD}
    assert rows["baseline_spread"].tolist() == pytest.approx([0.2] * 3)
    md = re.sub(r" +", " ", render_tables(st, frame))
    assert "| 1.11 (noise: 1-GPU spread 20.0%) |" in md
    assert "| 1.43 (beyond spread: 1-GPU spread 20.0%) |" in md
    assert md.count(NOISE_NOTE) == 1 and md.count(BEYOND_SPREAD_NOTE) == 1
    quiet = render_tables(st, frame_of(st, [rec(1, 8, 1.0, step_time_spread=0.2), rec(2, 16, 1.1)]))
    assert "noise" not in quiet and "beyond spread" not in quiet  # an efficiency below 1 is shown as is


def _header(md: str, section: str) -> list[str]:
    table = next(line for line in md.split(section, 1)[1].splitlines() if line.startswith("|"))
    return [cell.strip() for cell in table.strip("|").split("|")]


def test_on_the_cpu_the_tables_lead_with_the_model_state_and_on_a_gpu_with_the_peak():
    """On the CPU the peak is the process's flat RSS: the model state (what TP and EP divide) leads, the RSS
    follows, named as such; CUDA's max allocated leads on a GPU."""
    from ftscale.analyze.tables import RSS_HEADER

    st = study(["weak"])
    cpu = [rec(g, 8 * g, 1.0, state_mib=2.0 + g / 10) for g in (1, 2, 4)]
    header = _header(render_tables(st, frame_of(st, cpu)), "### tiny_llama")
    assert "peak mem/GPU (MiB)" not in header and "peak memory" not in header
    assert header.index("model state/GPU (MiB)") < header.index(RSS_HEADER)
    gpu = [rec(g, 8 * g, 1.0, state_mib=2.0 + g / 10) for g in (1, 2, 4)]
    for r in gpu:
        r.mem_kind = "cuda"
    md = render_tables(st, frame_of(st, gpu))
    header = _header(md, "### tiny_llama")
    assert RSS_HEADER not in header
    assert header.index("peak mem/GPU (MiB)") < header.index("model state/GPU (MiB)")
    assert "peak memory CUDA max allocated" in md  # the kind, stated once above the table
