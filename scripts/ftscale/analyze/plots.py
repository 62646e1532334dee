"""The study's plots (PNG, matplotlib's Agg backend, no display needed), under results/plots/.

``PLOTS`` names every file; each is written even when the study has nothing to show for it (a
figure that says so), so that the workflow's outputs are the same for every configuration. Only
runs with status ``ok`` are plotted: a failed run is left out, never drawn as zero, and the panel
lists what it left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ftscale.analyze.parse import RunRecord  # noqa: E402
from ftscale.analyze.tables import scaling  # noqa: E402
from ftscale.study.sweep import Study  # noqa: E402

#: file stem -> title; the files are results/plots/<stem>.png.
PLOTS: dict[str, str] = {
    "dp_throughput": "Data parallel (LoRA): throughput vs GPUs",
    "dp_efficiency": "Data parallel (LoRA): scaling efficiency vs GPUs",
    "dp_step_time": "Data parallel (LoRA): step time vs GPUs",
    "mp_memory": "Model parallel (full fine-tuning): peak memory per GPU by layout",
    "dense_vs_moe": "Dense vs mixture of experts: tokens/s/GPU vs GPUs",
}
DPI = 110


def plot_paths(directory: Path | str = "results/plots") -> dict[str, Path]:
    return {stem: Path(directory) / f"{stem}.png" for stem in PLOTS}


def ok(r: RunRecord) -> bool:
    return r.status == "ok" and r.tokens_per_s is not None


def _figure(panels: int, title: str) -> tuple[Figure, list[Axes]]:
    panels = max(panels, 1)
    fig = Figure(figsize=(max(4.6 * panels, 7.0), 3.8), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0].tolist()
    fig.suptitle(title)
    return fig, axes


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _left_out(ax: Axes, records: Iterable[RunRecord], label: Callable[[RunRecord], str]) -> None:
    bad = [f"{label(r)} ({r.status})" for r in records if not ok(r)]
    if bad:
        ax.text(0.01, 0.01, "not plotted: " + ", ".join(bad), transform=ax.transAxes, fontsize=7, va="bottom",
                color="0.35", wrap=True)


def _gpu_axis(ax: Axes, gpus: Iterable[int]) -> None:
    ticks = sorted(set(gpus))
    if len(ticks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("GPUs (processes)")
    ax.grid(True, alpha=0.3)


def _dp_groups(study: Study, by_dir: dict[str, RunRecord], model: str) -> dict[str, list[RunRecord]]:
    return {mode: [by_dir[r.directory] for r in runs] for mode, runs in study.scaling_groups(model).items()}


def _dp_plot(study: Study, records: list[RunRecord], path: Path, metric: str) -> Figure:
    """metric: throughput (tokens/s of the job), efficiency, or step_time; ideal scaling dashed."""
    by_dir = {r.run_dir: r for r in records}
    models = [m for m in study.models if any(r.model == m and r.track == "data_parallel" for r in records)]
    fig, axes = _figure(len(models), PLOTS[f"dp_{metric}"])
    if not models:
        _empty(axes[0], "no data-parallel runs in this study")
    for ax, model in zip(axes, models):
        ax.set_title(model)
        plotted = False
        for mode, recs in _dp_groups(study, by_dir, model).items():
            sc = scaling(recs)
            points = [(r, s, e) for r, (s, e) in zip(recs, sc) if ok(r)]
            if metric == "throughput":
                ys = [r.tokens_per_s for r, _, _ in points]
            elif metric == "efficiency":
                points = [(r, s, e) for r, s, e in points if e is not None]
                ys = [e for _, _, e in points]
            else:
                ys = [r.step_time_s for r, _, _ in points]
            xs = [r.gpus for r, _, _ in points]
            if not xs:
                continue
            plotted = True
            (line,) = ax.plot(xs, ys, marker="o", label=f"{mode} scaling")
            base = next((r for r, _, _ in points if r.gpus == 1), None)
            if base is not None and metric != "efficiency":
                ideal_x = sorted({r.gpus for r in recs})
                if metric == "throughput":
                    ideal = [base.tokens_per_s * n for n in ideal_x]
                else:  # weak: constant step time; strong: T(1) / N
                    ideal = [base.step_time_s / (n if mode.startswith("strong") else 1) for n in ideal_x]
                ax.plot(ideal_x, ideal, linestyle="--", color=line.get_color(), alpha=0.5,
                        label=f"ideal ({mode})")
        if metric == "efficiency" and plotted:
            ax.axhline(1.0, linestyle="--", color="0.5", alpha=0.6, label="ideal")
            ax.set_ylim(bottom=0)
        _gpu_axis(ax, [r.gpus for r in records if r.model == model and r.track == "data_parallel"])
        ax.set_ylabel({"throughput": "tokens/s (whole job)", "efficiency": "efficiency S(N)/N",
                       "step_time": "median step time (s)"}[metric])
        if plotted:
            ax.legend(fontsize=8)
        else:
            _empty(ax, "no successful runs")
        _left_out(ax, [r for r in records if r.model == model and r.track == "data_parallel"], lambda r: r.run)
    fig.savefig(path, dpi=DPI)
    return fig


def _layout_label(r: RunRecord) -> str:
    return f"tp{r.tp} ep{r.ep} dp{r.dp}" + (" sp" if r.sp else "")


def mp_memory(study: Study, records: list[RunRecord], path: Path) -> Figure:
    mp = [r for r in records if r.track == "model_parallel"]
    models = [m for m in study.models if any(r.model == m for r in mp)]
    fig, axes = _figure(len(models), PLOTS["mp_memory"])
    if not models:
        _empty(axes[0], "no model-parallel runs in this study")
    for ax, model in zip(axes, models):
        recs = sorted((r for r in mp if r.model == model), key=lambda r: (r.gpus, r.tp, r.ep))
        good = [r for r in recs if ok(r) and r.peak_mem_mib is not None]
        ax.set_title(model)
        if good:
            bars = ax.bar([_layout_label(r) for r in good], [r.peak_mem_mib for r in good], color="tab:blue")
            ax.bar_label(bars, fmt="{:,.0f}", fontsize=7)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            kinds = sorted({"RSS" if r.mem_kind == "rss" else "CUDA" for r in good})
            ax.set_ylabel(f"peak memory per GPU (MiB, {'/'.join(kinds)})")
            ax.grid(True, axis="y", alpha=0.3)
        else:
            _empty(ax, "no successful runs")
        _left_out(ax, recs, _layout_label)
    fig.savefig(path, dpi=DPI)
    return fig


def dense_vs_moe(study: Study, records: list[RunRecord], path: Path) -> Figure:
    """tokens/s/GPU vs GPUs per model: dense solid, MoE dashed; data parallel (the first weak scaling
    group, else the first group) and model parallel (best layout per GPU count) side by side."""
    tracks = [t for t in ("data_parallel", "model_parallel") if any(r.track == t for r in records)]
    fig, axes = _figure(len(tracks), PLOTS["dense_vs_moe"])
    if not tracks:
        _empty(axes[0], "no runs in this study")
    by_dir = {r.run_dir: r for r in records}
    for ax, track in zip(axes, tracks):
        ax.set_title({"data_parallel": "data parallel (LoRA)", "model_parallel": "model parallel (full)"}[track])
        plotted = False
        for model in study.models:
            if track == "data_parallel":
                groups = _dp_groups(study, by_dir, model) if any(
                    r.model == model and r.track == track for r in records) else {}
                recs = next((g for mode, g in groups.items() if mode.startswith("weak")),
                            next(iter(groups.values()), []))
                points = sorted((r.gpus, r.tokens_per_s_per_gpu) for r in recs if ok(r))
            else:
                best: dict[int, float] = {}
                for r in records:
                    if r.track == track and r.model == model and ok(r):
                        best[r.gpus] = max(best.get(r.gpus, 0.0), r.tokens_per_s_per_gpu or 0.0)
                points = sorted(best.items())
            if not points:
                continue
            plotted = True
            moe = study.models[model].is_moe
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="s" if moe else "o",
                    linestyle="--" if moe else "-", label=f"{model} ({'MoE' if moe else 'dense'})")
        _gpu_axis(ax, [r.gpus for r in records if r.track == track])
        ax.set_ylabel("tokens/s/GPU")
        if plotted:
            ax.legend(fontsize=8)
        else:
            _empty(ax, "no successful runs")
    fig.savefig(path, dpi=DPI)
    return fig


def write_plots(study: Study, records: list[RunRecord], directory: Path | str = "results/plots") -> dict[str, Path]:
    """Every plot of ``PLOTS`` under ``directory``; returns title -> path (for the links in tables.md)."""
    paths = plot_paths(directory)
    Path(directory).mkdir(parents=True, exist_ok=True)
    _dp_plot(study, records, paths["dp_throughput"], "throughput")
    _dp_plot(study, records, paths["dp_efficiency"], "efficiency")
    _dp_plot(study, records, paths["dp_step_time"], "step_time")
    mp_memory(study, records, paths["mp_memory"])
    dense_vs_moe(study, records, paths["dense_vs_moe"])
    return {PLOTS[stem]: path for stem, path in paths.items()}
