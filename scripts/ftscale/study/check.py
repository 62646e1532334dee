"""The checks every engine shares (a known track, a layout that fits the model, a batch that divides),
then the run's own engine's (``EngineSpec.errors``): pure, run before any job is submitted and again by
the engine itself before it builds anything. Each message names the run, the key and its value.
"""

from __future__ import annotations

from typing import Any, Mapping

from ftscale.engines import engine, names
from ftscale.engines.base import Errors
from ftscale.study.layout import Layout
from ftscale.study.run import TRACKS, Run


def _int(run: Run, errs: Errors, key: str, minimum: int = 1) -> int | None:
    value = getattr(run, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        errs.add(key, value, f"must be an integer >= {minimum}")
        return None
    return value


def common_errors(run: Run, model: Mapping[str, Any]) -> list[str]:
    """What every engine needs: a known track, a layout that fits the model, a batch that divides."""
    errs = Errors(run.name)
    track = run.track
    if track not in TRACKS:
        errs.add("track", track, f"must be one of {list(TRACKS)}")
    if run.model != model.get("name"):
        errs.add("model", run.model, f"does not match the model's name {model.get('name')!r}")
    gpus, nodes, per_node = _int(run, errs, "gpus"), _int(run, errs, "nodes"), _int(run, errs, "gpus_per_node")
    tp, ep, dp, pp = _int(run, errs, "tp"), _int(run, errs, "ep"), _int(run, errs, "dp"), _int(run, errs, "pp")
    if gpus and nodes and per_node and nodes * per_node != gpus:
        errs.add("gpus", gpus, f"must equal nodes x gpus_per_node = {nodes} x {per_node} = {nodes * per_node}")
    sp = run.sp
    if not isinstance(sp, bool):
        errs.add("sp", sp, "must be true or false")
    seq = _int(run, errs, "seq_length")
    if pp and pp > 1 and run.engine in names() and not run.spec.pipeline_parallel:
        able = [n for n in names() if engine(n).pipeline_parallel]
        errs.add("pp", pp, f"the {run.engine} engine has no pipeline parallelism: pp must be 1 (engines with "
                           f"pp > 1: {able})")
    if tp and ep and dp and pp and isinstance(sp, bool):
        layout = Layout(tp, ep, dp, sp, pp)
        if gpus and layout.world_size != gpus:
            errs.add("gpus", gpus, f"must equal tp x pp x ep x dp = {tp} x {pp} x {ep} x {dp} = {layout.world_size}")
        for why in layout.errors(model.get("architecture") or {}, seq):
            errs.add("layout", layout.label, why)
    mbs, gbs = _int(run, errs, "micro_batch"), _int(run, errs, "global_batch")
    if mbs and gbs and ep and dp:
        dps = ep * dp
        if gbs % (mbs * dps):
            errs.add("global_batch", gbs, f"must be divisible by micro_batch x data-parallel size (ep x dp) = "
                                          f"{mbs} x {dps} = {mbs * dps}")
    steps = _int(run, errs, "steps")
    warmup = run.warmup_steps
    if not isinstance(warmup, int) or warmup < 0 or (steps and warmup >= steps):
        errs.add("warmup_steps", warmup, f"must be an integer in [0, steps = {steps})")
    lora = run.lora
    if track == "model_parallel" and lora is not None:
        errs.add("lora", lora, "the model_parallel track is full fine-tuning: lora must be null")
    if lora is not None:
        if not isinstance(lora, dict):
            errs.add("lora", lora, "must be {rank, alpha, targets} or null")
        else:
            for key in ("rank", "alpha"):
                v = lora.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                    errs.add(f"lora.{key}", v, "must be a positive number")
            if not isinstance(lora.get("targets"), list) or not lora["targets"]:
                errs.add("lora.targets", lora.get("targets"), "must be a non-empty list of module names")
    return errs


#: Where the config gives the LoRA targets (only the data_parallel track has LoRA).
LORA_TARGETS_KEY = "tracks.data_parallel.lora.targets"


def lora_target_errors(run: Run, model: Mapping[str, Any]) -> list[str]:
    """The run's LoRA targets must be modules its model has, as its engine names them
    (``EngineSpec.lora_targets`` over ``ftscale.engines.base.lora_modules`` of the model's architecture): one
    message per engine and model, naming the key, the value and the valid names, whichever run shows it."""
    targets = run.lora.get("targets") if isinstance(run.lora, dict) else None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        return []  # common_errors says what is wrong with the value
    try:
        run.spec.lora_targets(targets, model.get("architecture"))
    except ValueError as err:
        return [f"key '{LORA_TARGETS_KEY}' = {targets!r} (engine {run.engine}, model {model.get('name')}): {err}"]
    return []


def run_errors(run: Run, model: Mapping[str, Any]) -> list[str]:
    """Every reason ``run`` cannot run on its engine for ``model`` (a model.yaml mapping)."""
    if run.engine not in names():
        return [f"run {run.name}: engine = {run.engine!r}: must be one of {names()}"]
    return common_errors(run, model) + lora_target_errors(run, model) + run.spec.errors(run, model)
