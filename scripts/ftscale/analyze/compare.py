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

Output: results/comparison.md (a provenance table per participant, then per model and track one
table with every configuration and participant) and results/plots/comparison.png (tokens/s/GPU
per configuration, one bar per participant; runs that are not ``ok`` are left out).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from ftscale.analyze.provenance import SCHEMA_VERSION  # noqa: E402
from ftscale.analyze.tables import markdown_table  # noqa: E402

KEY = ("participant", "model", "track", "run")
REQUIRED_COLUMNS = [
    "schema_version", *KEY, "engine", "gpus", "tp", "ep", "dp", "sp", "micro_batch", "global_batch", "seq_length",
    "status", "reason", "step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "peak_mem_mib", "mem_kind",
    "device", "device_model", "gpus_per_node", "nodes", "container", "git_commit", "date",
    "torch_version", "transformers_version", "peft_version", "nemo_version",
]
TRACK_TITLES = {"data_parallel": "data parallel (LoRA)", "model_parallel": "model parallel (full fine-tuning)"}


class CompareError(ValueError):
    """A participant file that cannot be compared: names the file, line and column."""


@dataclass(frozen=True)
class Row:
    file: Path
    line: int
    data: dict[str, str]

    def key(self) -> tuple[str, ...]:
        return tuple(self.data[k] for k in KEY)

    def num(self, column: str) -> float | None:
        text = self.data.get(column, "")
        try:
            return float(text) if text not in ("", "None") else None
        except ValueError:
            raise CompareError(f"{self.file}:{self.line}: column '{column}' = {text!r} is not a number") from None

    @property
    def ok(self) -> bool:
        return self.data["status"] == "ok" and self.num("tokens_per_s_per_gpu") is not None


def read_csv(path: Path) -> list[Row]:
    """One participant's export, checked against the columns and the schema version."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CompareError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}: an export of "
                               f"results/scaling.csv with schema_version {SCHEMA_VERSION} has them")
        rows = []
        for line, data in enumerate(reader, start=2):
            version = data.get("schema_version") or ""
            if version.strip() != str(SCHEMA_VERSION):
                raise CompareError(f"{path}:{line}: column 'schema_version' = {version!r}, but this analysis reads "
                                   f"schema_version {SCHEMA_VERSION}: re-export it with a matching ftscale")
            if not (data.get("participant") or "").strip():
                raise CompareError(f"{path}:{line}: column 'participant' is empty (set FTSCALE_PARTICIPANT "
                                   "before the analysis)")
            rows.append(Row(Path(path), line, {k: (v or "") for k, v in data.items() if k is not None}))
    if not rows:
        raise CompareError(f"{path}: no rows")
    return rows


def merge(paths: list[Path]) -> list[Row]:
    """Every row of every file once (merge rule in the module docstring); duplicates are errors."""
    seen: dict[tuple[str, ...], Row] = {}
    out = []
    for path in paths:
        for row in read_csv(path):
            prev = seen.get(row.key())
            if prev is None:
                seen[row.key()] = row
                out.append(row)
                continue
            if prev.data == row.data:
                continue
            differ = sorted(k for k in set(prev.data) | set(row.data) if prev.data.get(k) != row.data.get(k))
            ident = ", ".join(f"{k}={v!r}" for k, v in zip(KEY, row.key()))
            raise CompareError(f"{row.file}:{row.line}: duplicate run ({ident}; columns {', '.join(KEY)}), also at "
                               f"{prev.file}:{prev.line} with other values in column(s) {', '.join(differ[:8])}: "
                               "keep one of them")
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def _layout(row: Row) -> str:
    d = row.data
    return f"tp{d['tp']} ep{d['ep']} dp{d['dp']}" + (" sp" if d["sp"] in ("True", "true", "1", "yes") else "")


def _device(row: Row) -> str:
    model = row.data["device_model"]
    return model if model and model != "unknown" else row.data["device"]


def participants_table(rows: list[Row]) -> str:
    header = ["participant", "file(s)", "runs ok / all", "devices", "GPUs per node x nodes", "engine",
              "torch / transformers / peft / nemo", "container", "git commit", "runs started"]
    body = []
    for who in sorted({r.data["participant"] for r in rows}):
        mine = [r for r in rows if r.data["participant"] == who]

        def values(col: str, mine: list[Row] = mine) -> str:
            return ", ".join(sorted({r.data[col] for r in mine} - {""})) or "-"

        dates = sorted(r.data["date"] for r in mine if r.data["date"])
        versions = " / ".join(values(f"{lib}_version") for lib in ("torch", "transformers", "peft", "nemo"))
        body.append([who, ", ".join(sorted({f"`{r.file}`" for r in mine})), f"{sum(r.ok for r in mine)} / {len(mine)}",
                     ", ".join(sorted({_device(r) for r in mine})),
                     ", ".join(sorted({f"{r.data['gpus_per_node']} x {r.data['nodes']}" for r in mine})),
                     values("engine"), versions, values("container"), values("git_commit"),
                     f"{dates[0]} .. {dates[-1]}" if dates else "-"])
    return markdown_table(header, body)


def groups(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r.data["model"], r.data["track"]), []).append(r)
    return dict(sorted(out.items()))


def group_table(rows: list[Row]) -> str:
    header = ["configuration", "GPUs", "layout", "participant", "device", "tokens/s/GPU", "vs best", "step time (s)",
              "peak mem/GPU (MiB)", "TFLOP/s/GPU", "MFU", "status"]
    best: dict[str, float] = {}
    for r in rows:
        if r.ok:
            best[r.data["run"]] = max(best.get(r.data["run"], 0.0), r.num("tokens_per_s_per_gpu") or 0.0)
    body = []
    for r in sorted(rows, key=lambda r: (int(r.data["gpus"]), r.data["run"], r.data["participant"])):
        tps = r.num("tokens_per_s_per_gpu") if r.ok else None
        rel = tps / best[r.data["run"]] if tps and best.get(r.data["run"]) else None
        mem = r.num("peak_mem_mib") if r.ok else None
        mfu = r.num("mfu")
        status = r.data["status"] + (f": {r.data['reason']}" if r.data["reason"] and r.data["status"] != "ok" else "")
        body.append([r.data["run"], r.data["gpus"], _layout(r), r.data["participant"], _device(r), _fmt(tps),
                     "" if rel is None else f"{rel:.0%}", _fmt(r.num("step_time_s") if r.ok else None),
                     "" if mem is None else f"{_fmt(mem)} ({'RSS' if r.data['mem_kind'] == 'rss' else 'CUDA'})",
                     _fmt(r.num("tflops_per_gpu") if r.ok else None), "" if mfu is None else f"{mfu:.1%}", status])
    return markdown_table(header, body)


def render(rows: list[Row], files: list[Path], plot: Path | None = None, md_path: Path | None = None) -> str:
    out = ["# Comparison of participants", "",
           f"{len(rows)} runs of {len({r.data['participant'] for r in rows})} participant(s) from "
           + ", ".join(f"`{f}`" for f in files) + f" (CSV schema_version {SCHEMA_VERSION}). A configuration is a "
           "run name: GPUs, layout and batch. *vs best* = tokens/s/GPU / the best of all participants for the same "
           "configuration. Runs that are not `ok` keep their status and have no figures.", ""]
    if plot is not None:
        rel = os.path.relpath(plot, (md_path or Path("results/comparison.md")).parent).replace(os.sep, "/")
        out += [f"Plot: [tokens/s/GPU per configuration and participant]({rel})", ""]
    out += ["## Participants", "", participants_table(rows), ""]
    for (model, track), recs in groups(rows).items():
        out += [f"## {model}: {TRACK_TITLES.get(track, track)}", "", group_table(recs), ""]
    return "\n".join(out).rstrip() + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """tokens/s/GPU per configuration, a bar per participant; one panel per model and track."""
    grouped = groups([r for r in rows if r.ok])
    n = max(len(grouped), 1)
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    fig = Figure(figsize=(6.5 * cols, 4.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).flatten().tolist()
    fig.suptitle("tokens/s/GPU per configuration and participant (runs not ok left out)")
    who = sorted({r.data["participant"] for r in rows})
    if not grouped:
        axes[0].text(0.5, 0.5, "no successful runs to compare", ha="center", va="center")
    for ax, ((model, track), recs) in zip(axes, grouped.items()):
        configs = sorted({r.data["run"] for r in recs}, key=lambda run: (next(
            int(r.data["gpus"]) for r in recs if r.data["run"] == run), run))
        width = 0.8 / len(who)
        for i, p in enumerate(who):
            vals = {r.data["run"]: r.num("tokens_per_s_per_gpu") for r in recs if r.data["participant"] == p}
            xs = [j + i * width for j, c in enumerate(configs) if c in vals]
            ax.bar(xs, [vals[c] for c in configs if c in vals], width=width, label=p, color=f"C{i % 10}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs, rotation=30, ha="right",
                      fontsize=7)
        ax.set_title(f"{model}: {TRACK_TITLES.get(track, track)}", fontsize=10)
        ax.set_ylabel("tokens/s/GPU")
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
