"""The study's plots (PNG, matplotlib's Agg backend, no display needed), under results/plots/.

``PLOTS`` names every file; each is written even when the study has nothing to show for it (a
figure that says so), so that the workflow's outputs are the same for every configuration. Only
runs with status ``ok`` are plotted: a failed run is left out, never drawn as zero, and the panel
lists what it left out. The loss curves are the one exception: a run that stopped early is drawn
dashed up to the last step it logged (its losses are real; only what it did not log is missing).
Every plot reads the analysis frame (``ftscale.analyze.frame``), the same rows
as the tables; axes of throughput, step time, efficiency and memory start at zero, so that a ratio to
ideal scaling reads true. A run with fewer CPUs than processes (``oversubscribed``) is drawn hollow, with
a legend entry that says so: its step time measures the sharing of the CPUs, not the scaling. An
efficiency above 1 within its 1-GPU run's step-time spread is labelled noise (``frame.scaling_rows``).
Every label stays inside its figure (``test_analysis`` checks the text boxes with the renderer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ftscale.analyze.frame import NOISE, scaling_rows  # noqa: E402
from ftscale.analyze.parse import clipped  # noqa: E402
from ftscale.analyze.tables import TRACK_TITLES, best_layouts, layout_label  # noqa: E402
from ftscale.study.sweep import Study  # noqa: E402

#: file stem -> title; the files are results/plots/<stem>.png.
PLOTS: dict[str, str] = {
    "dp_throughput": "Data parallel (LoRA): throughput vs GPUs",
    "dp_efficiency": "Data parallel (LoRA): scaling efficiency vs GPUs",
    "dp_step_time": "Data parallel (LoRA): step time vs GPUs",
    "mp_memory": "Model parallel (full fine-tuning): memory per GPU by layout",
    "dense_vs_moe": "Dense vs mixture of experts: tokens/s/GPU vs GPUs",
    "loss_curves": "Training loss vs optimizer step, per model and track",
}
DPI = 110
OVERSUBSCRIBED_LABEL = "oversubscribed: fewer CPUs than processes"


def plot_paths(directory: Path | str = "results/plots") -> dict[str, Path]:
    return {stem: Path(directory) / f"{stem}.png" for stem in PLOTS}


def ok(rows: pd.DataFrame) -> pd.Series:
    return rows["status"].eq("ok") & rows["tokens_per_s"].notna()


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


def _left_out(ax: Axes, rows: pd.DataFrame, label: Callable[[pd.Series], str]) -> None:
    _not_plotted(ax, [f"{label(row)} ({row['status']})" for _, row in rows[~ok(rows)].iterrows()])


def _not_plotted(ax: Axes, items: list[str]) -> None:
    if items:
        ax.text(0.01, 0.01, "not plotted: " + ", ".join(items), transform=ax.transAxes, fontsize=7, va="bottom",
                color="0.35", wrap=True)


def _gpu_axis(ax: Axes, gpus: Iterable[int]) -> None:
    ticks = sorted({int(g) for g in gpus})
    if len(ticks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("GPUs (processes)")
    ax.grid(True, alpha=0.3)


def _dp_plot(study: Study, frame: pd.DataFrame, path: Path, metric: str) -> Figure:
    """metric: throughput (tokens/s of the job), efficiency, or step_time; ideal scaling dashed."""
    rows = scaling_rows(study, frame)
    dp = frame[frame["track"] == "data_parallel"]
    models = [m for m in study.models if (dp["model"] == m).any()]
    fig, axes = _figure(len(models), PLOTS[f"dp_{metric}"])
    if not models:
        _empty(axes[0], "no data-parallel runs in this study")
    column = {"throughput": "tokens_per_s", "efficiency": "efficiency", "step_time": "step_time_s"}[metric]
    for ax, model in zip(axes, models):
        ax.set_title(model)
        plotted = oversubscribed = False
        top = 0.0
        for group, recs in rows[rows["model"] == model].groupby("group", sort=False):
            recs = recs.sort_values("gpus")
            points = recs[ok(recs) & recs[column].notna()]
            if points.empty:
                continue
            plotted = True
            label = group.split(": ", 1)[1]
            shared = points["oversubscribed"].eq(True).tolist()
            (line,) = ax.plot(points["gpus"], points[column], marker="o", label=label,
                              markevery=[not s for s in shared])
            if any(shared):  # the same points hollow: their step time measures the sharing of the CPUs
                hollow = points[shared]
                ax.plot(hollow["gpus"], hollow[column], marker="o", linestyle="none", markerfacecolor="white",
                        color=line.get_color(), zorder=3)
                oversubscribed = True
            if metric == "efficiency":
                for _, row in points[points["above_ideal"].eq(NOISE)].iterrows():
                    ax.annotate(f"noise: within the 1-GPU run's\nstep-time spread ({row['baseline_spread']:.0%})",
                                (row["gpus"], row["efficiency"]), fontsize=7, textcoords="offset points",
                                xytext=(0, 6), ha="center", va="bottom", color=line.get_color(),
                                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"})
                    top = max(top, row["efficiency"] * 1.3)  # room for the note inside the panel
            base = points[points["gpus"] == 1]
            if not base.empty and metric != "efficiency":
                ideal_x = sorted(recs["gpus"].unique())
                b = base.iloc[0]
                if metric == "throughput":
                    ideal = [b["tokens_per_s"] * n for n in ideal_x]
                else:  # weak: constant step time; strong: T(1) / N
                    ideal = [b["step_time_s"] / (n if b["mode"] == "strong" else 1) for n in ideal_x]
                ax.plot(ideal_x, ideal, linestyle="--", color=line.get_color(), alpha=0.5, label=f"ideal ({label})")
        if metric == "efficiency" and plotted:
            ax.axhline(1.0, linestyle="--", color="0.5", alpha=0.6, label="ideal")
        ax.set_ylim(bottom=0)
        if top > ax.get_ylim()[1]:
            ax.set_ylim(top=top)
        _gpu_axis(ax, dp.loc[dp["model"] == model, "gpus"])
        ax.set_ylabel({"throughput": "tokens/s (whole job)", "efficiency": "efficiency S(N)/N",
                       "step_time": "median step time (s)"}[metric])
        if oversubscribed:  # one legend entry, in no group's colour
            ax.plot([], [], marker="o", linestyle="none", markerfacecolor="white", color="0.3",
                    label=OVERSUBSCRIBED_LABEL)
        if plotted:
            ax.legend(fontsize=8)
        else:
            _empty(ax, "no successful runs")
        _left_out(ax, dp[dp["model"] == model], lambda row: row["run"])
    fig.savefig(path, dpi=DPI)
    return fig


def mp_memory(study: Study, frame: pd.DataFrame, path: Path) -> Figure:
    """Per model, one bar per layout: the model state per GPU the runs measured (``state_mib``: what TP
    and EP divide), the plan's prediction of it marked beside; where no run of the model reports its
    state (logs from before it, NeMo), the peak memory instead, labelled as such."""
    mp = frame[frame["track"] == "model_parallel"]
    models = [m for m in study.models if (mp["model"] == m).any()]
    fig, axes = _figure(len(models), PLOTS["mp_memory"])
    if not models:
        _empty(axes[0], "no model-parallel runs in this study")
    for ax, model in zip(axes, models):
        recs = mp[mp["model"] == model].sort_values(["gpus", "tp", "ep"])
        state = recs["state_mib"].notna().any()
        metric = "state_mib" if state else "peak_mem_mib"
        good = recs[ok(recs) & recs[metric].notna()]
        ax.set_title(model)
        if not good.empty:
            labels = good.apply(layout_label, axis=1)
            bars = ax.bar(labels, good[metric], color="tab:blue", label="measured")
            ax.bar_label(bars, fmt="{:,.1f}" if state else "{:,.0f}", fontsize=7, padding=4)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            if state:
                ax.scatter(labels, good["predicted_state_mib"], marker="_", s=400, color="black", zorder=3,
                           label="predicted")
                ax.set_ylabel("model state per GPU (MiB: parameters,\ngradients, optimizer state)")
                ax.legend(fontsize=8, loc="lower right")
            else:
                kinds = sorted({"RSS" if k == "rss" else "CUDA" for k in good["mem_kind"]})
                ax.set_ylabel(f"peak memory per GPU (MiB, {'/'.join(kinds)})")
            ax.margins(y=0.1)  # room for the labels above the tallest bar
            ax.set_ylim(bottom=0)
            ax.grid(True, axis="y", alpha=0.3)
        else:
            _empty(ax, "no successful runs")
        _left_out(ax, recs, layout_label)
    fig.savefig(path, dpi=DPI)
    return fig


def dense_vs_moe(study: Study, frame: pd.DataFrame, path: Path) -> Figure:
    """tokens/s/GPU vs GPUs per model: dense solid, MoE dashed. Data parallel: the first weak scaling
    group of each model (else its first group). Model parallel: the best layout at each GPU count
    where a dense and a MoE model both ran (``tables.best_layouts``, as the table), labelled."""
    tracks = [t for t in ("data_parallel", "model_parallel") if (frame["track"] == t).any()]
    fig, axes = _figure(len(tracks), PLOTS["dense_vs_moe"])
    if not tracks:
        _empty(axes[0], "no runs in this study")
    rows = scaling_rows(study, frame)
    best = best_layouts(study, frame)
    for ax, track in zip(axes, tracks):
        ax.set_title({"data_parallel": "data parallel (LoRA)", "model_parallel": "model parallel (full), best layout"}[
            track])
        plotted = False
        for model in study.models:
            if track == "data_parallel":
                mine = rows[rows["model"] == model]
                groups = list(dict.fromkeys(mine["group"]))
                group = next((g for g in groups if "weak" in g.split(": ", 1)[1].split(", ")), groups[0] if groups
                             else None)
                points = mine[(mine["group"] == group) & ok(mine)].sort_values("gpus")
            else:
                points = best[best["model"] == model].sort_values("gpus")
            if points.empty:
                continue
            plotted = True
            moe = study.models[model].is_moe
            ax.plot(points["gpus"], points["tokens_per_s_per_gpu"], marker="s" if moe else "o",
                    linestyle="--" if moe else "-", label=f"{model} ({'MoE' if moe else 'dense'})")
            if track == "model_parallel":
                last = best["gpus"].max()
                for _, row in points.iterrows():  # at the largest GPU count the label reads leftwards
                    right = row["gpus"] == last and last != best["gpus"].min()
                    ax.annotate(row["layout"], (row["gpus"], row["tokens_per_s_per_gpu"]), fontsize=7,
                                textcoords="offset points", xytext=(-4 if right else 4, 4),
                                ha="right" if right else "left", va="bottom")
        _gpu_axis(ax, frame.loc[frame["track"] == track, "gpus"])
        ax.set_ylabel("tokens/s/GPU")
        ax.margins(x=0.1)
        top = max((line.get_ydata().max() for line in ax.lines if len(line.get_ydata())), default=0)
        if top > 0:  # room above the highest point for its layout label, inside the panel
            ax.set_ylim(0, top * 1.2)
        else:
            ax.set_ylim(bottom=0)
        if plotted:
            ax.legend(fontsize=8)
        else:
            _empty(ax, "no successful runs" if track == "data_parallel" else
                   "no GPU count where a dense and a MoE model both ran")
    fig.savefig(path, dpi=DPI)
    return fig


#: What makes two runs' losses comparable step by step, besides model and track: the same data, and the same
#: tokens per optimizer step. Column -> how a label names it.
LOSS_ALIKE = {"dataset": "data", "global_batch": "global batch", "seq_length": "seq"}


def _alike(key: str, value: object) -> str:
    return f"{value} data" if key == "dataset" else f"{LOSS_ALIKE[key]} {value}"


def run_losses(row: pd.Series) -> list[tuple[int, float]]:
    """The (step, loss) pairs of a frame row ([] where the run logged none, or the frame has no ``losses``)."""
    losses = row.get("losses")
    return list(losses) if isinstance(losses, (list, tuple)) else []


def loss_label(row: pd.Series, differ: Iterable[str] = ()) -> str:
    """A run as a loss curve's legend names it: GPUs (data parallel) or layout (model parallel), micro-batch,
    the ``differ`` columns of ``LOSS_ALIKE``, the engine and its option set (else its options, shortened)."""
    if row["track"] == "data_parallel":
        gpus = int(row["gpus"])
        where = f"{gpus} GPU{'' if gpus == 1 else 's'}" + (f" ep{row['ep']}" if int(row["ep"]) > 1 else "")
    else:
        where = layout_label(row)
    batch = ", ".join([f"mbs {row['micro_batch']}", *(_alike(k, row[k]) for k in differ)])
    option_set = row.get("option_set") or ""
    options = option_set or clipped(str(row.get("engine_options") or ""), 44)
    return f"{where}, {batch}: {row['engine']}" + (f" ({options})" if options else "")


def loss_curves(study: Study, frame: pd.DataFrame, path: Path) -> Figure:
    """One panel per model and track (the runs of one table), one line per run that logged a loss: training loss
    against the optimizer step. An ``ok`` run is solid; one that stopped early is dashed up to its last logged
    step, its status in the label; a run that logged no step is named in the panel. Runs of a panel that
    differ in data, global batch or sequence length (``LOSS_ALIKE``) are not comparable step by step: the
    panel's title says so and their labels name the difference; else the title names what they share."""
    tables = [(model, track) for track in TRACK_TITLES for model in study.models
              if ((frame["model"] == model) & (frame["track"] == track)).any()]
    panels = max(len(tables), 1)
    fig = Figure(figsize=(10.0, 1.2 + 3.0 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0].tolist()
    fig.suptitle(PLOTS["loss_curves"])
    if not tables:
        _empty(axes[0], "no runs in this study")
    for ax, (model, track) in zip(axes, tables):
        rows = frame[(frame["model"] == model) & (frame["track"] == track)].sort_values(
            ["engine", "option_set", "seq_length", "global_batch", "gpus", "tp", "ep", "micro_batch"])
        logged = rows[[bool(run_losses(row)) for _, row in rows.iterrows()]]
        shared = {k: sorted(set(logged[k].tolist())) for k in LOSS_ALIKE}
        differ = [k for k, values in shared.items() if len(values) > 1]
        title = f"{model}, {TRACK_TITLES[track][0].lower()}{TRACK_TITLES[track][1:]}"
        if differ:
            title += (": runs differ in " + ", ".join(f"{LOSS_ALIKE[k]} ({', '.join(map(str, shared[k]))})"
                                                      for k in differ) + ": not comparable step by step")
        elif not logged.empty:
            title += ": " + ", ".join(_alike(k, shared[k][0]) for k in LOSS_ALIKE)
        ax.set_title(title, fontsize=9)
        for _, row in logged.iterrows():
            steps, losses = zip(*run_losses(row))
            stopped = row["status"] != "ok"
            label = loss_label(row, differ) + (f" [{row['status']} after {len(steps)} of {row['steps']} steps]"
                                               if stopped else "")
            ax.plot(steps, losses, marker="o", markersize=3, linestyle="--" if stopped else "-", label=label)
        if logged.empty:
            _empty(ax, "no run logged a step")
        else:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        _not_plotted(ax, [f"{row['run']} ({row['status']}, no step logged)" for _, row in rows.iterrows()
                          if not run_losses(row)])
    fig.savefig(path, dpi=DPI)
    return fig


def write_plots(study: Study, frame: pd.DataFrame, directory: Path | str = "results/plots") -> dict[str, Path]:
    """Every plot of ``PLOTS`` under ``directory``; returns title -> path (for the links in tables.md)."""
    paths = plot_paths(directory)
    Path(directory).mkdir(parents=True, exist_ok=True)
    _dp_plot(study, frame, paths["dp_throughput"], "throughput")
    _dp_plot(study, frame, paths["dp_efficiency"], "efficiency")
    _dp_plot(study, frame, paths["dp_step_time"], "step_time")
    mp_memory(study, frame, paths["mp_memory"])
    dense_vs_moe(study, frame, paths["dense_vs_moe"])
    loss_curves(study, frame, paths["loss_curves"])
    return {PLOTS[stem]: path for stem, path in paths.items()}
