"""Reference values with tolerances, ReFrame style, and each run's flag against them.

config/references.yaml (schema: config/references.schema.yaml) lists entries keyed by model, track
and a ``where`` mapping of configuration keys (gpus, tp, ep, dp, sp, micro_batch, global_batch,
seq_length, scaling, engine, device); a key left out matches any value. ``device`` is a key of
``ftscale.estimate.flops.PEAK_TFLOPS`` (H100-SXM, H200, A100, L40S) or ``cpu``, as ``peak_tflops_for`` maps
the device the run reported. Each entry gives, per metric, ``value, lower, upper, unit``:

    lower, upper: fractions of ``value`` (ReFrame's thresholds): -0.1 = 10 % below; null = unbounded
    bounds      = [value x (1 + lower), value x (1 + upper)], both inclusive

Metrics that measure the same thing give one verdict (``ASPECTS``): step time, tokens/s/GPU and
TFLOP/s/GPU are all the run's speed (step time its reciprocal), so an entry gives at most one of them
and the run gets one ``throughput`` verdict; ``memory`` is peak memory per GPU. A verdict is about
the aspect, not the metric: a step time above its bounds is throughput ``below``.

Verdict of an aspect: ``within`` the bounds, ``below``, ``above``, ``no reference`` (no entry matches,
or the matching entry has no value for the aspect), ``no measurement`` (the run is not ``ok``: it
measured nothing, whether or not an entry matches; or an entry matches and the run lacks the value). A record matched by several entries takes the most specific one
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
#: What the metrics measure: aspect -> its metrics (an entry gives at most one per aspect).
ASPECTS: dict[str, tuple[str, ...]] = {
    "throughput": ("tokens_per_s_per_gpu", "tflops_per_gpu", "step_time_s"),
    "memory": ("peak_mem_mib",),
}
#: Metrics that fall as their aspect rises (step time: the reciprocal of throughput).
RECIPROCAL = {"step_time_s"}
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
class AspectCheck:
    """One aspect's verdict; ``metric`` is the metric the entry gave for it."""

    aspect: str
    flag: str
    metric: str = ""
    measured: float | None = None
    value: float | None = None

    @property
    def deviation(self) -> float | None:
        """How far the aspect is from the reference, as a fraction: for a reciprocal metric (step
        time) value / measured - 1, so that +10 % is always 10 % more throughput."""
        if self.measured is None or not self.value:
            return None
        if self.metric in RECIPROCAL:
            return self.value / self.measured - 1
        return (self.measured - self.value) / self.value


@dataclass(frozen=True)
class RefResult:
    """A record's checks against its reference entry (``entry`` None: no entry matches)."""

    entry: Reference | None
    checks: dict[str, AspectCheck] = field(default_factory=dict)

    def flag(self, aspect: str) -> str:
        return self.checks[aspect].flag if aspect in self.checks else "no reference"

    def summary(self) -> str:
        """One cell of the tables: e.g. 'throughput within (+3%); memory within'; 'no reference' when
        there is none. A deviation under 1 % is not shown: it is no news."""
        if self.checks and all(c.flag == "no measurement" for c in self.checks.values()):
            return "no measurement"
        parts = []
        for aspect, check in self.checks.items():
            if check.flag == "no reference":
                continue
            dev = check.deviation
            parts.append(f"{aspect} {check.flag}" + ("" if dev is None or abs(dev) < 0.01 else f" ({dev:+.0%})"))
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
        for aspect, metrics in ASPECTS.items():
            given = [m for m in metrics if m in entry["metrics"]]
            if len(given) > 1:
                raise ReferencesError(f"{key}.metrics = {', '.join(given)}: these measure the same {aspect}: "
                                      "give one of them (the others follow from it)")
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


def check(refs: list[Reference], facts: dict, measured: dict[str, float | None] | None) -> RefResult:
    """Verdicts of one record, one per aspect: ``facts`` are its configuration keys (WHERE_KEYS, model,
    track, run), ``measured`` its metrics (keys of METRICS), None for a run that is not ``ok``: every aspect
    is then ``no measurement``."""
    entry = match(refs, facts)
    if measured is None:
        return RefResult(entry, {a: AspectCheck(a, "no measurement") for a in ASPECTS})
    if entry is None:
        return RefResult(None, {a: AspectCheck(a, "no reference") for a in ASPECTS})
    checks = {}
    for aspect, metrics in ASPECTS.items():
        metric = next((m for m in metrics if m in entry.metrics), None)
        if metric is None:
            checks[aspect] = AspectCheck(aspect, "no reference")
            continue
        spec, value = entry.metrics[metric], measured.get(metric)
        flag = flag_value(value, spec)
        if metric in RECIPROCAL:
            flag = {"below": "above", "above": "below"}.get(flag, flag)
        checks[aspect] = AspectCheck(aspect, flag, metric, value, spec["value"])
    return RefResult(entry, checks)
