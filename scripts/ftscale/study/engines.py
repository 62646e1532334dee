"""What each engine accepts: pure checks of a run (its run.json dict) against its model, run
before any job is submitted (and again by the engine itself before it builds anything).

No engine is imported here. Each message names the run, the key and its value.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Mapping

from ftscale.study.layout import EXPERT_KEYS, Layout, num_experts
from ftscale.study.run import TRACKS

#: The names NeMo's LoRA (nemo.collections.llm.peft.LoRA.target_modules) knows for Megatron layers.
NEMO_LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

#: Hugging Face module names -> the fused Megatron layer NeMo adapts. A fused layer is adapted as
#: a whole, so its HF names must come together (q_proj alone cannot be expressed with linear_qkv).
HF_LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
HF_LINEAR = tuple(n for group in HF_LORA_GROUPS.values() for n in group)


def nemo_lora_targets(targets: list[str]) -> list[str]:
    """NeMo LoRA ``target_modules`` for the run's targets (NeMo or Hugging Face names).

    NeMo names (``linear_qkv`` ...) and wildcard patterns pass through; Hugging Face names are
    mapped through ``HF_LORA_GROUPS``. Raises ValueError for an unknown name or a partial fused group.
    """
    out: list[str] = []
    hf = set()
    for t in targets:
        if t in NEMO_LORA_TARGETS or any(c in t for c in "*.?["):
            if t not in out:
                out.append(t)
        elif t in HF_LINEAR:
            hf.add(t)
        else:
            raise ValueError(f"unknown LoRA target {t!r}: use NeMo names {list(NEMO_LORA_TARGETS)} or Hugging Face "
                             f"names {sorted(HF_LINEAR)}")
    for nemo_name, group in HF_LORA_GROUPS.items():
        present = [n for n in group if n in hf]
        if present and len(present) != len(group):
            missing = [n for n in group if n not in hf]
            raise ValueError(f"LoRA targets {present} without {missing}: NeMo fuses {list(group)} into {nemo_name} "
                             "and adapts it as a whole; list all of them or none")
        if present and nemo_name not in out:
            out.append(nemo_name)
    return out


def hf_lora_targets(targets: list[str]) -> list[str]:
    """Hugging Face module names for the run's targets (NeMo fused names expand to their group)."""
    out: list[str] = []
    for t in targets:
        names = HF_LORA_GROUPS.get(t, (t,))
        for n in names:
            if n not in HF_LINEAR:
                raise ValueError(f"unknown LoRA target {t!r}: use Hugging Face names {list(HF_LINEAR)} "
                                 f"or NeMo names {list(NEMO_LORA_TARGETS)}")
            if n not in out:
                out.append(n)
    return out


class _Errors(list):
    def __init__(self, run: dict) -> None:
        super().__init__()
        self.name = run.get("name", "<unnamed run>")

    def add(self, key: str, value: Any, why: str) -> None:
        self.append(f"run {self.name}: {key} = {value!r}: {why}")


def _int(run: dict, errs: _Errors, key: str, minimum: int = 1) -> int | None:
    value = run.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        errs.add(key, value, f"must be an integer >= {minimum}")
        return None
    return value


def common_errors(run: dict, model: dict) -> list[str]:
    """What every engine needs: a known track, a layout that fits the model, a batch that divides."""
    errs = _Errors(run)
    track = run.get("track")
    if track not in TRACKS:
        errs.add("track", track, f"must be one of {list(TRACKS)}")
    if run.get("model") != model.get("name"):
        errs.add("model", run.get("model"), f"does not match the model's name {model.get('name')!r}")
    gpus, nodes, per_node = _int(run, errs, "gpus"), _int(run, errs, "nodes"), _int(run, errs, "gpus_per_node")
    tp, ep, dp = _int(run, errs, "tp"), _int(run, errs, "ep"), _int(run, errs, "dp")
    if gpus and nodes and per_node and nodes * per_node != gpus:
        errs.add("gpus", gpus, f"must equal nodes x gpus_per_node = {nodes} x {per_node} = {nodes * per_node}")
    sp = run.get("sp")
    if not isinstance(sp, bool):
        errs.add("sp", sp, "must be true or false")
    seq = _int(run, errs, "seq_length")
    if tp and ep and dp and isinstance(sp, bool):
        layout = Layout(tp, ep, dp, sp)
        if gpus and layout.world_size != gpus:
            errs.add("gpus", gpus, f"must equal tp x ep x dp = {tp} x {ep} x {dp} = {layout.world_size}")
        for why in layout.errors(model.get("architecture") or {}, seq):
            errs.add("layout", f"tp{tp}_ep{ep}_dp{dp}{'_sp' if sp else ''}", why)
    mbs, gbs = _int(run, errs, "micro_batch"), _int(run, errs, "global_batch")
    if mbs and gbs and ep and dp:
        dps = ep * dp
        if gbs % (mbs * dps):
            errs.add("global_batch", gbs, f"must be divisible by micro_batch x data-parallel size (ep x dp) = "
                                          f"{mbs} x {dps} = {mbs * dps}")
        elif "grad_accum" in run and run["grad_accum"] != gbs // (mbs * dps):
            errs.add("grad_accum", run["grad_accum"], f"must be global_batch / (micro_batch x ep x dp) = "
                                                      f"{gbs // (mbs * dps)}")
    steps = _int(run, errs, "steps")
    warmup = run.get("warmup_steps")
    if not isinstance(warmup, int) or warmup < 0 or (steps and warmup >= steps):
        errs.add("warmup_steps", warmup, f"must be an integer in [0, steps = {steps})")
    lora = run.get("lora")
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


#: The embedded engine's options (config section ``embedded:``; documented in config/config.schema.yaml).
EMBEDDED_OPTIONS: dict[str, tuple] = {
    "activation_checkpointing": (False, True),
    "compile": (False, True),
    "compile_mode": ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"),
    "compile_scope": ("layers", "model"),
    "fused_ce": ("off", "chunked", "liger"),
    "liger_kernels": (False, True),
    "attention": ("auto", "flash", "cudnn", "efficient", "math"),
    "lora_dtype": ("float32", "model"),
}
#: What a run did for an option its layout line does not name because the line predates it: runs compiled
#: before ``compile_scope`` existed compiled the whole model.
EMBEDDED_OPTIONS_BEFORE: dict[str, object] = {"compile_scope": "model"}
#: Option values that need a CUDA GPU (Triton kernels, CUDA-only attention backends).
CUDA_ONLY: dict[str, tuple] = {"fused_ce": ("liger",), "liger_kernels": (True,),
                               "attention": ("flash", "cudnn", "efficient")}
#: Why ``liger_kernels`` is refused with ``compile``: measured on an H200 (2026-12-01, liger-kernel 0.8.5,
#: torch 2.11, transformers 5.17, compile_scope layers), the first compiled step stopped in Inductor.
#: compile_scope model traces the same decoder-layer code.
LIGER_WITH_COMPILE = (
    "cannot run with embedded.compile: true: torch.compile of a layer with liger-kernel's RMSNorm/SwiGLU/RoPE failed "
    "on an H200 (BackendCompilerFailed: 'Attempting to broadcast a dimension of length 4096' at the residual add). "
    "Use one or the other: compile (with fused_ce: chunked) was the faster of the two there"
)
#: torch.compile modes that capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: Why those modes are refused with compile_scope layers: measured on an H200 (2026-12-02, torch 2.11), the first
#: backward stopped. All layers replay one compiled graph, so each layer's replay overwrites the outputs of the
#: layer before, which backward still needs.
CUDA_GRAPHS_WITH_LAYERS = (
    "captures CUDA graphs, which cannot run with embedded.compile_scope: layers: every decoder layer replays one "
    "graph and overwrites the outputs the layer before saved for backward (H200: 'accessing tensor output of "
    "CUDAGraphs that has been overwritten by a subsequent run'). Use max-autotune-no-cudagraphs, or compile_scope: model"
)
#: Option values that need liger-kernel (``pip install -e '.[gpu]'``).
NEEDS_LIGER: dict[str, tuple] = {"fused_ce": ("liger",), "liger_kernels": (True,)}


def _given_options(run: dict) -> dict:
    given = dict(run.get("engine_options") or {})
    if given.get("fused_ce") is False:  # YAML reads a bare `off` as false
        given["fused_ce"] = "off"
    return given


def embedded_options(run: dict) -> dict:
    """The run's embedded options, every one present (its default where the config leaves it out)."""
    given = _given_options(run)
    return {key: given.get(key, values[0]) for key, values in EMBEDDED_OPTIONS.items()}


def embedded_options_as_built(run: Mapping, layout: Mapping | None = None) -> dict:
    """The run's embedded options, every one present: as built where the log's layout line (``layout``, as
    parsed) names them, else as configured. A compiled run whose line predates an option took that option's
    ``EMBEDDED_OPTIONS_BEFORE`` value."""
    opts = embedded_options(dict(run))
    for key, values in EMBEDDED_OPTIONS.items():
        if layout and key in layout:
            value = layout[key]
            opts[key] = bool(int(value)) if isinstance(values[0], bool) else str(value)
        elif layout and key in EMBEDDED_OPTIONS_BEFORE and "compile" in layout and opts["compile"]:
            opts[key] = EMBEDDED_OPTIONS_BEFORE[key]
    return opts


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def embedded_option_errors(run: dict, device: str, have_liger: Callable[[], bool] | None = None) -> list[str]:
    """Reasons the run's ``embedded:`` options cannot be honoured on ``device`` ('cpu', 'cuda', or 'auto':
    not known yet, as when jobs are planned; the engine checks again with the device it got).

    An option the device cannot honour is an error, never a silent fallback.
    """
    errs = _Errors(run)
    for key, value in _given_options(run).items():
        if key not in EMBEDDED_OPTIONS:
            errs.add(f"embedded.{key}", value, f"unknown option: the embedded engine has {list(EMBEDDED_OPTIONS)}")
        elif value not in EMBEDDED_OPTIONS[key] or type(value) is not type(EMBEDDED_OPTIONS[key][0]):
            errs.add(f"embedded.{key}", value, f"must be one of {list(EMBEDDED_OPTIONS[key])}")
    if errs:
        return errs
    opts = embedded_options(run)
    if opts["compile_mode"] != "default" and not opts["compile"]:
        errs.add("embedded.compile_mode", opts["compile_mode"], "applies to torch.compile only: set embedded.compile: true")
    if opts["compile_scope"] != "layers" and not opts["compile"]:
        errs.add("embedded.compile_scope", opts["compile_scope"], "applies to torch.compile only: set embedded.compile: true")
    if opts["compile"] and opts["compile_mode"] in CUDA_GRAPH_MODES and opts["compile_scope"] == "layers":
        errs.add("embedded.compile_mode", opts["compile_mode"], CUDA_GRAPHS_WITH_LAYERS)
    if opts["liger_kernels"] and opts["compile"]:
        errs.add("embedded.liger_kernels", True, LIGER_WITH_COMPILE)
    for key, values in CUDA_ONLY.items():
        if opts[key] in values and device == "cpu":
            errs.add(f"embedded.{key}", opts[key], "needs a CUDA GPU and this run's device is cpu"
                     + ("; use 'math' or 'auto' on the CPU" if key == "attention" else "")
                     + ("; use 'chunked' on the CPU" if key == "fused_ce" else ""))
    for key, values in NEEDS_LIGER.items():
        if opts[key] in values and not (have_liger or liger_installed)():
            errs.add(f"embedded.{key}", opts[key], "needs liger-kernel, which is not installed: "
                                                   "pip install -e '.[gpu]' (on a GPU machine)")
    return errs


def embedded_errors(run: dict, model: dict) -> list[str]:
    errs = _Errors(run)
    if run.get("track") == "data_parallel" and run.get("ep", 1) > 1:
        errs.add("ep", run["ep"], "the embedded engine splits experts on the model_parallel track only")
    return errs + embedded_option_errors(run, run.get("device", "auto"))


def nemo_local_spec(run: dict) -> bool:
    """Whether a NeMo run uses Megatron's local layer spec (``nemo: {transformer_impl: local}``: no Transformer
    Engine, unfused attention), from its ``engine_options``."""
    return run.get("engine") == "nemo" and (run.get("engine_options") or {}).get("transformer_impl") == "local"


def nemo_errors(run: dict, model: dict) -> list[str]:
    """NeMo 2.7.3 / Megatron-core rules on top of the common ones."""
    errs = _Errors(run)
    if run.get("precision") != "bf16":
        errs.add("precision", run.get("precision"), "the NeMo recipes train in bf16-mixed only ('bf16')")
    if run.get("device", "cuda") not in ("auto", "cuda"):
        errs.add("device", run.get("device"), "NeMo trains on CUDA GPUs only")
    nemo = model.get("nemo")
    if not isinstance(nemo, dict):
        errs.add("model.nemo", nemo, f"model {model.get('name')!r} has no 'nemo' section "
                                     "{recipe, model_class, config_class} (see models/llama31_8b/model.yaml)")
    else:
        for key in ("recipe", "model_class", "config_class"):
            if not isinstance(nemo.get(key), str) or not nemo.get(key):
                errs.add(f"model.nemo.{key}", nemo.get(key), "must be a non-empty string (a name in nemo.collections.llm)")
    source = model.get("source")
    if not isinstance(source, str) or not source.strip():
        errs.add("model.source", source, "no weights source: 'synthetic', 'hf://org/name' or a local directory")
    elif source.startswith("hf://") and source.count("/") < 3:
        errs.add("model.source", source, "hub sources are 'hf://org/name'")
    elif "://" in source and not source.startswith("hf://"):
        errs.add("model.source", source, "only 'hf://' sources or local directories are supported")
    elif source == "synthetic" and model.get("synthetic_at_load"):
        errs.add("model.synthetic_at_load", True, "NeMo converts weights from files: a synthetic model for NeMo "
                                                  "needs synthetic_at_load: false")
    for key in ("checkpoint", "run_dir"):
        if not run.get(key):
            errs.add(key, run.get(key), "is required")
    tp, ep, gpus = run.get("tp"), run.get("ep"), run.get("gpus")
    if all(isinstance(v, int) for v in (tp, ep, gpus)) and tp * ep and gpus % (tp * ep):
        errs.add("ep", ep, f"tp x ep = {tp * ep} must divide gpus = {gpus} (Megatron's expert grid, pp = 1)")
    if isinstance(tp, int) and isinstance(ep, int) and tp > 1 and ep > 1 and run.get("sp") is False:
        errs.add("sp", False, f"Megatron requires sequence parallelism when tp ({tp}) and ep ({ep}) are both > 1")
    if not isinstance(run.get("seed"), int) or run.get("seed", 0) <= 0:
        errs.add("seed", run.get("seed"), "must be a positive integer (Megatron rejects seed <= 0)")
    _check_lora_targets(errs, run, nemo_lora_targets)
    return errs


def _check_lora_targets(errs: _Errors, run: dict, engine_names: Callable[[list], list]) -> None:
    """The run's LoRA targets must map to the engine's module names (``engine_names`` raises otherwise)."""
    lora = run.get("lora")
    if isinstance(lora, dict) and isinstance(lora.get("targets"), list) and lora["targets"]:
        try:
            engine_names(lora["targets"])
        except ValueError as e:
            errs.add("lora.targets", lora["targets"], str(e))


def automodel_errors(run: dict, model: dict) -> list[str]:
    errs = _Errors(run)
    if run.get("device", "cuda") not in ("auto", "cuda"):
        errs.add("device", run.get("device"), "NeMo AutoModel trains on CUDA GPUs only")
    if run.get("track") != "data_parallel":
        errs.add("track", run.get("track"), "the automodel engine runs the data_parallel track (LoRA) only here")
    if model.get("synthetic_at_load"):
        errs.add("model.synthetic_at_load", True, "AutoModel loads weights from files: needs synthetic_at_load: false")
    _check_lora_targets(errs, run, hf_lora_targets)
    return errs


ENGINE_CHECKS: dict[str, Callable[[dict, dict], list[str]]] = {
    "embedded": embedded_errors,
    "nemo": nemo_errors,
    "automodel": automodel_errors,
}


def run_errors(run: dict, model: dict) -> list[str]:
    """Every reason ``run`` (a run.json dict) cannot run on its engine for ``model`` (a model.yaml dict)."""
    engine = run.get("engine")
    if engine not in ENGINE_CHECKS:
        return [f"run {run.get('name', '<unnamed run>')}: engine = {engine!r}: must be one of {list(ENGINE_CHECKS)}"]
    return common_errors(run, model) + ENGINE_CHECKS[engine](run, model)


__all__ = ["EMBEDDED_OPTIONS", "EXPERT_KEYS", "embedded_option_errors", "embedded_options", "HF_LORA_GROUPS", "NEMO_LORA_TARGETS", "hf_lora_targets", "nemo_local_spec", "nemo_lora_targets",
           "num_experts", "run_errors"]
