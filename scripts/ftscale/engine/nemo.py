"""NeMo 2 engine: build a fine-tuning recipe from a run, import a Hugging Face checkpoint, run it.

Written against nemo_toolkit 2.7.3, the last release with ``nemo.collections.llm`` (the Llama 3.1 8B
and Mixtral 8x7B recipes), with nemo_run 0.11.1 (see .ci/nemo-venv for the pins). Nothing here
imports NeMo at module level: ``check_run`` and ``lora_targets`` are pure, the rest import
``nemo``/``nemo_run`` inside the function, so ``ftscale`` stays importable without NeMo.

Layout vocabulary (the run dict, see ftscale.config.Run): ``gpus = tp x ep x dp`` with pipeline
parallelism 1. Megatron carves expert parallelism out of the data-parallel ranks (expert tensor
parallelism = tp, as NeMo leaves it), so the dense/attention layers see a data-parallel size of
``ep x dp`` (= gpus / tp, what NeMo divides the global batch by) and the experts one of ``dp``.

Entry point (started by ftscale.launch)::

    torchrun --nproc-per-node=N -m ftscale.engine.nemo RUN_DIR/run.json

It cannot train on a CPU-only machine (no Transformer Engine); tests/nemo builds real recipes only.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

TRACKS = ("data_parallel", "model_parallel")

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

#: Keys of model["architecture"] that may hold the number of experts (model.schema.yaml uses the first).
EXPERT_KEYS = ("num_local_experts", "num_experts", "num_moe_experts")

#: Files a finished ``llm.import_ckpt`` leaves in its output directory (nemo 2.7.3,
#: ModelConnector.nemo_save): ``trainer.save_checkpoint`` writes the Megatron distributed
#: checkpoint into ``weights/`` and its ``metadata.json`` last (megatron.core.dist_checkpointing
#: save -> metadata_finalize_fn, after every shard and the torch-DCP ``.metadata``); only then does
#: rank 0 dump ``context/io.json`` and, after it, ``context/model.yaml`` (TrainerContext.io_dump).
IMPORT_COMPLETE_FILES = ("weights/metadata.json", "weights/.metadata", "context/io.json", "context/model.yaml")


# ----------------------------------------------------------------------------------------------
# Pure checks (no NeMo)
# ----------------------------------------------------------------------------------------------


def num_experts(model: dict) -> int:
    """Experts per MoE layer from the model's architecture; 1 for a dense model."""
    arch = model.get("architecture") or {}
    for key in EXPERT_KEYS:
        if arch.get(key):
            return int(arch[key])
    return 1


def lora_targets(targets: list[str]) -> list[str]:
    """NeMo LoRA ``target_modules`` for the run's targets (NeMo or Hugging Face names).

    NeMo names (``linear_qkv`` ...) and wildcard patterns pass through; Hugging Face names are
    mapped through ``HF_LORA_GROUPS``. Raises ValueError for an unknown name or a partial fused
    group (check_run reports the same as a message).
    """
    out: list[str] = []
    hf = set()
    for t in targets:
        if t in NEMO_LORA_TARGETS or any(c in t for c in "*.?["):
            if t not in out:
                out.append(t)
        elif any(t in group for group in HF_LORA_GROUPS.values()):
            hf.add(t)
        else:
            raise ValueError(
                f"unknown LoRA target {t!r}: use NeMo names {list(NEMO_LORA_TARGETS)} or Hugging Face names "
                f"{sorted(n for g in HF_LORA_GROUPS.values() for n in g)}"
            )
    for nemo_name, group in HF_LORA_GROUPS.items():
        present = [n for n in group if n in hf]
        if present and len(present) != len(group):
            missing = [n for n in group if n not in hf]
            raise ValueError(
                f"LoRA targets {present} without {missing}: NeMo fuses {list(group)} into {nemo_name} "
                "and adapts it as a whole; list all of them or none"
            )
        if present and nemo_name not in out:
            out.append(nemo_name)
    return out


def hf_source(model: dict) -> str:
    """The ``hf://`` source NeMo's importer takes: the hub id as given, or ``hf://`` + absolute local dir."""
    source = str(model.get("source") or "")
    if source.startswith("hf://"):
        return source
    return "hf://" + str(Path(source).resolve())


def check_run(run: dict, model: dict) -> list[str]:
    """Every reason ``run`` cannot be built as a NeMo recipe for ``model`` (empty when it can).

    Pure: no NeMo import. Each message names the run, the key and its value.
    """
    name = run.get("name", "<unnamed run>")
    errs: list[str] = []

    def err(key: str, value: Any, why: str) -> None:
        errs.append(f"run {name}: {key} = {value!r}: {why}")

    def intval(key: str, minimum: int = 1) -> int | None:
        value = run.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            err(key, value, f"must be an integer >= {minimum}")
            return None
        return value

    if run.get("engine") != "nemo":
        err("engine", run.get("engine"), "this builder is for engine 'nemo'")
    track = run.get("track")
    if track not in TRACKS:
        err("track", track, f"must be one of {list(TRACKS)}")
    if run.get("model") != model.get("name"):
        err("model", run.get("model"), f"does not match the model dict's name {model.get('name')!r}")
    if run.get("precision") != "bf16":
        err("precision", run.get("precision"), "the NeMo recipes train in bf16-mixed only ('bf16')")
    if run.get("device", "cuda") not in ("auto", "cuda"):
        err("device", run.get("device"), "NeMo trains on CUDA GPUs only")

    # --- the model's nemo section and weights source
    nemo = model.get("nemo")
    if not isinstance(nemo, dict):
        err("model.nemo", nemo, f"model {model.get('name')!r} has no 'nemo' section "
                                "{recipe, model_class, config_class} (see models/llama31_8b/model.yaml)")
    else:
        for key in ("recipe", "model_class", "config_class"):
            if not isinstance(nemo.get(key), str) or not nemo.get(key):
                err(f"model.nemo.{key}", nemo.get(key), "must be a non-empty string (a name in nemo.collections.llm)")
    source = model.get("source")
    if not isinstance(source, str) or not source.strip():
        err("model.source", source, "no weights source configured: 'hf://org/name' or a local Hugging Face directory")
    elif source == "synthetic":
        err("model.source", source, "NeMo imports real Hugging Face checkpoints only: use 'hf://org/name' or a local directory")
    elif source.startswith("hf://") and source.count("/") < 3:
        err("model.source", source, "hub sources are 'hf://org/name'")
    elif "://" in source and not source.startswith("hf://"):
        err("model.source", source, "only 'hf://' sources or local directories are supported")
    if not run.get("checkpoint"):
        err("checkpoint", run.get("checkpoint"), "the path of the imported NeMo checkpoint is required")
    if not run.get("run_dir"):
        err("run_dir", run.get("run_dir"), "the run directory is required")

    # --- layout: gpus = nodes x gpus_per_node = tp x ep x dp, pp = 1
    gpus, nodes, per_node = intval("gpus"), intval("nodes"), intval("gpus_per_node")
    tp, ep, dp = intval("tp"), intval("ep"), intval("dp")
    if gpus and nodes and per_node and nodes * per_node != gpus:
        err("gpus", gpus, f"must equal nodes x gpus_per_node = {nodes} x {per_node} = {nodes * per_node}")
    if gpus and tp and ep and dp and tp * ep * dp != gpus:
        err("gpus", gpus, f"must equal tp x ep x dp = {tp} x {ep} x {dp} = {tp * ep * dp} (pipeline parallel is 1)")
    arch = model.get("architecture") or {}
    if tp:
        for key in ("num_attention_heads", "num_key_value_heads"):
            if arch.get(key) and arch[key] % tp:
                err("tp", tp, f"must divide architecture.{key} = {arch[key]}")
        if gpus and gpus % tp:
            err("tp", tp, f"must divide gpus = {gpus}")
    experts = num_experts(model)
    if ep:
        if experts == 1 and ep > 1:
            err("ep", ep, f"model {model.get('name')!r} is dense (no {EXPERT_KEYS[0]}): expert parallelism needs experts")
        elif experts % ep:
            err("ep", ep, f"must divide the number of experts ({experts})")
        if gpus and ep > gpus:
            err("ep", ep, f"must not exceed gpus = {gpus}")
        if gpus and tp and gpus % (tp * ep):
            err("ep", ep, f"tp x ep = {tp * ep} must divide gpus = {gpus} (Megatron's expert grid, pp = 1)")
    sp = run.get("sp")
    if not isinstance(sp, bool):
        err("sp", sp, "must be true or false")
    elif tp:
        if sp and tp == 1:
            err("sp", sp, "sequence parallelism needs tp > 1 (Megatron raises 'Cannot use sequence parallelism "
                          "without tensor parallelism'; NeMo would silently turn it off)")
        if not sp and tp > 1 and ep and ep > 1:
            err("sp", sp, f"Megatron requires sequence parallelism when tp ({tp}) and ep ({ep}) are both > 1")

    # --- batch
    mbs, gbs = intval("micro_batch"), intval("global_batch")
    if mbs and gbs and ep and dp:
        dps = ep * dp  # what NeMo/Megatron divide the global batch by (= gpus / tp)
        if gbs % (mbs * dps):
            err("global_batch", gbs, f"must be divisible by micro_batch x data-parallel size (ep x dp) = "
                                     f"{mbs} x {dps} = {mbs * dps}")
        elif "grad_accum" in run and run["grad_accum"] != gbs // (mbs * dps):
            err("grad_accum", run["grad_accum"], f"NeMo will use global_batch / (micro_batch x ep x dp) = "
                                                 f"{gbs // (mbs * dps)} micro-batches per step")
        if "data_parallel_size" in run and run["data_parallel_size"] != dps:
            err("data_parallel_size", run["data_parallel_size"], f"Megatron's data-parallel size is ep x dp = {dps}")
    intval("seq_length")
    steps = intval("steps")
    warmup = run.get("warmup_steps")
    if not isinstance(warmup, int) or warmup < 0 or (steps and warmup >= steps):
        err("warmup_steps", warmup, f"must be an integer in [0, steps = {steps})")
    if not isinstance(run.get("seed"), int) or run.get("seed", 0) <= 0:
        err("seed", run.get("seed"), "must be a positive integer (Megatron rejects seed <= 0)")

    # --- LoRA: data-parallel track only
    lora = run.get("lora")
    if track == "model_parallel" and lora is not None:
        err("lora", lora, "the model_parallel track is full fine-tuning: lora must be null")
    if lora is not None:
        if not isinstance(lora, dict):
            err("lora", lora, "must be {rank, alpha, targets} or null")
        else:
            for key in ("rank", "alpha"):
                v = lora.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                    err(f"lora.{key}", v, "must be a positive number")
            targets = lora.get("targets")
            if not isinstance(targets, list) or not targets:
                err("lora.targets", targets, "must be a non-empty list of module names")
            else:
                try:
                    lora_targets(targets)
                except ValueError as e:
                    err("lora.targets", targets, str(e))
    return errs


# ----------------------------------------------------------------------------------------------
# Recipe (needs nemo)
# ----------------------------------------------------------------------------------------------


def _abs(path: str | os.PathLike) -> str:
    """Paths in the run are relative to the working directory (the repository root)."""
    return os.path.abspath(os.fspath(path))


def build_recipe(run: dict, model: dict):
    """The ``run.Partial(llm.finetune, ...)`` for ``run``, every layout and batch setting explicit.

    Starts from ``llm.<model.nemo.recipe>.finetune_recipe`` and then sets, whatever the recipe's
    defaults (the Llama full fine-tune recipe sets TP=2; the Mixtral one EP=8, and PP=4/VP=8 for
    full fine-tuning)::

        trainer.strategy.tensor_model_parallel_size          = tp
        trainer.strategy.pipeline_model_parallel_size        = 1
        trainer.strategy.virtual_pipeline_model_parallel_size= None
        trainer.strategy.pipeline_dtype                      = None   (no pipeline)
        trainer.strategy.expert_model_parallel_size          = ep
        trainer.strategy.expert_tensor_parallel_size         = None   (Megatron: = tp)
        trainer.strategy.context_parallel_size               = 1
        trainer.strategy.sequence_parallel                   = sp
        trainer.strategy.progress_interval                   = 1      (ProgressPrinter line every step)
        trainer.strategy.replace_progress_bar                = True
        trainer.devices / num_nodes                          = gpus_per_node / nodes
        trainer.max_steps / log_every_n_steps                = steps / 1
        trainer.callbacks                                    += TimingCallback if missing
        data.global_batch_size / micro_batch_size / seq_length / seed
        model.config.seq_length                              = seq_length (must agree with data)
        optim.lr_scheduler.warmup_steps / max_steps          = warmup_steps / steps
        optim.config.lr                                      = learning_rate (when the run has one)
        resume.restore_config.path                           = abspath(checkpoint)  (not nemo://...)
        resume.resume_if_exists                              = False (always start from the import)
        peft.dim / alpha / target_modules                    = lora rank / alpha / targets
        log.log_dir / name                                   = abspath(run_dir)/nemo / run name

    Validation, checkpointing and the learning rate (when the run has none) keep the recipe's values.
    Raises ValueError with check_run's messages when the run is not valid.
    """
    errors = check_run(run, model)
    if errors:
        raise ValueError("cannot build a NeMo recipe:\n  " + "\n  ".join(errors))
    import nemo_run as nr
    from nemo.collections import llm
    from nemo.utils.exp_manager import TimingCallback

    factory = getattr(llm, model["nemo"]["recipe"]).finetune_recipe
    kwargs = dict(
        dir=os.path.join(_abs(run["run_dir"]), "nemo"),
        name=run["name"],
        num_nodes=run["nodes"],
        num_gpus_per_node=run["gpus_per_node"],
        peft_scheme="lora" if run["lora"] else "none",
    )
    if "seq_length" in inspect.signature(factory).parameters:  # llama31_8b yes, mixtral_8x7b no
        kwargs["seq_length"] = run["seq_length"]
    recipe = factory(**kwargs)

    strategy = recipe.trainer.strategy
    strategy.tensor_model_parallel_size = run["tp"]
    strategy.pipeline_model_parallel_size = 1
    strategy.virtual_pipeline_model_parallel_size = None
    strategy.pipeline_dtype = None
    strategy.expert_model_parallel_size = run["ep"]
    strategy.expert_tensor_parallel_size = None
    strategy.context_parallel_size = 1
    strategy.sequence_parallel = bool(run["sp"])
    strategy.replace_progress_bar = True
    strategy.progress_interval = 1

    trainer = recipe.trainer
    trainer.devices = run["gpus_per_node"]
    trainer.num_nodes = run["nodes"]
    trainer.max_steps = run["steps"]
    trainer.log_every_n_steps = 1
    callbacks = list(trainer.callbacks or [])
    if not any(getattr(cb, "__fn_or_cls__", None) is TimingCallback for cb in callbacks):
        callbacks.append(nr.Config(TimingCallback))
    trainer.callbacks = callbacks

    recipe.data.global_batch_size = run["global_batch"]
    recipe.data.micro_batch_size = run["micro_batch"]
    recipe.data.seq_length = run["seq_length"]
    recipe.data.seed = run["seed"]
    recipe.model.config.seq_length = run["seq_length"]

    recipe.optim.lr_scheduler.warmup_steps = run["warmup_steps"]
    recipe.optim.lr_scheduler.max_steps = run["steps"]
    if run.get("learning_rate") is not None:
        recipe.optim.config.lr = run["learning_rate"]

    recipe.resume.restore_config.path = _abs(run["checkpoint"])
    recipe.resume.resume_if_exists = False

    if run["lora"]:
        recipe.peft.dim = run["lora"]["rank"]
        recipe.peft.alpha = run["lora"]["alpha"]
        recipe.peft.target_modules = lora_targets(run["lora"]["targets"])
    return recipe


def recipe_fields(recipe) -> dict:
    """What a built recipe will do, in the run dict's vocabulary (for tests and the layout line).

    ``peft`` is 'lora' or None; paths are as stored in the recipe (absolute).
    """
    s, t, d = recipe.trainer.strategy, recipe.trainer, recipe.data
    peft = getattr(recipe, "peft", None)
    cls = getattr(peft, "__fn_or_cls__", None)
    callbacks = [getattr(cb, "__fn_or_cls__", type(cb)).__name__ for cb in (t.callbacks or [])]
    restore = getattr(recipe.resume, "restore_config", None)
    return {
        "tp": s.tensor_model_parallel_size,
        "pp": s.pipeline_model_parallel_size,
        "vp": s.virtual_pipeline_model_parallel_size,
        "cp": s.context_parallel_size,
        "ep": s.expert_model_parallel_size,
        "sp": s.sequence_parallel,
        "gpus_per_node": t.devices,
        "nodes": t.num_nodes,
        "gpus": t.devices * t.num_nodes,
        "steps": t.max_steps,
        "log_every_n_steps": t.log_every_n_steps,
        "progress_interval": s.progress_interval,
        "timing_callback": "TimingCallback" in callbacks,
        "callbacks": callbacks,
        "global_batch": d.global_batch_size,
        "micro_batch": d.micro_batch_size,
        "seq_length": d.seq_length,
        "model_seq_length": recipe.model.config.seq_length,
        "seed": d.seed,
        "warmup_steps": recipe.optim.lr_scheduler.warmup_steps,
        "lr_max_steps": recipe.optim.lr_scheduler.max_steps,
        "learning_rate": recipe.optim.config.lr,
        "precision": t.plugins.precision,
        "peft": cls.__name__.lower() if cls is not None else None,
        "lora_rank": getattr(peft, "dim", None) if peft is not None else None,
        "lora_alpha": getattr(peft, "alpha", None) if peft is not None else None,
        "lora_targets": list(getattr(peft, "target_modules", [])) if peft is not None else None,
        "checkpoint": restore.path if restore is not None else None,
        "resume_if_exists": recipe.resume.resume_if_exists,
        "log_dir": recipe.log.log_dir,
        "name": recipe.log.name,
        "val_check_interval": t.val_check_interval,
        "limit_val_batches": t.limit_val_batches,
    }


# ----------------------------------------------------------------------------------------------
# Checkpoint import (needs nemo and, on the GPU node, Transformer Engine)
# ----------------------------------------------------------------------------------------------


def import_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished NeMo 2 import (see IMPORT_COMPLETE_FILES)."""
    out = Path(out_dir)
    return all((out / f).is_file() for f in IMPORT_COMPLETE_FILES)


def import_checkpoint(model: dict, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert the model's Hugging Face checkpoint into a NeMo 2 checkpoint at ``out_dir``.

    ``llm.import_ckpt(model=<model_class>(<config_class>()), source=hf://..., output_path=out_dir)``.
    The hub token comes from ``HF_TOKEN`` (read by huggingface_hub; never printed). Does nothing when
    ``out_dir`` already holds a complete import (unless ``overwrite``); an empty ``out_dir`` is
    replaced; a non-empty incomplete one needs ``overwrite=True``.
    """
    out = Path(out_dir)
    nemo_cfg = model.get("nemo") or {}
    for key in ("model_class", "config_class"):
        if not nemo_cfg.get(key):
            raise ValueError(f"model {model.get('name')!r}: key 'nemo.{key}' is missing from its model.yaml")
    source = model.get("source")
    if not isinstance(source, str) or not source or source == "synthetic":
        raise ValueError(f"model {model.get('name')!r}: source = {source!r}: NeMo needs 'hf://org/name' or a local "
                         "Hugging Face directory")
    if source.startswith("hf://"):
        if model.get("gated") and not os.environ.get("HF_TOKEN"):
            raise RuntimeError(f"model {model.get('name')!r}: {source} is gated: set HF_TOKEN (a Hugging Face token "
                               "with access to the repository) before importing")
    elif not Path(source).is_dir():
        raise FileNotFoundError(f"model {model.get('name')!r}: source = {source!r} is not a directory")
    if not overwrite and import_complete(out):
        print(f"[ftscale] {out} already holds a complete NeMo import; nothing to do", flush=True)
        return out
    if out.exists() and not overwrite:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # llm.import_ckpt refuses any existing output path
        else:
            raise FileExistsError(f"{out} exists but is not a complete NeMo import (no "
                                  f"{', '.join(IMPORT_COMPLETE_FILES)}): import again with overwrite=True")

    from nemo.collections import llm

    model_cls = getattr(llm, nemo_cfg["model_class"])
    config_cls = getattr(llm, nemo_cfg["config_class"])
    result = llm.import_ckpt(model=model_cls(config_cls()), source=hf_source(model), output_path=out,
                             overwrite=overwrite)
    if not import_complete(out):
        raise RuntimeError(f"llm.import_ckpt returned {result} but {out} lacks "
                           f"{[f for f in IMPORT_COMPLETE_FILES if not (out / f).is_file()]}")
    return out


# ----------------------------------------------------------------------------------------------
# Entry point: one process of a torchrun job
# ----------------------------------------------------------------------------------------------


def _load_model(run: dict, model_yaml: str | None) -> dict:
    import yaml

    path = Path(model_yaml or Path("models") / run["model"] / "model.yaml")
    return yaml.safe_load(path.read_text())


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m ftscale.engine.nemo RUN_JSON [--model-yaml PATH]``: build the recipe, run it here.

    Runs the recipe in this (already torchrun-launched) process with ``nemo_run.run(recipe,
    direct=True)``, which is ``fiddle.build(recipe)()`` = ``llm.finetune(...)``: Lightning picks up
    the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), no executor or second launcher.
    """
    parser = argparse.ArgumentParser(prog="python -m ftscale.engine.nemo")
    parser.add_argument("run_json")
    parser.add_argument("--model-yaml", default=None, help="default: models/<run.model>/model.yaml")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from ftscale.logformat import error_line, kv_line

    # ProgressPrinter uses a bare print(): into a log file that is block-buffered, so step lines would
    # arrive late and a killed job would leave a half-written last line. One flush per line instead.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    run = json.loads(Path(args.run_json).read_text())
    model = _load_model(run, args.model_yaml)
    rank = int(os.environ.get("RANK", 0))
    errors = check_run(run, model)
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != run.get("gpus"):
        errors.append(f"run {run.get('name')}: gpus = {run.get('gpus')!r}: launched with WORLD_SIZE = {world}")
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None and int(local) != run.get("gpus_per_node"):
        errors.append(f"run {run.get('name')}: gpus_per_node = {run.get('gpus_per_node')!r}: "
                      f"launched with LOCAL_WORLD_SIZE = {local}")
    if errors:
        for e in errors:
            print(error_line("config", e), flush=True)
        return 2

    # Read by MegatronStrategy.__init__: adds max_memory_reserved/allocated (bytes) to each step line.
    os.environ["NEMO_LOG_MEMORY_USAGE"] = "1"
    code = 0
    try:
        import lightning.pytorch as pl
        import nemo
        import nemo_run as nr
        import torch

        # Sets PL_GLOBAL_SEED: MegatronStrategy.setup_distributed's reset_seed() re-applies it after
        # NeMo seeds Megatron's model-parallel RNG with its fixed 1234 (not settable in 2.7.3).
        pl.seed_everything(run["seed"], workers=True)
        recipe = build_recipe(run, model)
        if rank == 0:
            f = recipe_fields(recipe)
            print(kv_line("layout", world=f["gpus"], tp=f["tp"], ep=f["ep"], dp=run["dp"], pp=f["pp"], cp=f["cp"],
                          sp=int(f["sp"]), micro_batch=f["micro_batch"], global_batch=f["global_batch"],
                          seq_length=f["seq_length"], peft=f["peft"] or "none", lora_rank=f["lora_rank"],
                          restore=f["checkpoint"], device="cuda",
                          device_name=torch.cuda.get_device_name().replace(" ", "_"), torch=torch.__version__,
                          nemo=nemo.__version__), flush=True)
        nr.run(recipe, direct=True)
        if rank == 0:
            print(kv_line("done", steps=run["steps"]), flush=True)
    except Exception as err:  # noqa: BLE001 - the log must say why the job ended
        import traceback

        import torch

        traceback.print_exc()
        kind = "oom" if isinstance(err, torch.OutOfMemoryError) else "failed"
        print(error_line(kind, f"rank {rank}: {type(err).__name__}: {err}"), flush=True)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
