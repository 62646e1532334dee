"""One way to make a run in the tests: ``make_run(**fields)``, a real ``ftscale.study.run.Run`` with small
defaults (the tiny LLaMA, one CPU process, LoRA) that any field overrides."""

from __future__ import annotations

from typing import Any

from ftscale.study.run import Run

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}

DEFAULTS: dict[str, Any] = dict(
    track="data_parallel", model="tiny_llama", engine="embedded", gpus=1, tp=1, ep=1, dp=1, sp=False, micro_batch=1,
    global_batch=2, seq_length=32, steps=3, warmup_steps=0, learning_rate=1e-2, seed=1, precision="auto",
    device="cpu", lora=LORA,
)


def make_run(**fields: Any) -> Run:
    """A run of ``DEFAULTS`` with ``fields`` changed; ``dp`` follows ``gpus`` on the data-parallel track unless given."""
    given = {**DEFAULTS, **fields}
    if given["track"] == "data_parallel" and "dp" not in fields:
        given["dp"] = given["gpus"] // (given["tp"] * given["ep"])
    if given["track"] == "model_parallel" and "lora" not in fields:
        given["lora"] = None
    return Run(**given)
