"""NeMo 2 engine: build a fine-tuning recipe from a run, import a Hugging Face checkpoint, run it.

Written against nemo_toolkit 2.7.3, the last release with ``nemo.collections.llm`` (the Llama 3.1 8B
and Mixtral 8x7B recipes), with nemo_run 0.11.1 (see .ci/nemo-venv for the pins). Nothing here
imports NeMo at module level (the pure checks are ``ftscale.engines.nemo.spec``): the functions import
``nemo``/``nemo_run`` inside, so ``ftscale`` stays importable without NeMo.

Layout vocabulary (``ftscale.study.run.Run``): ``gpus = tp x pp x ep x dp``. Megatron carves expert
parallelism out of the data-parallel ranks (expert tensor parallelism = tp, as NeMo leaves it), so the
dense/attention layers see a data-parallel size of ``ep x dp`` (= gpus / (tp x pp), what NeMo divides the
global batch by) and the experts one of ``dp``; ``pp`` stages run Megatron's 1F1B schedule (no
interleaving). The ``distributed_optimizer`` option (default on, as in NeMo's recipes) shards the fp32
main weights and Adam moments over those data-parallel ranks.

Entry point (started by ftscale.run.launch)::

    torchrun --nproc-per-node=N -m ftscale.engines.nemo.train RUN_DIR/run.json

It cannot train on a CPU-only machine (no Transformer Engine); tests/nemo builds real recipes only.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
from pathlib import Path

from ftscale.engines.nemo.convert import arch_fields, local_overrides
from ftscale.engines.nemo.spec import NemoSpec, nemo_lora_targets
from ftscale.engines.nemo.without_te import te_free_training
from ftscale.run.logformat import kv_line
from ftscale.run.outcome import refused, reported
from ftscale.study.check import run_errors
from ftscale.study.run import Run

# ----------------------------------------------------------------------------------------------
# Recipe (needs nemo)
# ----------------------------------------------------------------------------------------------


def _abs(path: str | os.PathLike) -> str:
    """Paths in the run are relative to the working directory (the repository root)."""
    return os.path.abspath(os.fspath(path))


def build_recipe(run: Run, model: dict):
    """The ``run.Partial(llm.finetune, ...)`` for ``run``, every layout and batch setting explicit.

    Starts from ``llm.<model.nemo.recipe>.finetune_recipe`` and then sets, whatever the recipe's
    defaults (the Llama full fine-tune recipe sets TP=2; the Mixtral one EP=8, and PP=4/VP=8 for
    full fine-tuning)::

        trainer.strategy.tensor_model_parallel_size          = tp
        trainer.strategy.pipeline_model_parallel_size        = pp
        trainer.strategy.virtual_pipeline_model_parallel_size= None   (1F1B, no interleaving)
        trainer.strategy.pipeline_dtype                      = bf16 with pp > 1 (what stages send), else None
        trainer.strategy.expert_model_parallel_size          = ep
        trainer.strategy.expert_tensor_parallel_size         = None   (Megatron: = tp)
        trainer.strategy.context_parallel_size               = 1
        trainer.strategy.sequence_parallel                   = sp
        trainer.strategy.progress_interval                   = 1      (ProgressPrinter line every step)
        trainer.strategy.replace_progress_bar                = True
        trainer.devices / num_nodes                          = gpus_per_node / nodes
        trainer.max_steps / log_every_n_steps                = steps / 1
        trainer.callbacks                                    += TimingCallback if missing
        data                                                 = data_module(run) (mock or prepared; never SQuAD)
        model.config <architecture fields>, seq_length       = model.yaml's shape (arch_fields), seq_length
        model.config TE-only settings, layer spec            = off / local, with transformer_impl: local
        optim.lr_scheduler.warmup_steps / max_steps          = warmup_steps / steps
        optim.config.lr                                      = learning_rate (when the run has one)
        optim.config.use_distributed_optimizer               = nemo.distributed_optimizer (default true)
        resume.restore_config.path                           = abspath(checkpoint)  (not nemo://...)
        resume.resume_if_exists                              = False (always start from the import)
        peft.dim / alpha / target_modules                    = lora rank / alpha / targets
        log.log_dir / name                                   = abspath(run_dir)/nemo / run name

    Validation, checkpointing and the learning rate (when the run has none) keep the recipe's values.
    Raises ValueError with ftscale.study.check.run_errors messages when the run is not valid.
    """
    errors = run_errors(run, model)
    if errors:
        raise ValueError("cannot build a NeMo recipe:\n  " + "\n  ".join(errors))
    import nemo_run as nr
    import torch
    from nemo.collections import llm
    from nemo.utils.exp_manager import TimingCallback

    factory = getattr(llm, model["nemo"]["recipe"]).finetune_recipe
    kwargs = dict(
        dir=os.path.join(_abs(run.directory), "nemo"),
        name=run.name,
        num_nodes=run.nodes,
        num_gpus_per_node=run.gpus_per_node,
        peft_scheme="lora" if run.lora else "none",
    )
    if "seq_length" in inspect.signature(factory).parameters:  # llama31_8b yes, mixtral_8x7b no
        kwargs["seq_length"] = run.seq_length
    recipe = factory(**kwargs)

    strategy = recipe.trainer.strategy
    strategy.tensor_model_parallel_size = run.tp
    strategy.pipeline_model_parallel_size = run.pp
    strategy.virtual_pipeline_model_parallel_size = None
    strategy.pipeline_dtype = torch.bfloat16 if run.pp > 1 else None
    strategy.expert_model_parallel_size = run.ep
    strategy.expert_tensor_parallel_size = None
    strategy.context_parallel_size = 1
    strategy.sequence_parallel = bool(run.sp)
    strategy.replace_progress_bar = True
    strategy.progress_interval = 1

    trainer = recipe.trainer
    trainer.devices = run.gpus_per_node
    trainer.num_nodes = run.nodes
    trainer.max_steps = run.steps
    trainer.log_every_n_steps = 1
    callbacks = list(trainer.callbacks or [])
    if not any(getattr(cb, "__fn_or_cls__", None) is TimingCallback for cb in callbacks):
        callbacks.append(nr.Config(TimingCallback))
    trainer.callbacks = callbacks

    recipe.data = data_module(run)
    config = recipe.model.config
    for key, value in arch_fields(model.get("architecture") or {}).items():
        setattr(config, key, value)
    config.seq_length = run.seq_length
    if NemoSpec().local_spec(run):
        for key, value in local_overrides(config.__fn_or_cls__).items():
            setattr(config, key, value)

    recipe.optim.lr_scheduler.warmup_steps = run.warmup_steps
    recipe.optim.lr_scheduler.max_steps = run.steps
    if run.learning_rate is not None:
        recipe.optim.config.lr = run.learning_rate
    recipe.optim.config.use_distributed_optimizer = NemoSpec().options(run).distributed_optimizer

    recipe.resume.restore_config.path = _abs(run.checkpoint)
    recipe.resume.resume_if_exists = False

    if run.lora:
        recipe.peft.dim = run.lora["rank"]
        recipe.peft.alpha = run.lora["alpha"]
        recipe.peft.target_modules = nemo_lora_targets(run.lora["targets"], model.get("architecture"))
    return recipe


def data_module(run: Run):
    """The recipe's data (never the recipe's SQuAD default, which downloads inside the job):

    - ``mock``: ``llm.MockDataModule`` (random tokens), with the imported model's tokenizer and one global
      batch of validation and test samples (NeMo's default is 10,000: the fine-tuning recipe validates every
      30 steps, which would be 1,250 validation steps of a benchmark);
    - any prepared dataset: ``llm.FineTuningDataModule`` over ``experiments/data/<dataset>``
      (training.jsonl / validation.jsonl), padded to the sequence length, so every step has
      global_batch x seq_length tokens. Its tokenizer is the model's (``llm.finetune`` sets it).
    """
    import nemo_run as nr
    from nemo.collections import llm

    common = dict(seq_length=run.seq_length, micro_batch_size=run.micro_batch,
                  global_batch_size=run.global_batch, num_workers=2)
    if (run.data or {}).get("kind") == "mock":
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

        return nr.Config(llm.MockDataModule, **common, num_val_samples=run.global_batch,
                         num_test_samples=run.global_batch, tokenizer=nr.Config(AutoTokenizer, pretrained_model_name=_abs(run.tokenizer)))
    return nr.Config(llm.FineTuningDataModule, dataset_root=_abs(run.dataset_dir), seed=run.seed,
                     dataset_kwargs={"pad_to_max_length": True}, **common)


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
        "seed": getattr(d, "seed", None),
        "data": getattr(d, "__fn_or_cls__", type(d)).__name__,
        "dataset_root": str(getattr(d, "dataset_root", "")) or None,
        "num_layers": recipe.model.config.num_layers,
        "hidden_size": recipe.model.config.hidden_size,
        "vocab_size": getattr(recipe.model.config, "vocab_size", None),
        "warmup_steps": recipe.optim.lr_scheduler.warmup_steps,
        "lr_max_steps": recipe.optim.lr_scheduler.max_steps,
        "learning_rate": recipe.optim.config.lr,
        "distributed_optimizer": recipe.optim.config.use_distributed_optimizer,
        "pipeline_dtype": s.pipeline_dtype,
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
# Entry point: one process of a torchrun job
# ----------------------------------------------------------------------------------------------


def _load_model(run: Run, model_yaml: str | None) -> dict:
    import yaml

    path = Path(model_yaml or Path("models") / run.model / "model.yaml")
    return yaml.safe_load(path.read_text())


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m ftscale.engines.nemo.train RUN_JSON [--model-yaml PATH]``: build the recipe, run it here.

    Runs the recipe in this (already torchrun-launched) process with ``nemo_run.run(recipe,
    direct=True)``, which is ``fiddle.build(recipe)()`` = ``llm.finetune(...)``: Lightning picks up
    the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), no executor or second launcher.
    """
    parser = argparse.ArgumentParser(prog="python -m ftscale.engines.nemo.train")
    parser.add_argument("run_json")
    parser.add_argument("--model-yaml", default=None, help="default: models/<run.model>/model.yaml")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    # ProgressPrinter uses a bare print(): into a log file that is block-buffered, so step lines would
    # arrive late and a killed job would leave a half-written last line. One flush per line instead.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    run = Run.load(args.run_json)
    model = _load_model(run, args.model_yaml)
    rank = int(os.environ.get("RANK", 0))
    if (code := refused(run, model, os.environ)) is not None:
        return code

    # Read by MegatronStrategy.__init__: adds max_memory_reserved/allocated (bytes) to each step line.
    os.environ["NEMO_LOG_MEMORY_USAGE"] = "1"
    def job() -> None:
        import lightning.pytorch as pl
        import nemo
        import nemo_run as nr
        import torch

        # Sets PL_GLOBAL_SEED: MegatronStrategy.setup_distributed's reset_seed() re-applies it after
        # NeMo seeds Megatron's model-parallel RNG with its fixed 1234 (not settable in 2.7.3).
        pl.seed_everything(run.seed, workers=True)
        recipe = build_recipe(run, model)
        if rank == 0:
            f = recipe_fields(recipe)
            print(kv_line("layout", world=f["gpus"], tp=f["tp"], ep=f["ep"], dp=run.dp, pp=f["pp"], cp=f["cp"],
                          distributed_optimizer=int(f["distributed_optimizer"]),
                          sp=int(f["sp"]), micro_batch=f["micro_batch"], global_batch=f["global_batch"],
                          seq_length=f["seq_length"], peft=f["peft"] or "none", lora_rank=f["lora_rank"],
                          restore=f["checkpoint"], device="cuda",
                          device_name=torch.cuda.get_device_name().replace(" ", "_"), torch=torch.__version__,
                          nemo=nemo.__version__), flush=True)
        with te_free_training() if NemoSpec().local_spec(run) else contextlib.nullcontext():
            nr.run(recipe, direct=True)

    return reported(job, rank, run.steps)


if __name__ == "__main__":
    sys.exit(main())
