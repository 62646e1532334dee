"""Compare participants: our results/scaling.csv and others' exported CSVs, side by side.

Input: CSV files with the columns of results/scaling.csv (``REQUIRED_COLUMNS`` at least) and
``schema_version`` equal to ours (``ftscale.provenance.SCHEMA_VERSION``). A run is identified by
(participant, model, track, run); the run name encodes GPUs, layout and batch, so equal names are
equal configurations.

Bad input is an error naming the file, the line and the column:
- a required column is missing;
- a row has another ``schema_version`` (or an empty ``participant``);
- a file has no rows;
- the same run twice (same participant, model, track and run) with different values.

Merge rule: a row identical in every column to one already read (the same export copied twice,
e.g. our own CSV also dropped into results/participants/) is kept once.

Every file is read with pandas into one frame (column ``file`` and ``line`` say where each row comes
from); the tables and the plot read that frame.

Output: results/comparison.md (a provenance table per participant, then per model and track one
table with every configuration and participant) and results/plots/comparison.png (tokens/s/GPU
per configuration, one bar per participant; runs that are not ``ok`` are left out).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ftscale.analyze.provenance import LIBRARIES, SCHEMA_VERSION  # noqa: E402
from ftscale.analyze.tables import LABELS, fmt_number, fmt_percent, markdown  # noqa: E402

#: The training libraries whose versions the comparison shows (all but ftscale itself).
TRAINING_LIBRARIES = [lib for lib in LIBRARIES if lib != "ftscale"]

KEY = ["participant", "model", "track", "run"]
REQUIRED_COLUMNS = [
    "schema_version", *KEY, "engine", "gpus", "tp", "ep", "dp", "sp", "micro_batch", "global_batch", "seq_length",
    "status", "reason", "step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "peak_mem_mib", "mem_kind",
    "device", "device_model", "gpus_per_node", "nodes", "container", "git_commit", "date",
    "torch_version", "transformers_version", "peft_version", "nemo_version",
]
NUMERIC = ["gpus", "step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "peak_mem_mib"]
TRACK_TITLES = {"data_parallel": "data parallel (LoRA)", "model_parallel": "model parallel (full fine-tuning)"}
WHERE = ["file", "line"]


class CompareError(ValueError):
    """A participant file that cannot be compared: names the file, line and column."""


def read_csv(path: Path | str) -> pd.DataFrame:
    """One participant's export, checked against the columns and the schema version; every cell a
    string ('' when empty), plus ``file`` and ``line`` (the header is line 1)."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CompareError(f"{path}: empty file (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CompareError(f"{path}: not a CSV file: {str(err).strip()}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise CompareError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}: an export of "
                           f"results/scaling.csv with schema_version {SCHEMA_VERSION} has them")
    if frame.empty:
        raise CompareError(f"{path}: no rows")
    frame.insert(0, "line", range(2, len(frame) + 2))
    frame.insert(0, "file", str(path))
    wrong = frame[frame["schema_version"].str.strip() != str(SCHEMA_VERSION)]
    if not wrong.empty:
        row = wrong.iloc[0]
        raise CompareError(f"{path}:{row['line']}: column 'schema_version' = {row['schema_version']!r}, but this "
                           f"analysis reads schema_version {SCHEMA_VERSION}: re-export it with a matching ftscale")
    nobody = frame[frame["participant"].str.strip() == ""]
    if not nobody.empty:
        raise CompareError(f"{path}:{nobody.iloc[0]['line']}: column 'participant' is empty (set "
                           "FTSCALE_PARTICIPANT before the analysis)")
    for column in NUMERIC:
        numbers = pd.to_numeric(frame[column].replace({"None": ""}), errors="coerce")
        bad = frame[numbers.isna() & ~frame[column].isin(["", "None"])]
        if not bad.empty:
            raise CompareError(f"{path}:{bad.iloc[0]['line']}: column '{column}' = {bad.iloc[0][column]!r} is not "
                               "a number")
    return frame


def merge(paths: list[Path]) -> pd.DataFrame:
    """Every row of every file once (merge rule in the module docstring); duplicates are errors.
    The result has the numeric columns as numbers and ``ok`` (status ok, with a throughput)."""
    frame = pd.concat([read_csv(p) for p in paths], ignore_index=True)
    values = [c for c in frame.columns if c not in WHERE]
    frame = frame.drop_duplicates(values)  # the same export read twice: kept once
    dup = frame[frame.duplicated(KEY, keep=False)]
    if not dup.empty:
        first, again = dup.iloc[0], dup[(dup[KEY] == dup.iloc[0][KEY]).all(axis=1)].iloc[1]
        differ = sorted(c for c in values if first[c] != again[c])
        ident = ", ".join(f"{k}={again[k]!r}" for k in KEY)
        raise CompareError(f"{again['file']}:{again['line']}: duplicate run ({ident}; columns {', '.join(KEY)}), also "
                           f"at {first['file']}:{first['line']} with other values in column(s) "
                           f"{', '.join(differ[:8])}: keep one of them")
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column].replace({"None": ""}), errors="coerce")
    frame["ok"] = frame["status"].eq("ok") & frame["tokens_per_s_per_gpu"].notna()
    frame["layout"] = ("tp" + frame["tp"] + " ep" + frame["ep"] + " dp" + frame["dp"]
                       + frame["sp"].isin(["True", "true", "1", "yes"]).map({True: " sp", False: ""}))
    frame["device_shown"] = frame["device_model"].where(~frame["device_model"].isin(["", "unknown"]), frame["device"])
    return frame.reset_index(drop=True)


def participants_table(rows: pd.DataFrame) -> str:
    def values(series: pd.Series) -> str:
        return ", ".join(sorted(set(series) - {""})) or "-"

    def one(mine: pd.DataFrame) -> pd.Series:
        dates = sorted(d for d in mine["date"] if d)
        return pd.Series({
            "file(s)": ", ".join(f"`{f}`" for f in sorted(set(mine["file"]))),
            "runs ok / all": f"{int(mine['ok'].sum())} / {len(mine)}",
            "devices": values(mine["device_shown"]),
            "GPUs per node x nodes": values(mine["gpus_per_node"] + " x " + mine["nodes"]),
            "engine": values(mine["engine"]),
            " / ".join(TRAINING_LIBRARIES): " / ".join(values(mine[f"{lib}_version"]) for lib in TRAINING_LIBRARIES),
            "container": values(mine["container"]), "git commit": values(mine["git_commit"]),
            "runs started": f"{dates[0]} .. {dates[-1]}" if dates else "-",
        })

    table = rows.groupby("participant")[rows.columns.tolist()].apply(one).reset_index()
    return markdown(table)


def group_table(rows: pd.DataFrame) -> str:
    """Every configuration (run name) of one model and track, a row per participant; *vs best* is
    tokens/s/GPU over the best participant's for the same configuration."""
    rows = rows.sort_values(["gpus", "run", "participant"])
    best = rows[rows["ok"]].groupby("run")["tokens_per_s_per_gpu"].max()
    relative = rows["tokens_per_s_per_gpu"] / rows["run"].map(best)

    def figure(column: str) -> pd.Series:
        return rows[column].where(rows["ok"]).map(fmt_number)

    mem = figure("peak_mem_mib")
    table = pd.DataFrame({
        "configuration": rows["run"], LABELS["gpus"]: rows["gpus"].map(lambda g: fmt_number(int(g))),
        "layout": rows["layout"], "participant": rows["participant"], "device": rows["device_shown"],
        LABELS["tokens_per_s_per_gpu"]: figure("tokens_per_s_per_gpu"),
        "vs best": relative.where(rows["ok"]).map(fmt_percent),
        LABELS["step_time_s"]: figure("step_time_s"),
        LABELS["peak_mem_mib"]: mem.where(mem == "", mem + rows["mem_kind"].map(
            lambda k: " (RSS)" if k == "rss" else " (CUDA)")),
        LABELS["tflops_per_gpu"]: figure("tflops_per_gpu"),
        LABELS["mfu"]: rows["mfu"].map(fmt_percent),
        LABELS["status"]: rows["status"].where((rows["reason"] == "") | rows["ok"], rows["status"] + ": " + rows["reason"]),
    })
    return markdown(table)


def render(rows: pd.DataFrame, files: list[Path], plot: Path | None = None, md_path: Path | None = None) -> str:
    out = ["# Comparison of participants", "",
           f"{len(rows)} runs of {rows['participant'].nunique()} participant(s) from "
           + ", ".join(f"`{f}`" for f in files) + f" (CSV schema_version {SCHEMA_VERSION}). A configuration is a "
           "run name: GPUs, layout and batch. *vs best* = tokens/s/GPU / the best of all participants for the same "
           "configuration. Runs that are not `ok` keep their status and have no figures.", ""]
    if plot is not None:
        rel = os.path.relpath(plot, (md_path or Path("results/comparison.md")).parent).replace(os.sep, "/")
        out += [f"Plot: [tokens/s/GPU per configuration and participant]({rel})", ""]
    out += ["## Participants", "", participants_table(rows), ""]
    for (model, track), group in rows.groupby(["model", "track"]):
        out += [f"## {model}: {TRACK_TITLES.get(track, track)}", "", group_table(group), ""]
    return "\n".join(out).rstrip() + "\n"


def plot(rows: pd.DataFrame, path: Path) -> None:
    """tokens/s/GPU per configuration, a bar per participant; one panel per model and track."""
    good = rows[rows["ok"]]
    grouped = list(good.groupby(["model", "track"]))
    n = max(len(grouped), 1)
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    fig = Figure(figsize=(6.5 * cols, 4.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).flatten().tolist()
    fig.suptitle("tokens/s/GPU per configuration and participant (runs not ok left out)")
    who = sorted(rows["participant"].unique())
    if not grouped:
        axes[0].text(0.5, 0.5, "no successful runs to compare", ha="center", va="center")
    width = 0.8 / len(who)
    for ax, ((model, track), recs) in zip(axes, grouped):
        configs = recs.sort_values(["gpus", "run"])["run"].drop_duplicates().tolist()
        for i, p in enumerate(who):
            mine = recs[recs["participant"] == p].set_index("run")["tokens_per_s_per_gpu"]
            shown = [c for c in configs if c in mine.index]
            ax.bar([configs.index(c) + i * width for c in shown], [mine[c] for c in shown], width=width, label=p,
                   color=f"C{i % 10}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs, rotation=30, ha="right",
                      fontsize=7)
        ax.set_title(f"{model}: {TRACK_TITLES.get(track, track)}", fontsize=10)
        ax.set_ylabel("tokens/s/GPU")
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(grouped) or 1:]:
        ax.set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_comparison(own: Path | str, others: list[Path] | list[str], md_path: Path | str, png_path: Path | str,
                     log: Path | str | None = None) -> None:
    """results/comparison.md and its plot from our CSV and the participants' (``others``)."""
    files = [Path(own), *sorted(Path(p) for p in others)]
    rows = merge(files)
    plot(rows, Path(png_path))
    Path(md_path).write_text(render(rows, files, Path(png_path), Path(md_path)))
    if log:
        Path(log).write_text(f"read {', '.join(map(str, files))}: {len(rows)} runs\n"
                             f"wrote {md_path}\nwrote {png_path}\n")
