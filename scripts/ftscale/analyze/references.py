"""Reference values with tolerances, ReFrame style, and each run's flag against them.

config/references.yaml (schema: config/references.schema.yaml) lists entries keyed by model, track
and a ``where`` mapping of configuration keys (gpus, tp, ep, dp, sp, micro_batch, global_batch,
seq_length, scaling, engine, device); a key left out matches any value. ``device`` is a key of
``ftscale.estimate.flops.PEAK_TFLOPS`` (H100-SXM, H200, A100, L40S) or ``cpu``, as ``peak_tflops_for`` maps
the device the run reported. Each entry gives, per metric, ``value, lower, upper, unit``:

    lower, upper: fractions of ``value`` (ReFrame's thresholds): -0.1 = 10 % below; null = unbounded
    bounds      = [value x (1 + lower), value x (1 + upper)], both inclusive

Flag of a metric: ``within`` the bounds, ``below``, ``above``, ``no reference`` (no entry matches,
or the matching entry has no value for the metric), ``no measurement`` (an entry matches but the
run has no value: it failed). A record matched by several entries takes the most specific one
(most ``where`` keys); two equally specific matches are an error naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftscale.study.schema import REFERENCES_SCHEMA, ConfigError, validate

SCHEMA = REFERENCES_SCHEMA

#: Metrics that can carry a reference: column of results/scaling.csv -> (label, unit).
METRICS: dict[str, tuple[str, str]] = {
    "step_time_s": ("step time", "s"),
    "tokens_per_s_per_gpu": ("tokens/s/GPU", "tokens/s/GPU"),
    "peak_mem_mib": ("peak mem/GPU", "MiB"),
    "tflops_per_gpu": ("TFLOP/s/GPU", "TFLOP/s/GPU"),
}
WHERE_KEYS = ("gpus", "tp", "ep", "dp", "sp", "micro_batch", "global_batch", "seq_length", "scaling", "engine",
              "device")
FLAGS = ("within", "below", "above", "no reference", "no measurement")
_REL_EPS = 1e-9  # a value on a bound, up to float rounding of value x (1 + lower), is within


@dataclass(frozen=True)
class Reference:
    name: str
    model: str
    track: str
    where: dict
    metrics: dict[str, dict]
    source: str
    note: str = ""


@dataclass(frozen=True)
class MetricCheck:
    metric: str
    flag: str
    measured: float | None = None
    value: float | None = None
    unit: str = ""

    @property
    def deviation(self) -> float | None:
        """(measured - value) / value."""
        if self.measured is None or not self.value:
            return None
        return (self.measured - self.value) / self.value


@dataclass(frozen=True)
class RefResult:
    """A record's checks against its reference entry (``entry`` None: no entry matches)."""

    entry: Reference | None
    checks: dict[str, MetricCheck] = field(default_factory=dict)

    def flag(self, metric: str) -> str:
        return self.checks[metric].flag if metric in self.checks else "no reference"

    def summary(self) -> str:
        """One cell of the tables: e.g. 'tokens/s/GPU within (+3%)'; 'no reference' when there is none."""
        parts = []
        for metric, check in self.checks.items():
            if check.flag == "no reference":
                continue
            dev = "" if check.deviation is None else (
                " (+-0%)" if abs(check.deviation) < 0.005 else f" ({check.deviation:+.0%})")
            parts.append(f"{METRICS[metric][0]} {check.flag}{dev}")
        return "; ".join(parts) or "no reference"


class ReferencesError(ConfigError):
    """Bad references file, or two equally specific entries for one record."""


def load_references(path: Path | str) -> list[Reference]:
    """Read and validate a references file; a missing file gives no references."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReferencesError(f"{path}: not valid YAML: {err}") from err
    data = validate(raw, SCHEMA, str(path))
    refs, seen = [], {}
    for i, entry in enumerate(data["references"]):
        key = f"{path}: key 'references[{i}]'"
        for metric, spec in entry["metrics"].items():
            unit = METRICS[metric][1]
            if spec["unit"] != unit:
                raise ReferencesError(f"{key}.metrics.{metric}.unit = {spec['unit']!r}: must be {unit!r}")
            lower, upper = spec.get("lower"), spec.get("upper")
            if (lower is not None and lower > 0) or (upper is not None and upper < 0):
                raise ReferencesError(f"{key}.metrics.{metric}: lower = {lower}, upper = {upper}: need "
                                      "lower <= 0 <= upper (fractions of value, ReFrame style)")
        ref = Reference(name=entry.get("name") or f"references[{i}]", model=entry["model"], track=entry["track"],
                        where=dict(entry.get("where") or {}), metrics=entry["metrics"], source=entry["source"],
                        note=entry.get("note", ""))
        ident = (ref.model, ref.track, tuple(sorted(ref.where.items())))
        if ident in seen:
            raise ReferencesError(f"{key} ({ref.name}): same model, track and 'where' as {seen[ident]}")
        seen[ident] = ref.name
        refs.append(ref)
    return refs


def bounds(spec: dict) -> tuple[float, float]:
    value = spec["value"]
    lower = spec.get("lower")
    upper = spec.get("upper")
    return (value * (1 + lower) if lower is not None else float("-inf"),
            value * (1 + upper) if upper is not None else float("inf"))


def flag_value(measured: float | None, spec: dict) -> str:
    """within / below / above for one measured value against one ``{value, lower, upper}``."""
    if measured is None:
        return "no measurement"
    low, high = bounds(spec)
    eps = abs(spec["value"]) * _REL_EPS
    if measured < low - eps:
        return "below"
    if measured > high + eps:
        return "above"
    return "within"


def match(refs: list[Reference], facts: dict) -> Reference | None:
    """The most specific entry whose model, track and ``where`` all equal the record's ``facts``."""
    found = [r for r in refs if r.model == facts.get("model") and r.track == facts.get("track")
             and all(facts.get(k) == v for k, v in r.where.items())]
    if not found:
        return None
    found.sort(key=lambda r: len(r.where), reverse=True)
    if len(found) > 1 and len(found[0].where) == len(found[1].where):
        raise ReferencesError(f"references {found[0].name!r} and {found[1].name!r} both match run "
                              f"{facts.get('model')}/{facts.get('run')} equally: make one more specific")
    return found[0]


def check(refs: list[Reference], facts: dict, measured: dict[str, float | None]) -> RefResult:
    """Flags of one record: ``facts`` are its configuration keys (WHERE_KEYS, model, track, run),
    ``measured`` its metrics (keys of METRICS)."""
    entry = match(refs, facts)
    if entry is None:
        return RefResult(None, {m: MetricCheck(m, "no reference") for m in METRICS})
    checks = {}
    for metric in METRICS:
        spec = entry.metrics.get(metric)
        if spec is None:
            checks[metric] = MetricCheck(metric, "no reference")
        else:
            checks[metric] = MetricCheck(metric, flag_value(measured.get(metric), spec), measured.get(metric),
                                         spec["value"], spec["unit"])
    return RefResult(entry, checks)
