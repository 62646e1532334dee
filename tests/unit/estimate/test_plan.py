"""The plan (ftscale.estimate.plan): calibration against the committed GPU examples, the fit flags, the
GPU-hours, the skip of predicted-OOM runs through the run stage, and state_mib in the step line."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from paths import FIXTURES, REPO, architecture
from runs import make_run

from ftscale.analyze.parse import parse_run
from ftscale.analyze.plan_report import write_plan
from ftscale.analyze.tables import LABELS, fmt_number, fmt_percent
from ftscale.estimate.plan import (
    FITS,
    GPUS,
    PREDICTED_OOM,
    TIGHT,
    Target,
    fit_flag,
    plan_rows,
    predict,
    with_predicted_oom_skipped,
)
from ftscale.run.configure import write_run_files
from ftscale.run.launch import run_job
from ftscale.run.logformat import parse_steps, step_line
from ftscale.study.sweep import load_study


def _calibration():
    spec = importlib.util.spec_from_file_location("calibrate_plan", REPO / "benchmarks" / "gpu" / "calibrate_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.calibration_rows()


#: Memory: every engine's allocated peak within 5% (the embedded engine's are -2.9..+2.2%, NeMo's and AutoModel's
#: within 0.3%). Step time: within 20% (STEP_EFFICIENCY, one per engine and compile scope; the eager H100 rows of
#: seq 2048 are -16%, Mixtral's eager +18%, AutoModel at seq 2048 -15%: a fixed cost per step that FLOPs do not see).
MEMORY_TOLERANCE_PCT = 5
STEP_TOLERANCE_PCT = 20


def _check_calibration_row(r: dict) -> None:
    if r["status"] != "ok":
        assert r["status"] == "oom" and r["predicted_oom"], r
        return
    assert not r["predicted_oom"], r
    if r["measured_peak_mem_mib"] < 1024:
        return
    assert abs(r["mem_error_pct"]) <= MEMORY_TOLERANCE_PCT, r
    assert abs(r["step_error_pct"]) <= STEP_TOLERANCE_PCT, r


def test_every_gpu_example_is_predicted_within_5_percent_and_the_oom_as_oom():
    """Every ok run over 1 GiB of every example within ``MEMORY_TOLERANCE_PCT`` of its measured peak (allocated) and
    not predicted OOM on the GPU it ran on; every run that ran out of memory predicted OOM there. A run under
    1 GiB is mostly the allocator's fixed overhead and is not compared."""
    rows = _calibration()
    # every GPU run directory of every example is a row: its log says it ran on a GPU, or (a run that failed
    # before it said) its example ran on a GPU machine
    run_dirs = sorted(p for p in (REPO / "results" / "examples").glob("*/experiments/*/*/*/run.json")
                      if "device=cuda" in (p.parent / "train.log").read_text(errors="replace")
                      or (p.parents[4] / "provenance.txt").read_text().startswith("NVIDIA"))
    assert len(rows) == len(run_dirs) >= 36
    assert {r["example"] for r in rows} == {p.parents[4].name for p in run_dirs}
    assert {r["run"].split("_")[0] for r in rows} == {"embedded", "nemo", "automodel"}
    for r in rows:
        _check_calibration_row(r)


def test_nemo_at_seq_4096_is_out_of_memory_on_the_h100_and_fits_the_h200():
    """NeMo's local spec, LLaMA 3.1 8B, seq 4096, micro batch 1: out of memory on the H100 (79.18 GiB usable), a
    peak of 78,848 MiB allocated on the H200. The plan says the same on both GPUs, through what it needs beyond
    the allocated peak (the allocator's unusable reserve, the CUDA context)."""
    rows = {(r["example"], r["run"]): r for r in _calibration()}
    run = "nemo_gpus1_mbs1_gbs8_seq4096_bf16"
    h100 = rows[("2026-12-07-h100-llama31_8b-nemo-oom", run)]
    h200 = rows[("2026-12-01-h200-llama31_8b-side-by-side", run)]
    assert h100["fit"] == PREDICTED_OOM and h100["gpu_memory_mib"] == pytest.approx(79.18 * 1024)
    assert h200["fit"] == FITS and h200["gpu_memory_mib"] == pytest.approx(139.8 * 1024)
    assert h100["predicted_peak_mem_mib"] < h100["gpu_memory_mib"] < h100["predicted_needed_mib"]


def test_fit_flags():
    t = Target(gpu_memory_gib=80)
    assert fit_flag(0.9 * 81920, t) == FITS
    assert fit_flag(0.9 * 81920 + 1, t) == TIGHT
    assert fit_flag(81920, t) == TIGHT
    assert fit_flag(81921, t) == PREDICTED_OOM


def test_the_target_gpu_by_model_or_by_memory():
    assert Target().gpu_memory_mib == pytest.approx(GPUS["H100-80GB"].usable_gib * 1024)  # the default
    assert Target.from_config({"plan": {"gpu": "H200-141GB"}}).usable_gib == 139.8
    assert Target.from_config({"plan": {"gpu_memory_gib": 40}}).gpu_memory_mib == 40 * 1024  # as before
    with pytest.raises(ValueError, match="plan.gpu = 'H100-80GB' and plan.gpu_memory_gib = 80"):
        Target(gpu="H100-80GB", gpu_memory_gib=80)
    with pytest.raises(ValueError, match="plan.gpu = 'A100'"):
        Target(gpu="A100")


def _workshop(repo_root: Path, **plan) -> dict:
    from ftscale.study.schema import load_yaml

    cfg = load_yaml(repo_root / "config" / "workshop.yaml")
    cfg["container"] = "IMAGE"
    if plan:
        cfg["plan"] = plan
    return cfg


def test_workshop_plan_flags_the_layouts_that_cannot_fit(tmp_path):
    study = load_study(_workshop(REPO), "config/workshop.yaml", root=REPO)
    rows = write_plan(study, tmp_path / "plan.csv", tmp_path / "plan.md")
    fit = {r["run_dir"].split("/", 2)[2]: r["fit"] for r in rows}
    # Mixtral full fine-tuning at 6 + 12/d bytes per parameter: no layout of one 8-GPU node fits 80 GB ...
    one_node = {d: r for d, r in fit.items() if d.startswith("mixtral_8x7b/nemo_tp") and "_pp" not in d
                and "_dp1_" in d}
    assert len(one_node) == 5 and set(one_node.values()) == {PREDICTED_OOM}
    # ... nor 16 GPUs of which the distributed optimizer halves only the expert state (dp 2); pipeline stages do.
    assert fit["mixtral_8x7b/nemo_tp1_ep8_dp2_mbs1_gbs256_seq2048_bf16"] == PREDICTED_OOM
    assert fit["mixtral_8x7b/nemo_tp1_pp2_ep8_dp1_mbs1_gbs128_seq2048_bf16"] in (FITS, TIGHT)
    assert fit["mixtral_8x7b/nemo_tp1_pp4_ep8_dp1_mbs1_gbs128_seq2048_bf16"] == FITS
    assert fit["mixtral_8x7b/nemo_tp1_pp2_ep8_dp2_mbs1_gbs256_seq2048_bf16"] == FITS
    # The workshop skips what cannot fit, and keeps its row.
    assert {r["status"] == "planned" for r in rows if r["fit"] != PREDICTED_OOM} == {True}
    skipped = with_predicted_oom_skipped(study)
    assert {r.directory for r in skipped.runs if r.skip_reason} == {r["run_dir"] for r in rows
                                                                      if r["fit"] == PREDICTED_OOM}
    # Mixtral's 93 GB of bf16 weights on one GPU do not fit; split over 2 or more with EP they do.
    assert fit["mixtral_8x7b/nemo_gpus1_mbs1_gbs16_seq2048_bf16"] == PREDICTED_OOM
    assert fit["mixtral_8x7b/nemo_gpus2_ep2_mbs1_gbs32_seq2048_bf16"] == FITS
    assert fit["llama31_8b/nemo_gpus1_mbs1_gbs16_seq2048_bf16"] == FITS
    md = (tmp_path / "plan.md").read_text()
    hours = sum(r["predicted_gpu_hours"] for r in rows)
    assert f"GPU-hours of the whole sweep: {fmt_number(hours)}" in md and hours > 0
    assert sum(line.startswith("| experiments/") for line in md.splitlines()) == len(study.runs) == len(rows)
    assert (tmp_path / "plan.csv").read_text().count("\n") == len(rows) + 1


def test_plan_md_has_the_number_and_table_format_of_tables_md(tmp_path):
    """plan.md is rendered by the analysis (ftscale.analyze.plan_report) in the one format: numbers through
    fmt_number, fractions through fmt_percent, pandas' Markdown table, the headers of tables.LABELS."""
    study = load_study(_workshop(REPO), "config/workshop.yaml", root=REPO)
    rows = write_plan(study, tmp_path / "plan.csv", tmp_path / "plan.md")
    md = (tmp_path / "plan.md").read_text()
    table = [line for line in md.split("## Every run")[1].splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:9] == ["run", *(LABELS[k] for k in ("gpus", "tp", "pp", "ep", "dp", "sp", "micro_batch",
                                                       "seq_length"))]
    assert LABELS["step_time_s"] in header and LABELS["tokens_per_s_per_gpu"] in header
    assert set(table[1].replace("|", "").replace(" ", "")) <= {"-", ":"}  # the markdown() separator line
    first = dict(zip(header, (cell.strip() for cell in table[2].strip("|").split("|"))))
    r = rows[0]
    assert first["run"] == r["run_dir"]
    assert first["sequence"] == fmt_number(r["seq_length"]) == "2,048"  # thousands separated, as in tables.md
    assert first["SP"] == fmt_number(bool(r["sp"])) and first["SP"] in ("yes", "no")
    assert first["peak"] == fmt_number(r["predicted_peak_mem_mib"])
    assert first["% of GPU"] == fmt_percent(r["memory_fraction"])
    assert first[LABELS["step_time_s"]] == fmt_number(r["predicted_step_time_s"])
    assert first["GPU-h"] == fmt_number(r["predicted_gpu_hours"])
    import ftscale.estimate.plan as estimate_plan

    assert not hasattr(estimate_plan, "render_plan") and not hasattr(estimate_plan, "_fmt")  # one renderer


def test_plan_memory_grows_with_micro_batch_and_falls_with_tp():
    cfg = _workshop(REPO)
    cfg["batch"]["micro_batch"] = [1, 2]
    rows = {r["run_dir"]: r for r in plan_rows(load_study(cfg, "workshop", root=REPO))}
    one = rows["experiments/data_parallel/llama31_8b/nemo_gpus1_mbs1_gbs16_seq2048_bf16"]
    two = rows["experiments/data_parallel/llama31_8b/nemo_gpus1_mbs2_gbs16_seq2048_bf16"]
    assert two["predicted_activations_mib"] == pytest.approx(2 * one["predicted_activations_mib"])
    tp = [rows[f"experiments/model_parallel/llama31_8b/nemo_tp{t}_ep1_dp1_sp_mbs1_gbs16_seq2048_bf16"]
          for t in (2, 4, 8)]
    assert tp[0]["predicted_peak_mem_mib"] > tp[1]["predicted_peak_mem_mib"] > tp[2]["predicted_peak_mem_mib"]


def test_predict_reads_what_was_built_from_the_layout_line():
    run = make_run(global_batch=8, seq_length=4096, steps=6, device="auto", lora={"rank": 8, "targets": ["q_proj", "v_proj"]})
    spec = {"architecture": architecture("llama31_8b")}
    gpu = predict(run, spec)
    cpu = predict(run, spec, built={"dtype": "float32", "compile": 0, "activation_checkpointing": 0})
    assert cpu["predicted_weights_mib"] > 1.9 * gpu["predicted_weights_mib"]
    compiled = predict(run, spec, built={"dtype": "bfloat16", "compile": 1, "activation_checkpointing": 0})
    assert compiled["predicted_peak_mem_mib"] < gpu["predicted_peak_mem_mib"]
    assert {"predicted_peak_mem_mib", "predicted_step_time_s", "predicted_state_mib", "fit"} <= set(gpu)


def test_skip_predicted_oom_keeps_the_row_through_the_run_stage(tmp_path, default_config):
    cfg = copy.deepcopy(default_config)
    # 1,388 MiB: between what the tiny models need (1,382-1,394 MiB: peaks of 137-148 MiB, mostly the allocator
    # constant, and the embedded engine's CUDA context)
    cfg["plan"] = {"gpu_memory_gib": 1388 / 1024, "skip_predicted_oom": True}
    study = with_predicted_oom_skipped(load_study(cfg, "config.yaml", root=REPO))
    skipped = [r for r in study.runs if r.skip_reason]
    kept = [r for r in study.runs if not r.skip_reason]
    assert skipped and kept and all(r.skip_reason.startswith("predicted OOM: ") for r in skipped)
    off = with_predicted_oom_skipped(load_study(default_config, "config.yaml", root=REPO))
    assert not any(r.skip_reason for r in off.runs)  # off by default

    run = skipped[0]
    run_dir = tmp_path / run.directory
    run_dir.mkdir(parents=True)
    write_run_files(run.to_dict(), "#!/bin/bash\n", str(run_dir / "run.json"), str(run_dir / "run.sbatch"),
                    str(run_dir / "configure.log"))
    code = run_job(run_dir / "run.json", run_dir / "train.log", run_dir / "launch.json", cpus=1)
    assert code == 0 and (run_dir / "metrics.jsonl").read_text() == ""
    record = parse_run(run_dir)
    assert record.status == "skipped" and record.reason == run.skip_reason
    assert f"{record.status}: {record.reason}".startswith("skipped: predicted OOM")


def test_state_mib_in_the_step_line_and_the_record():
    line = step_line(3, 10, 2.5, 0.25, 4096, 123.4, 0.0, "rss", 12.5)
    steps, _, _ = parse_steps(line + "\n")
    assert steps[0]["state_mib"] == 12.5
    old = step_line(3, 10, 2.5, 0.25, 4096, 123.4, 0.0, "rss")  # logs from before state_mib still parse
    assert "state_mib" not in parse_steps(old + "\n")[0][0]


def test_measured_state_bytes_counts_dtensor_shards_locally():
    torch = pytest.importorskip("torch")
    from ftscale.engines.embedded.training import state_bytes

    model = torch.nn.Linear(8, 4, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    assert state_bytes(model, opt) == 32 * 4 * 2  # weight + grad (no optimizer state before the step)
    opt.step()
    assert state_bytes(model, opt) == 32 * 4 * 4 + 4  # + exp_avg, exp_avg_sq and the fp32 step counter
    json.dumps(state_bytes(model, opt))


def test_a_skipped_run_is_shown_in_the_tables_and_fails_nothing(tmp_path):
    """A run the plan skipped keeps its row and is listed apart from failures: the tables job does not fail
    on it (``not_ok_message``), the tables are not marked partial, and the main command does not redo it
    while the plan still skips it."""
    from ftscale.analyze.results import not_ok_message, runs_to_redo, write_results

    cfg = {"models": ["tiny_llama"], "engine": "embedded",
           "batch": {"micro_batch": 4, "global_batch": 8, "seq_length": 128, "steps": 12, "warmup_steps": 2},
           "tracks": {"data_parallel": {"gpus": [2], "scaling": ["weak"]},
                      "model_parallel": {"layouts": {"tiny_llama": [{"tp": 2, "sp": True}]},
                                         "batch": {"micro_batch": 64, "global_batch": 64}}},
           # 1,450 MiB: above what the LoRA run needs (1,386), below the full fine-tuning run at micro batch 64 (1,514)
           "plan": {"gpu_memory_gib": 1450 / 1024, "skip_predicted_oom": True}}
    study = with_predicted_oom_skipped(load_study(cfg, "skip.yaml", root=REPO))
    (skipped,) = [r for r in study.runs if r.skip_reason]
    (kept,) = [r for r in study.runs if not r.skip_reason]
    assert skipped.track == "model_parallel" and kept.name == "embedded_gpus2_mbs4_gbs16_seq128"

    shutil.copytree(FIXTURES / "embedded" / "complete", tmp_path / kept.directory)  # a finished run
    run_dir = tmp_path / skipped.directory
    run_dir.mkdir(parents=True)
    write_run_files(skipped.to_dict(), "#!/bin/bash\n", str(run_dir / "run.json"), str(run_dir / "run.sbatch"),
                    str(run_dir / "configure.log"))
    assert run_job(run_dir / "run.json", run_dir / "train.log", run_dir / "launch.json", cpus=1) == 0
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "references.yaml", tmp_path / "config")

    records = write_results(study, tmp_path / "results/scaling.csv", tmp_path / "results/tables.md", root=tmp_path)
    assert [r.status for r in records] == ["ok", "skipped"]
    assert not_ok_message(records, Path("results/tables.md")) is None
    md = (tmp_path / "results/tables.md").read_text()
    assert "2 runs (1 ok, 1 skipped)" in md and "Partial results" not in md and "## Runs not ok" not in md
    section = md.split("## Runs skipped")[1].split("## ")[0]
    assert f"- `{skipped.directory}`: skipped: predicted OOM: " in section
    table = md.split("### tiny_llama (model parallel)")[1].split("##")[0]
    assert "| skipped: predicted OOM: " in table  # its row, with the plan's reason
    row = next(r for r in csv.DictReader((tmp_path / "results/scaling.csv").open()) if r["status"] == "skipped")
    assert float(row["predicted_peak_mem_mib"]) > 200 and row["peak_mem_mib"] == ""  # 268 MiB allocated
    assert skipped.directory not in runs_to_redo(study, tmp_path)  # (the fixture run has no metrics.jsonl)
    # once the plan no longer skips it, it is a run to do
    unskipped = load_study({**cfg, "plan": {}}, "skip.yaml", root=REPO)
    assert skipped.directory in runs_to_redo(unskipped, tmp_path)


def test_plan_md_names_the_smallest_layout_that_fits_for_every_model_and_track(tmp_path):
    study = load_study(_workshop(REPO), "config/workshop.yaml", root=REPO)
    rows = write_plan(study, tmp_path / "plan.csv", tmp_path / "plan.md")
    section = (tmp_path / "plan.md").read_text().split("## The smallest layout that fits")[1].split("## Every run")[0]
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in section.splitlines()
             if line.startswith("| ") and not line.startswith("| model")}
    assert set(lines) == {(r["model"], r["track"]) for r in rows}
    mixtral = lines[("mixtral_8x7b", "model_parallel")]
    best = next(r for r in rows if r["run_dir"].endswith("/nemo_tp1_pp2_ep8_dp1_mbs1_gbs128_seq2048_bf16"))
    assert "| tp1 pp2 ep8 dp1 " in mixtral and f"| {fmt_number(best['predicted_needed_mib'])} " in mixtral
    assert f"| {fmt_percent(best['memory_fraction'])} " in mixtral and "| 16 " in mixtral and "| 2 " in mixtral
    assert "| tp1 ep2 dp1 " in lines[("mixtral_8x7b", "data_parallel")]  # 1 GPU does not fit, 2 do


def test_smallest_fitting_prefers_fewer_gpus_then_less_memory_and_says_when_none_fits():
    from ftscale.analyze.plan_report import smallest_fitting

    def row(model, gpus, needed, fit, name):
        return {"model": model, "track": "model_parallel", "gpus": gpus, "predicted_needed_mib": needed, "fit": fit,
                "run_dir": name}

    rows = [row("a", 8, 90_000, PREDICTED_OOM, "a8"), row("a", 16, 70_000, TIGHT, "a16t"),
            row("a", 16, 50_000, FITS, "a16f"), row("a", 32, 40_000, FITS, "a32"),
            row("b", 2, 99_000, PREDICTED_OOM, "b2")]
    out = smallest_fitting(rows)
    assert [(e["model"], e["run"]["run_dir"] if e["run"] else None, e["runs"]) for e in out] == [
        ("a", "a16f", 4), ("b", None, 1)]
