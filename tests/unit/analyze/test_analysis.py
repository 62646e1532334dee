"""The analysis without training: model FLOPs -> TFLOP/s -> MFU, plots, reference flags, provenance,
and the participant comparison, on fixtures and on records built by hand."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import yaml
from paths import FIXTURES, REPO, architecture
from runs import make_run

from ftscale.analyze.compare import CompareError, merge, write_comparison
from ftscale.analyze.frame import CSV_COLUMNS, Extras, Perf, build_frame, csv_frame, model_perf, prediction_columns
from ftscale.analyze.parse import RunRecord, parse_run
from ftscale.analyze.plots import OVERSUBSCRIBED_LABEL, PLOTS, _dp_plot, dense_vs_moe, loss_curves, mp_memory
from ftscale.analyze.provenance import SCHEMA_VERSION, device_name
from ftscale.analyze.references import ReferencesError, check, flag_value, load_references
from ftscale.analyze.results import RunsNotOk, write_results, write_tables
from ftscale.analyze.tables import best_layouts
from ftscale.estimate.comm import params_per_gpu
from ftscale.estimate.plan import PREDICTED_OOM, Target, gpu_for_device, predict
from ftscale.study.models import load_model
from ftscale.study.run import Run  # noqa: F401
from ftscale.study.sweep import load_study

COMPLETE = FIXTURES / "embedded" / "complete"
ANALYSIS = FIXTURES / "analysis"
TINY = architecture("tiny_llama")
LLAMA_8B = architecture("llama31_8b")
LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}

# tiny_llama (h 128, I 256, L 2, H 8, K 4, d 16, V 1024), seq 128, LoRA r 8 on q, k, v, o. Forward per token:
#   attention_proj 2 x 2·(128·128 + 2·128·64 + 128·128) = 196,608
#   attention_scores 2 x 4·128·8·16                    = 131,072
#   mlp 2 x 2·3·128·256                                = 393,216
#   lm_head 2·128·1024                                 = 262,144
#   lora 2 x 2·8·((128+128) + 2·(128+64) + (128+128))  =  28,672
# LoRA training = 2 x (frozen GEMMs) + 3 x (scores + adapters)
#   = 2 x (196,608 + 393,216 + 262,144) + 3 x (131,072 + 28,672) = 1,703,936 + 479,232
TINY_LORA_FLOPS = 2_183_168
# complete fixture: median step time of steps 3..12 = (0.072875 + 0.073757) / 2; 16 x 128 tokens; 2 GPUs
FIXTURE_STEP = 0.073316
FIXTURE_TPS_GPU = 16 * 128 / FIXTURE_STEP / 2  # 13,966.94
FIXTURE_TFLOPS = FIXTURE_TPS_GPU * TINY_LORA_FLOPS / 1e12  # 0.0304922


def study_of(**tracks) -> object:  # a small study of the embedded models, plan only
    cfg = {"models": ["tiny_llama", "tiny_mixtral"], "engine": "embedded",
           "batch": {"micro_batch": 4, "global_batch": 8, "seq_length": 128, "steps": 12, "warmup_steps": 2},
           "tracks": {"data_parallel": {"gpus": [1, 2, 4], "scaling": ["weak"]},
                      "model_parallel": {"layouts": {"tiny_llama": [{"tp": 2, "sp": True}]}}, **tracks}}
    return load_study(cfg, "test", REPO)


def with_device(tmp_path: Path, fields: str) -> Path:
    """The complete fixture with the layout line's ``device=cpu`` replaced by ``fields``."""
    run = tmp_path / "run"
    shutil.copytree(COMPLETE, run)
    log = run / "train.log"
    log.write_text(log.read_text().replace("device=cpu", fields, 1))
    return run


# --------------------------------------------------------------------------- FLOPs, TFLOP/s, MFU


def test_flops_and_tflops_on_the_fixture_and_mfu_blank_on_cpu():
    rec = parse_run(COMPLETE)
    perf = model_perf(TINY, rec)
    assert perf.flops_per_token == TINY_LORA_FLOPS
    assert rec.tokens_per_s_per_gpu == pytest.approx(FIXTURE_TPS_GPU)
    assert perf.tflops_per_gpu == pytest.approx(0.0304922, rel=1e-5)
    assert perf.tflops_per_gpu == pytest.approx(FIXTURE_TFLOPS)
    assert perf.mfu is None and perf.mfu_note == "no peak for cpu"


def test_mfu_against_the_gpu_the_run_reports(tmp_path):
    rec = parse_run(with_device(tmp_path, "device=cuda device_name=NVIDIA_H100_80GB_HBM3"))
    assert device_name(rec.layout) == "NVIDIA H100 80GB HBM3"
    perf = model_perf(TINY, rec)
    assert perf.mfu == pytest.approx(FIXTURE_TFLOPS / 989.4)  # 3.0819e-5
    assert "H100-SXM" in perf.mfu_note and "float32" in perf.mfu_note  # the fixture ran in float32


def test_mfu_of_llama_8b_lora_on_h100_by_hand():
    # seq 4096, LoRA r 8 on q, k, v, o; forward: attention_proj 32·2·41,943,040 = 2,684,354,560;
    # scores 32·4·4096·32·128 = 2,147,483,648; mlp 32·6·4096·14336 = 11,274,289,152;
    # lm_head 2·4096·128256 = 1,050,673,152; lora 32·2·8·26,624 = 13,631,488
    flops = 2 * (2_684_354_560 + 11_274_289_152 + 1_050_673_152) + 3 * (2_147_483_648 + 13_631_488)
    assert flops == 36_501_979_136
    run = make_run(model="llama31_8b", engine="nemo", micro_batch=2, global_batch=32, seq_length=4096, steps=50,
                   warmup_steps=10, precision="bf16", device="cuda", lora=LORA)
    rec = RunRecord(run=run, status="ok", tokens_per_s_per_gpu=12473.0,
                    layout={"device": "cuda", "device_name": "NVIDIA_H100_80GB_HBM3", "dtype": "bfloat16"})
    perf = model_perf(LLAMA_8B, rec)
    assert perf.flops_per_token == flops
    assert perf.tflops_per_gpu == pytest.approx(455.289, rel=1e-5)  # 12473 x 36.502e9 / 1e12
    assert perf.mfu == pytest.approx(455.289 / 989.4, rel=1e-5)  # 46.0 %


@pytest.mark.parametrize("fields, reason", [
    ("device=cuda", "no device_name"),
    ("device=cuda device_name=NVIDIA_H100_PCIe", "PCIe/NVL"),
    ("device=cuda device_name=Some_New_GPU", "unknown device"),
])
def test_mfu_blank_with_a_reason_when_the_peak_is_unknown(tmp_path, fields, reason):
    perf = model_perf(TINY, parse_run(with_device(tmp_path, fields)))
    assert perf.tflops_per_gpu == pytest.approx(FIXTURE_TFLOPS)
    assert perf.mfu is None and reason in perf.mfu_note


def test_failed_run_has_flops_per_token_but_no_throughput():
    perf = model_perf(TINY, parse_run(FIXTURES / "embedded" / "oom"))
    assert perf.flops_per_token == TINY_LORA_FLOPS
    assert perf.tflops_per_gpu is None and perf.mfu is None and "oom" in perf.mfu_note


# --------------------------------------------------------------------------- whole analysis on a fixture run


@pytest.fixture
def analysed(tmp_path, monkeypatch) -> Path:
    """The complete fixture as the study's tiny_llama 2-GPU run; every other run never started."""
    monkeypatch.setenv("FTSCALE_PARTICIPANT", "tester")
    study = study_of()
    run_dir = tmp_path / "experiments/data_parallel/tiny_llama/embedded_gpus2_mbs4_gbs16_seq128"
    shutil.copytree(COMPLETE, run_dir)
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "references.yaml", tmp_path / "config")
    write_results(study, tmp_path / "results/scaling.csv", tmp_path / "results/tables.md", root=tmp_path,
                  log=tmp_path / "results/tables.log")
    return tmp_path


def test_csv_has_flops_mfu_reference_and_provenance(analysed):
    rows = {r["run"]: r for r in csv.DictReader((analysed / "results/scaling.csv").open())
            if r["model"] == "tiny_llama"}
    row = rows["embedded_gpus2_mbs4_gbs16_seq128"]
    assert list(row) == CSV_COLUMNS
    assert row["cpus"] == "" and row["oversubscribed"] == ""  # the fixture's launch.json predates "cpus"
    assert int(row["flops_per_token"]) == TINY_LORA_FLOPS
    assert float(row["tflops_per_gpu"]) == pytest.approx(FIXTURE_TFLOPS)
    assert row["mfu"] == "" and row["mfu_note"] == "no peak for cpu"
    assert (row["ref_throughput"], row["ref_memory"]) == ("within", "within")
    assert row["ref_name"] == "tiny-llama-embedded-2cpu-vm"
    assert row["schema_version"] == str(SCHEMA_VERSION) and row["participant"] == "tester"
    assert row["device"] == "cpu" and row["gpus_per_node"] == "2" and row["nodes"] == "1"
    assert row["host"] == "vm" and row["date"].startswith("2026-")
    assert row["torch_version"] and row["versions_from"] == "analysis" and row["git_commit"]
    other = rows["embedded_gpus1_mbs4_gbs8_seq128"]
    assert other["status"] == "not_run" and other["tflops_per_gpu"] == "" and other["ref_name"] == ""
    assert other["ref_throughput"] == "no measurement"  # not ok: measured nothing


def test_tables_state_the_formula_flags_and_link_the_plots(analysed):
    md = re.sub(r" +", " ", (analysed / "results/tables.md").read_text())  # cells without their padding
    assert "| TFLOP/s/GPU | MFU |" in md and "FLOPs/token 2,183,168" in md
    assert "| 0.0305 | | 461 |" in md  # the fixture's row: MFU blank, then peak memory
    assert md.count("TFLOP/s/GPU = tokens/s/GPU x FLOPs/token / 1e12") == 1 and "MFU blank: no peak for cpu" in md
    assert "| throughput within; memory within | ok |" in md and "`tiny-llama-embedded-2cpu-vm`" in md
    assert "## Provenance" in md and "`tester`" in md
    for stem, title in PLOTS.items():
        assert f"[{title}](plots/{stem}.png)" in md


def test_a_row_not_ok_fails_the_tables_job_with_the_runs_named(analysed):
    results = analysed / "results"
    (results / "tables.md").unlink()
    with pytest.raises(RunsNotOk) as err:
        write_tables(study_of(), results / "scaling.csv", results / "tables.md", results / "plots",
                     results / "tables.log", root=analysed)
    assert str(err.value).startswith(f"{results}/tables.md: 6 of 7 runs not ok: experiments/data_parallel/"
                                     "tiny_llama/embedded_gpus1_mbs4_gbs8_seq128: not_run (never configured)")
    assert "run the same command again" in str(err.value)
    md = (results / "tables.md").read_text()  # written before the failure, marked partial
    assert "**Partial results**: 6 of 7 runs not ok" in md and "## Runs not ok" in md


def test_plots_are_written_and_not_empty(analysed):
    for stem in PLOTS:
        data = (analysed / "results/plots" / f"{stem}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024, stem


def dp_record(gpus: int, status: str = "ok", step: float = 0.1) -> RunRecord:
    good = status == "ok"
    name = f"embedded_gpus{gpus}_mbs4_gbs{8 * gpus}_seq128"
    run = make_run(gpus=gpus, micro_batch=4, global_batch=8 * gpus, seq_length=128, steps=12, warmup_steps=2,
                   scaling="weak" if gpus > 1 else None)
    assert run.name == name
    return RunRecord(run=run, status=status, step_time_s=step if good else None,
                     tokens_per_s=8 * gpus * 128 / step if good else None,
                     tokens_per_s_per_gpu=8 * 128 / step if good else None, peak_mem_mib=400.0 if good else None,
                     mem_kind="rss", run_dir=f"experiments/data_parallel/tiny_llama/{name}")


def test_failed_runs_are_left_out_of_plots_not_drawn_as_zero(tmp_path):
    study = study_of(model_parallel={"enabled": False})
    records = [dp_record(1), dp_record(2, status="oom"), dp_record(4, step=0.2)]
    frame = build_frame(study, records, {r.run_dir: Extras(Perf(None)) for r in records})
    fig = _dp_plot(study, frame, tmp_path / "t.png", "throughput")
    measured = fig.axes[0].lines[0]  # the first line of tiny_llama's panel; the dashed one is ideal scaling
    assert list(measured.get_xdata()) == [1, 4]
    assert list(measured.get_ydata()) == pytest.approx([8 * 128 / 0.1, 32 * 128 / 0.2])
    assert any("embedded_gpus2_mbs4_gbs16_seq128 (oom)" in t.get_text() for t in fig.axes[0].texts)
    assert fig.axes[0].get_ylim()[0] == 0  # throughput starts at zero
    fig = mp_memory(study, frame, tmp_path / "m.png")  # no model-parallel runs: a figure that says so
    assert any("no model-parallel runs" in t.get_text() for t in fig.axes[0].texts)
    assert (tmp_path / "m.png").stat().st_size > 1024


def test_the_step_time_spread_is_over_the_timed_steps_of_the_log():
    # complete fixture, steps 3..12 (after 2 warm-up steps): max 0.084811, min 0.065663, median FIXTURE_STEP
    rec = parse_run(COMPLETE)
    assert rec.step_time_s == pytest.approx(FIXTURE_STEP, abs=1e-6)
    assert rec.step_time_spread == pytest.approx((0.084811 - 0.065663) / FIXTURE_STEP, rel=1e-4)


def test_dp_plots_draw_oversubscribed_runs_hollow_with_a_legend_entry(tmp_path):
    """4 processes on 2 CPUs: the point is drawn hollow in all three plots, with one legend entry saying why."""
    study = study_of(model_parallel={"enabled": False})
    records = [dp_record(1), dp_record(2, step=0.11), dp_record(4, step=0.25)]
    frame = build_frame(study, records, {r.run_dir: Extras(Perf(None), provenance={"cpus": 2, "nodes": 1})
                                         for r in records})
    for metric in ("throughput", "efficiency", "step_time"):
        ax = _dp_plot(study, frame, tmp_path / f"{metric}.png", metric).axes[0]
        hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white" and len(line.get_xdata())]
        assert [list(line.get_xdata()) for line in hollow] == [[4]], metric
        measured = ax.lines[0]  # filled markers on the runs that had a CPU per process
        assert list(measured.get_xdata()) == [1, 2, 4] and measured.get_markevery() == [True, True, False]
        assert OVERSUBSCRIBED_LABEL in [t.get_text() for t in ax.get_legend().get_texts()], metric


def test_an_efficiency_above_one_within_the_baselines_spread_is_labelled_noise(tmp_path):
    study = study_of(model_parallel={"enabled": False})
    base = dp_record(1)
    base.step_time_spread = 0.3  # the 1-GPU run's steps spread by 30 % of its median
    records = [base, dp_record(2, step=0.09), dp_record(4, step=0.1)]
    frame = build_frame(study, records, {r.run_dir: Extras(Perf(None)) for r in records})
    ax = _dp_plot(study, frame, tmp_path / "e.png", "efficiency").axes[0]
    notes = [t for t in ax.texts if "noise" in t.get_text()]
    assert len(notes) == 1 and tuple(notes[0].xy) == pytest.approx((2, 0.1 / 0.09))
    assert "step-time spread (30%)" in notes[0].get_text()


def test_dense_vs_moe_labels_stay_inside_the_figure(tmp_path):
    """The layouts of the default configuration, the best at the largest GPU count labelled at the right edge:
    every text's box, as the renderer draws it, lies within the figure."""
    study = study_of(model_parallel={"layouts": {
        "tiny_llama": [{"tp": 2, "sp": True}, {"tp": 4, "sp": True}],
        "tiny_mixtral": [{"tp": 1, "ep": 2}, {"tp": 2, "sp": True}, {"tp": 2, "ep": 2, "sp": True}]}})
    records = [record_of(run, 1000.0 / run.gpus ** 0.5 + 10 * run.tp) for run in study.runs]
    frame = build_frame(study, records, {r.run_dir: Extras(Perf(None)) for r in records})
    fig = dense_vs_moe(study, frame, tmp_path / "dense_vs_moe.png")
    mp_ax = fig.axes[1]
    assert {t.xy[0] for t in mp_ax.texts} == {2, 4}  # labels at the right edge of the axis too
    renderer = texts_inside(fig)
    for text in mp_ax.texts:  # and the layout labels inside their panel
        box, panel = text.get_window_extent(renderer), mp_ax.get_window_extent(renderer)
        assert box.x1 <= panel.x1 + 0.5 and box.y1 <= panel.y1 + 0.5, text.get_text()


def texts_inside(fig):
    """Assert that every text's box, as the renderer draws it (after the constrained layout, as savefig does
    it), lies within the figure; returns the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    frame_box = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    for ax in fig.axes:  # tick labels outside the view are not drawn
        drawn = {id(t) for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels()
                 if axis.get_view_interval().min() - 1e-9 <= t.get_position()[axis is ax.yaxis]
                 <= axis.get_view_interval().max() + 1e-9}
        every = {id(t) for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels(which="both")}
        texts = [t for t in texts if id(t) not in every or id(t) in drawn]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert (box.x0 >= frame_box.x0 - 0.5 and box.y0 >= frame_box.y0 - 0.5 and box.x1 <= frame_box.x1 + 0.5
                and box.y1 <= frame_box.y1 + 0.5), f"{text.get_text()!r} at {box.extents} outside {frame_box.extents}"
    return renderer


def record_of(run, tokens_per_s_per_gpu: float, status: str = "ok") -> RunRecord:
    """A record of one of the study's runs, as the parser makes them (measured columns blank unless ok)."""
    good = status == "ok"
    tps = run.gpus * tokens_per_s_per_gpu
    return RunRecord(run=run, status=status, run_dir=run.directory, step_time_s=run.tokens_per_step / tps if good else None,
                     tokens_per_s=tps if good else None, tokens_per_s_per_gpu=tokens_per_s_per_gpu if good else None,
                     peak_mem_mib=500.0 if good else None, mem_kind="rss")


def test_dense_vs_moe_plot_compares_like_with_like_and_labels_the_layouts(tmp_path):
    study = study_of(model_parallel={"layouts": {"tiny_llama": [{"tp": 2, "sp": True}, {"tp": 4, "sp": True}],
                                                 "tiny_mixtral": [{"tp": 1, "ep": 2}, {"tp": 2, "sp": True}]}})
    measured = {  # tokens/s/GPU by run directory's last part; None: out of memory
        ("tiny_llama", "embedded_gpus1_mbs4_gbs8_seq128"): 1000.0, ("tiny_llama", "embedded_gpus2_mbs4_gbs16_seq128"): 900.0,
        ("tiny_llama", "embedded_gpus4_mbs4_gbs32_seq128"): 800.0,
        ("tiny_mixtral", "embedded_gpus1_mbs4_gbs8_seq128"): 600.0,
        ("tiny_mixtral", "embedded_gpus2_mbs4_gbs16_seq128"): 550.0,
        ("tiny_mixtral", "embedded_gpus4_mbs4_gbs32_seq128"): None,
        ("tiny_llama", "embedded_tp2_ep1_dp1_sp_mbs4_gbs8_seq128"): 400.0,
        ("tiny_llama", "embedded_tp4_ep1_dp1_sp_mbs4_gbs8_seq128"): 300.0,  # 4 GPUs: no MoE run to compare with
        ("tiny_mixtral", "embedded_tp1_ep2_dp1_mbs4_gbs16_seq128"): 700.0,  # the better of its 2-GPU layouts
        ("tiny_mixtral", "embedded_tp2_ep1_dp1_sp_mbs4_gbs8_seq128"): 500.0,
    }
    records = [record_of(run, measured[run.model, run.name] or 0.0, "ok" if measured[run.model, run.name] else "oom")
               for run in study.runs]
    frame = build_frame(study, records, {r.run_dir: Extras(Perf(None)) for r in records})
    path = tmp_path / "dense_vs_moe.png"
    fig = dense_vs_moe(study, frame, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1024
    dp_ax, mp_ax = fig.axes
    assert (dp_ax.get_title(), mp_ax.get_title()) == ("data parallel (LoRA)", "model parallel (full), best layout")

    dp = {line.get_label(): line for line in dp_ax.lines}
    assert set(dp) == {"tiny_llama (dense)", "tiny_mixtral (MoE)"}
    assert (dp["tiny_llama (dense)"].get_linestyle(), dp["tiny_mixtral (MoE)"].get_linestyle()) == ("-", "--")
    assert list(dp["tiny_llama (dense)"].get_xdata()) == [1, 2, 4]
    assert list(dp["tiny_llama (dense)"].get_ydata()) == pytest.approx([1000, 900, 800])
    assert list(dp["tiny_mixtral (MoE)"].get_xdata()) == [1, 2]  # the 4-GPU OOM is left out, not drawn as zero

    mp = {line.get_label(): line for line in mp_ax.lines}
    assert list(mp["tiny_llama (dense)"].get_xdata()) == [2] and list(mp["tiny_llama (dense)"].get_ydata()) == [400]
    assert list(mp["tiny_mixtral (MoE)"].get_xdata()) == [2] and list(mp["tiny_mixtral (MoE)"].get_ydata()) == [700]
    labels = {(text.get_text(), tuple(text.xy)) for text in mp_ax.texts}
    assert labels == {("tp2 ep1 dp1 sp", (2, 400.0)), ("tp1 ep2 dp1", (2, 700.0))}
    assert [t.get_text() for t in mp_ax.get_legend().get_texts()] == ["tiny_llama (dense)", "tiny_mixtral (MoE)"]
    assert dp_ax.get_ylim()[0] == 0 and mp_ax.get_ylim()[0] == 0
    # The table's dense-vs-MoE rows are the same points.
    best = best_layouts(study, frame)
    assert sorted(zip(best["model"], best["layout"])) == [("tiny_llama", "tp2 ep1 dp1 sp"), ("tiny_mixtral", "tp1 ep2 dp1")]


def log_losses(fixture: str) -> tuple[list[int], list[float]]:
    """The steps and losses of an embedded fixture's step lines, read here without the parser."""
    text = (FIXTURES / "embedded" / fixture / "train.log").read_text()
    found = re.findall(r"\[ftscale\] step=(\d+)/\d+ loss=(\S+)", text)
    return [int(step) for step, _ in found], [float(loss) for _, loss in found]


def test_loss_curves_draw_each_run_that_logged_steps_with_the_losses_of_its_log(tmp_path):
    """One line per run that logged steps, its points the (step, loss) of its log's step lines: the complete run
    solid, the run that ran out of memory after 5 of its 12 steps dashed with its status; a failed run that
    logged no step draws no line and is named in the panel."""
    study = study_of(model_parallel={"enabled": False})
    complete, oom = parse_run(COMPLETE), parse_run(FIXTURES / "embedded" / "oom")
    assert (complete.status, oom.status, oom.steps_done) == ("ok", "oom", 5)
    no_steps = dp_record(4, status="oom")
    records = [complete, oom, no_steps]
    frame = build_frame(study, records, {r.run_dir: Extras(Perf(None)) for r in records})
    path = tmp_path / "loss_curves.png"
    fig = loss_curves(study, frame, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1024
    (ax,) = fig.axes
    lines = {line.get_linestyle(): line for line in ax.get_lines()}
    assert len(ax.get_lines()) == 2 and set(lines) == {"-", "--"}
    for style, fixture in (("-", "complete"), ("--", "oom")):
        steps, losses = log_losses(fixture)
        assert list(lines[style].get_xdata()) == steps
        assert list(lines[style].get_ydata()) == pytest.approx(losses)
    assert len(log_losses("complete")[0]) == 12 and len(log_losses("oom")[0]) == 5
    assert lines["-"].get_label() == "2 GPUs, mbs 4: embedded"
    assert lines["--"].get_label() == "2 GPUs, mbs 4: embedded [oom after 5 of 12 steps]"
    assert ax.get_title() == "tiny_llama, data parallel (LoRA): corpus data, global batch 16, seq 128"
    assert any("embedded_gpus4_mbs4_gbs32_seq128 (oom, no step logged)" in t.get_text() for t in ax.texts)
    assert "losses" not in csv_frame(frame) and "dataset" not in csv_frame(frame)  # the plot's, not the CSV's


def test_loss_curves_say_when_runs_are_not_comparable_step_by_step(tmp_path):
    """Weak scaling: each GPU count has its own global batch; the panel says so and the labels name it.
    One panel per model and track, every text inside the figure."""
    study = study_of(model_parallel={"layouts": {"tiny_llama": [{"tp": 2, "sp": True}]}})
    records = [record_of(run, 1000.0) for run in study.runs]
    for r in records:
        r.losses = [(1, 7.0), (2, 6.5 + 0.01 * r.run.gpus), (3, 6.2)]
    frame = build_frame(study, records, {r.run_dir: Extras(Perf(None)) for r in records})
    fig = loss_curves(study, frame, tmp_path / "loss_curves.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "tiny_llama, data parallel (LoRA): runs differ in global batch (8, 16, 32): not comparable step by step",
        "tiny_mixtral, data parallel (LoRA): runs differ in global batch (8, 16, 32): not comparable step by step",
        "tiny_llama, model parallel (full fine-tuning): corpus data, global batch 8, seq 128"]
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["1 GPU, mbs 4, global batch 8: embedded", "2 GPUs, mbs 4, global batch 16: embedded",
                      "4 GPUs, mbs 4, global batch 32: embedded"]
    assert [line.get_label() for line in fig.axes[2].get_lines()] == ["tp2 ep1 dp1 sp, mbs 4: embedded"]
    texts_inside(fig)


# --------------------------------------------------------------------------- predicted vs measured


def mp_record(model: str, tp: int, ep: int, state: float | None, status: str = "ok") -> RunRecord:
    """A model-parallel CPU run of ``model`` as the embedded engine reports it (fp32, RSS)."""
    good = status == "ok"
    name = f"embedded_tp{tp}_ep{ep}_dp1{'_sp' if tp > 1 else ''}_mbs4_gbs8_seq128"
    run = make_run(track="model_parallel", model=model, gpus=tp * ep, tp=tp, ep=ep, dp=1, sp=tp > 1, micro_batch=4,
                   global_batch=8, seq_length=128, steps=12, warmup_steps=2)
    assert run.name == name
    return RunRecord(run=run, status=status, step_time_s=0.1 if good else None, tokens_per_s=8 * 128 / 0.1 if good else None,
                     tokens_per_s_per_gpu=8 * 128 / 0.1 / (tp * ep) if good else None,
                     peak_mem_mib=800.0 if good else None, mem_kind="rss" if good else "", state_mib=state,
                     layout={"device": "cpu", "dtype": "float32"}, run_dir=f"experiments/model_parallel/{model}/{name}")


def test_on_the_cpu_only_the_model_state_is_compared_with_the_prediction():
    r = mp_record("tiny_llama", 2, 1, state=4.5)
    cols = prediction_columns(load_model("tiny_llama", REPO).spec, r, Target())
    # full fine-tuning in fp32: weights, gradients and AdamW's two moments, 16 bytes per parameter held
    predicted = params_per_gpu(TINY, 2, 1) * 16 / 2**20
    assert cols["predicted_state_mib"] == pytest.approx(predicted)
    assert cols["state_error_pct"] == pytest.approx((predicted - 4.5) / 4.5 * 100)
    assert cols["predicted_peak_mem_mib"] > 0 and cols["predicted_step_time_s"] > 0  # in the CSV, as predicted
    assert cols.get("peak_mem_error_pct") is None and cols.get("step_time_error_pct") is None  # RSS, CPU time
    assert "RSS" in cols["prediction_note"] and "model state is" in cols["prediction_note"]
    failed = prediction_columns(load_model("tiny_llama", REPO).spec, mp_record("tiny_llama", 2, 1, None, "oom"),
                                Target())
    assert failed.get("state_error_pct") is None and failed["prediction_note"] == "run oom: nothing measured to compare"


def _example_runs() -> list:
    runs = sorted(p.parent for p in (REPO / "results" / "examples").glob("*/experiments/*/*/*/run.json")
                  if "device=cuda" in (p.parent / "train.log").read_text(errors="replace"))
    return [pytest.param(run_dir, id=f"{run_dir.parents[3].name}/{run_dir.name}") for run_dir in runs]


@pytest.mark.parametrize("run_dir", _example_runs())
def test_the_gpu_examples_get_predicted_columns_with_their_errors(run_dir):
    """What the analysis adds to each committed GPU example: CUDA peak and step time compared (the plan's
    calibration, tests/unit/estimate/test_plan.py), state compared where the log has state_mib, else blank with the reason."""
    example = run_dir.parents[3]
    rec = parse_run(run_dir, root=example)
    cols = prediction_columns(load_model(rec.run.model, REPO).spec, rec, Target())
    assert cols["predicted_peak_mem_mib"] > 0 and cols["predicted_step_time_s"] > 0
    device = next(line for line in (example / "provenance.txt").read_text().splitlines() if "NVIDIA" in line)
    on_its_gpu = predict(rec.run, load_model(rec.run.model, REPO).spec, target=Target(gpu=gpu_for_device(
        device.split(",")[0])), built=rec.layout or None)
    if rec.status == "ok":
        assert rec.mem_kind == "cuda" and on_its_gpu["fit"] != PREDICTED_OOM
        if rec.peak_mem_mib >= 1024:  # below, the allocator's fixed overhead dominates (NeMo's tiny run)
            assert abs(cols["peak_mem_error_pct"]) <= 5  # tests/unit/estimate/test_plan.py MEMORY_TOLERANCE_PCT
        assert cols["step_time_error_pct"] == pytest.approx((cols["predicted_step_time_s"] - rec.step_time_s)
                                                            / rec.step_time_s * 100)
        if rec.state_mib is None:  # logs before state_mib, and the NeMo/AutoModel step lines
            assert cols["state_error_pct"] is None and "no state_mib" in cols["prediction_note"]
        else:
            assert abs(cols["state_error_pct"]) < 0.1
        assert "798 TFLOP/s (plan.matmul_tflops)" in cols["prediction_note"]
    else:
        assert rec.status == "oom" and on_its_gpu["fit"] == PREDICTED_OOM
        assert cols.get("peak_mem_error_pct") is None


def test_mp_memory_plot_shows_the_model_state_and_its_prediction(tmp_path):
    study = study_of(model_parallel={"layouts": {"tiny_mixtral": [{"tp": 1, "ep": 2}, {"tp": 2, "sp": True},
                                                                  {"tp": 2, "ep": 2, "sp": True}]}})
    records = [mp_record("tiny_mixtral", 1, 2, 9.0), mp_record("tiny_mixtral", 2, 1, 8.0),
               mp_record("tiny_mixtral", 2, 2, 4.7), mp_record("tiny_mixtral", 2, 2, None, "oom")]
    records[-1].run_dir += "_failed"  # a fourth row, failed: left out of the bars
    spec = load_model("tiny_mixtral", REPO).spec
    extras = {r.run_dir: Extras(Perf(None), predicted=prediction_columns(spec, r, Target())) for r in records}
    frame = build_frame(study, records, extras)
    fig = mp_memory(study, frame, tmp_path / "m.png")
    ax = fig.axes[0]
    assert [b.get_height() for b in ax.patches] == [9.0, 8.0, 4.7]  # measured state, not the 800 MiB of RSS
    assert "model state" in ax.get_ylabel()
    predicted = ax.collections[0].get_offsets()[:, 1]
    assert list(predicted) == pytest.approx(list(frame["predicted_state_mib"][:3]))
    assert any("(oom)" in t.get_text() for t in ax.texts)


# --------------------------------------------------------------------------- references


SPEC = {"value": 100.0, "lower": -0.1, "upper": 0.2, "unit": "tokens/s/GPU"}


@pytest.mark.parametrize("measured, flag", [
    (90.0, "within"),    # on the lower bound, 100 x (1 - 0.1)
    (120.0, "within"),   # on the upper bound, 100 x (1 + 0.2)
    (100.0, "within"),
    (95.5, "within"),
    (89.99, "below"),
    (120.01, "above"),
    (None, "no measurement"),
])
def test_flag_at_inside_and_outside_the_bounds(measured, flag):
    assert flag_value(measured, SPEC) == flag


def test_unbounded_side():
    assert flag_value(1e9, {**SPEC, "upper": None}) == "within"
    assert flag_value(1.0, {**SPEC, "lower": None}) == "within"


def write_refs(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "references.yaml"
    path.write_text(yaml.safe_dump({"references": entries}))
    return path


def entry(**where) -> dict:
    return {"model": "m", "track": "data_parallel", "where": where, "source": "test",
            "metrics": {"tokens_per_s_per_gpu": {"value": 100, "lower": -0.1, "upper": 0.1, "unit": "tokens/s/GPU"}}}


def test_most_specific_reference_wins_and_no_reference(tmp_path):
    refs = load_references(write_refs(tmp_path, [{**entry(gpus=1), "name": "one"},
                                                 {**entry(gpus=1, device="H100-SXM"), "name": "h100"}]))
    facts = {"model": "m", "track": "data_parallel", "gpus": 1, "device": "H100-SXM"}
    res = check(refs, facts, {"tokens_per_s_per_gpu": 80.0})
    assert res.entry.name == "h100" and res.flag("throughput") == "below"
    assert res.flag("memory") == "no reference" and res.summary() == "throughput below (-20%)"
    assert check(refs, {**facts, "device": "cpu"}, {"tokens_per_s_per_gpu": 105.0}).entry.name == "one"
    none = check(refs, {**facts, "gpus": 2}, {"tokens_per_s_per_gpu": 100.0})
    assert none.entry is None and none.summary() == "no reference"


def test_one_throughput_verdict_whichever_metric_the_entry_gives(tmp_path):
    """Step time is the reciprocal of throughput: a step time above its bounds is throughput below,
    and the two can never contradict each other (an entry gives one of them)."""
    slow = {**entry(), "name": "slow"}
    slow["metrics"] = {"step_time_s": {"value": 1.0, "lower": -0.1, "upper": 0.1, "unit": "s"},
                       "peak_mem_mib": {"value": 400.0, "lower": -0.2, "upper": 0.2, "unit": "MiB"}}
    refs = load_references(write_refs(tmp_path, [slow]))
    facts = {"model": "m", "track": "data_parallel"}
    res = check(refs, facts, {"step_time_s": 1.25, "peak_mem_mib": 401.0})
    assert res.flag("throughput") == "below" and res.flag("memory") == "within"
    assert res.summary() == "throughput below (-20%); memory within"  # no "+-0%": under 1 % is no news
    assert check(refs, facts, {"step_time_s": 0.8}).flag("throughput") == "above"
    both = {**entry(), "name": "both"}
    both["metrics"]["step_time_s"] = {"value": 1.0, "lower": -0.1, "upper": 0.1, "unit": "s"}
    with pytest.raises(ReferencesError, match=r"references\[0\]'.metrics = tokens_per_s_per_gpu, step_time_s: these "
                                              "measure the same throughput"):
        load_references(write_refs(tmp_path, [both]))


def test_equally_specific_references_are_an_error(tmp_path):
    refs = load_references(write_refs(tmp_path, [{**entry(gpus=1), "name": "a"}, {**entry(device="cpu"), "name": "b"}]))
    with pytest.raises(ReferencesError, match="'a' and 'b' both match"):
        check(refs, {"model": "m", "track": "data_parallel", "gpus": 1, "device": "cpu"}, {})


def test_bad_references_name_the_key(tmp_path):
    bad_unit = entry()
    bad_unit["metrics"]["tokens_per_s_per_gpu"]["unit"] = "MiB"
    with pytest.raises(ReferencesError, match=r"references\[0\]'.metrics.tokens_per_s_per_gpu.unit = 'MiB'"):
        load_references(write_refs(tmp_path, [bad_unit]))
    with pytest.raises(ValueError, match=r"key 'references\[0\].where.gpu'|gpu"):
        load_references(write_refs(tmp_path, [entry(gpu=1)]))
    with pytest.raises(ReferencesError, match="same model, track and 'where'"):
        load_references(write_refs(tmp_path, [entry(gpus=1), entry(gpus=1)]))


def test_the_shipped_references_load_with_their_sources():
    refs = load_references(REPO / "config" / "references.yaml")
    automodel = next(r for r in refs if r.model == "llama31_8b")
    assert automodel.metrics["tokens_per_s_per_gpu"]["value"] == 12473 and "AutoModel" in automodel.source
    assert automodel.where == {"gpus": 1, "device": "H100-SXM"}
    assert all(r.source.strip() for r in refs)


# --------------------------------------------------------------------------- participant comparison


def test_comparison_of_participants(tmp_path):
    others = sorted((ANALYSIS / "participants").glob("*.csv"))
    md, png = tmp_path / "comparison.md", tmp_path / "plots" / "comparison.png"
    write_comparison(ANALYSIS / "ours.csv", others, md, png)
    text = re.sub(r" +", " ", md.read_text())  # cells without their padding
    assert "6 runs of 2 participant(s)" in text  # alice_again.csv repeats a row of alice.csv: kept once
    assert "## tiny_llama: data parallel (LoRA)" in text
    assert "| gpus1_mbs4_gbs8_seq128 | 1 | tp1 ep1 dp1 | alice | NVIDIA H100 80GB HBM3 | 34,556 | 100.0% |" in text  # fmt_percent, as tables.md
    assert "| gpus1_mbs4_gbs8_seq128 | 1 | tp1 ep1 dp1 | carol | AMD EPYC | 23,037 | 66.7% |" in text
    assert "| alice | NVIDIA H100 80GB HBM3 | | | | | | | oom: out of GPU memory |" in text
    assert "[tokens/s/GPU per configuration and participant](plots/comparison.png)" in text
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1024


def test_participant_file_missing_a_column():
    bad = ANALYSIS / "bad" / "missing_column.csv"
    with pytest.raises(CompareError, match=rf"{bad}: missing column\(s\) 'tokens_per_s_per_gpu'"):
        merge([ANALYSIS / "ours.csv", bad])


def test_participant_file_of_another_schema_version():
    bad = ANALYSIS / "bad" / "schema_v1.csv"
    with pytest.raises(CompareError, match=rf"{bad}:3: column 'schema_version' = '1'.*reads schema_version 2"):
        merge([ANALYSIS / "ours.csv", bad])


def test_duplicate_runs_within_a_file_and_across_files():
    dup = ANALYSIS / "bad" / "duplicate.csv"
    with pytest.raises(CompareError, match=rf"{dup}:3: duplicate run \(participant='alice', model='tiny_llama', "
                                           rf"track='data_parallel', run='gpus1_mbs4_gbs8_seq128'.*also at {dup}:2"
                                           r".*tokens_per_s_per_gpu"):
        merge([dup])
    alice, conflict = ANALYSIS / "participants" / "alice.csv", ANALYSIS / "bad" / "alice_conflict.csv"
    with pytest.raises(CompareError, match=rf"{conflict}:2: duplicate run .*also at {alice}:3.*step_time_s"):
        merge([alice, conflict])


MEASURED = ["step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "peak_mem_mib", "reserved_mib", "state_mib",
            "loss_first", "loss_last", "speedup", "efficiency", "tflops_per_gpu", "mfu", "peak_mem_error_pct",
            "state_error_pct", "step_time_error_pct"]


@pytest.mark.parametrize("fixture", ["truncated", "oom", "crashed_rank"])
def test_a_run_not_ok_has_blank_figures_and_no_measurement(tmp_path, fixture):
    """A run killed mid-training (or failed) has steps in its log: none of them becomes a figure, and its
    reference verdict is ``no measurement`` whether or not an entry matches it."""
    study = study_of()
    run_dir = tmp_path / "experiments/data_parallel/tiny_llama/embedded_gpus2_mbs4_gbs16_seq128"
    shutil.copytree(FIXTURES / "embedded" / fixture, run_dir)
    (tmp_path / "config").mkdir()
    refs = yaml.safe_load((REPO / "config" / "references.yaml").read_text())
    refs["references"].append({"model": "tiny_llama", "track": "data_parallel", "where": {"gpus": 2},
                               "source": "test", "name": "two",
                               "metrics": {"peak_mem_mib": {"value": 400, "lower": -0.5, "upper": 0.5, "unit": "MiB"}}})
    (tmp_path / "config" / "references.yaml").write_text(yaml.safe_dump(refs))
    write_results(study, tmp_path / "results/scaling.csv", tmp_path / "results/tables.md", root=tmp_path)
    row = next(r for r in csv.DictReader((tmp_path / "results/scaling.csv").open())
               if r["run"] == "embedded_gpus2_mbs4_gbs16_seq128")
    assert row["status"] != "ok" and row["reason"]
    assert {c: row[c] for c in MEASURED} == dict.fromkeys(MEASURED, "")
    assert row["ref_throughput"] == row["ref_memory"] == "no measurement"
    not_run = next(r for r in csv.DictReader((tmp_path / "results/scaling.csv").open())
                   if r["run"] == "embedded_gpus4_mbs4_gbs32_seq128")
    assert not_run["ref_throughput"] == "no measurement"
    assert "no measurement" in (tmp_path / "results/tables.md").read_text()


def test_a_first_run_has_nothing_to_do_again(tmp_path):
    """results/redo.txt lists the runs that had finished and lost their outputs, never the runs not yet run
    (or failed: the workflow runs those anyway)."""
    from ftscale.analyze.results import REDO_FILE, mark_for_redo

    study = study_of()
    assert mark_for_redo(study, tmp_path) == {}
    lines = (tmp_path / REDO_FILE).read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("# runs to do again")

    base = tmp_path / "experiments/data_parallel/tiny_llama"
    shutil.copytree(COMPLETE, base / "embedded_gpus2_mbs4_gbs16_seq128")  # finished; metrics.jsonl deleted
    (base / "embedded_gpus2_mbs4_gbs16_seq128" / "metrics.jsonl").unlink(missing_ok=True)
    shutil.copytree(FIXTURES / "embedded" / "truncated", base / "embedded_gpus4_mbs4_gbs32_seq128")  # never finished
    (tmp_path / "results/scaling.csv").write_text(  # the last results: the 1-GPU run was ok, its directory is gone
        "track,model,run,status\ndata_parallel,tiny_llama,embedded_gpus1_mbs4_gbs8_seq128,ok\n"
        "data_parallel,tiny_llama,embedded_gpus4_mbs4_gbs32_seq128,incomplete\n")
    redo = mark_for_redo(study, tmp_path)
    assert sorted(redo) == [f"experiments/data_parallel/tiny_llama/embedded_gpus{n}" for n in
                            ("1_mbs4_gbs8_seq128", "2_mbs4_gbs16_seq128")]
    assert "the log shows a finished run" in redo[str(base.relative_to(tmp_path) / "embedded_gpus2_mbs4_gbs16_seq128")]
    assert len((tmp_path / REDO_FILE).read_text().splitlines()) == 3
