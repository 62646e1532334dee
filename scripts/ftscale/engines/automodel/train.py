"""NeMo AutoModel engine: LoRA fine-tuning of the imported Hugging Face checkpoint with NVIDIA's
PyTorch-native library (``nemo_automodel``, its ``TrainFinetuneRecipeForNextTokenPrediction``).

Written against nemo_automodel 0.7.0. The recipe is configured as AutoModel's own YAML recipes are
(``automodel_config`` builds the same tree, modelled on its published Llama-3.1-8B PEFT benchmark
recipe), written to ``<run_dir>/automodel.yaml`` for the record, and run in this torchrun-launched
process. Nothing here imports ``nemo_automodel`` at module level.

Entry point (started by ftscale.run.launch)::

    torchrun --nproc-per-node=N -m ftscale.engines.automodel.train RUN_DIR/run.json

Its per-step line (``step N | epoch E | loss ... | mem X GiB | tps T(P/gpu) | ...``) is read back by
ftscale.run.logformat.parse_steps; memory there is CUDA max allocated over the step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ftscale.engines.automodel.spec import AutoModelSpec
from ftscale.run.logformat import kv_line
from ftscale.run.outcome import refused, reported
from ftscale.study.check import run_errors
from ftscale.study.run import Run


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def dataset_config(run: Run, model: dict) -> dict:
    """AutoModel's dataset section: its MockIterableDataset for mock data (random tokens of the
    model's vocabulary, already batched), else its column-mapped instruction dataset over the prepared
    training.jsonl, padded to the sequence length (every step then has global_batch x seq tokens)."""
    if (run.data or {}).get("kind") == "mock":
        return {
            "_target_": "nemo_automodel.components.datasets.llm.mock_iterable_dataset.MockIterableDataset",
            "vocab_size": model["architecture"]["vocab_size"],
            "seq_len": run.seq_length,
            "num_samples": run.global_batch * (run.steps + 1),
            "batch_size": run.micro_batch,
        }
    return {
        "_target_": "nemo_automodel.components.datasets.llm.column_mapped_text_instruction_dataset."
                    "ColumnMappedTextInstructionDataset",
        "path_or_dataset_id": os.path.join(_abs(run.dataset_dir), "training.jsonl"),
        "column_mapping": {"context": "input", "answer": "output"},
        "seq_length": run.seq_length,
        "padding": "max_length",
        "truncation": True,
    }


def lora_patterns(targets: list[str], architecture: dict | None = None) -> list[str]:
    """AutoModel's ``peft.target_modules`` for the run's LoRA targets: ``*.<hf name>`` each. Its ModuleMatcher
    (nemo_automodel 0.7.0, components/_peft/module_matcher.py) compares a pattern with the module's full
    dotted name (``model.layers.0.self_attn.q_proj``), anchored at the start: a bare ``q_proj`` matches no
    module, and the first run on the H200 stopped at ``optimizer received no trainable parameters``."""
    return [f"*.{name}" for name in AutoModelSpec().lora_targets(targets, architecture)]


def automodel_config(run: Run, model: dict) -> dict:
    """The AutoModel recipe tree for ``run`` (a run.json dict) and ``model`` (its model.yaml dict).

    Every batch and LoRA setting comes from the run; the rest follows AutoModel's published
    Llama-3.1-8B PEFT benchmark recipe (FSDP2, Hugging Face model code, its Triton LoRA kernel,
    masked cross-entropy, AdamW). Checkpointing and validation are off: a scaling run measures steps.
    Raises ValueError with ftscale.study.check.run_errors messages when the run is not valid.
    """
    errors = run_errors(run, model)
    if errors:
        raise ValueError("cannot configure NeMo AutoModel:\n  " + "\n  ".join(errors))
    lora = run.lora
    mock = (run.data or {}).get("kind") == "mock"
    return {
        "recipe": "TrainFinetuneRecipeForNextTokenPrediction",
        "seed": run.seed,
        "step_scheduler": {
            "global_batch_size": run.global_batch,
            "local_batch_size": run.micro_batch,
            "max_steps": run.steps,
            "ckpt_every_steps": run.steps + 1,
            "val_every_steps": run.steps + 1,
        },
        "dist_env": {"backend": "nccl", "timeout_minutes": 10},
        "rng": {"_target_": "nemo_automodel.components.training.rng.StatefulRNG", "seed": run.seed,
                "ranked": True},
        "model": {
            "_target_": "nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained",
            "pretrained_model_name_or_path": _abs(run.checkpoint),
            "force_hf": True,
        },
        "peft": {
            "_target_": "nemo_automodel.components._peft.lora.PeftConfig",
            "target_modules": lora_patterns(lora["targets"], model.get("architecture")),
            "dim": lora["rank"],
            "alpha": lora["alpha"],
            "dropout": lora.get("dropout", 0.0),
            "use_triton": True,
        },
        "distributed": {"strategy": "fsdp2", "dp_size": None, "tp_size": run.tp, "cp_size": 1,
                        "sequence_parallel": bool(run.sp)},
        "loss_fn": {"_target_": "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy"},
        "dataset": dataset_config(run, model),
        "dataloader": {"_target_": "torch.utils.data.DataLoader", "batch_size": None} if mock else
                      {"_target_": "torchdata.stateful_dataloader.StatefulDataLoader", "collate_fn": "default",
                       "shuffle": True},
        "optimizer": {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.999], "eps": 1e-8,
                      "lr": run.learning_rate, "weight_decay": 0.01},
        "checkpoint": {"enabled": False, "checkpoint_dir": os.path.join(_abs(run.directory), "automodel_ckpt")},
    }


def _load_model(run: Run) -> dict:
    import yaml

    return yaml.safe_load((Path("models") / run.model / "model.yaml").read_text())


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m ftscale.engines.automodel.train RUN_JSON``: configure the recipe, run it here."""
    parser = argparse.ArgumentParser(prog="python -m ftscale.engines.automodel.train")
    parser.add_argument("run_json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    run_json = Path(args.run_json)
    run = Run.load(run_json)
    model = _load_model(run)
    rank = int(os.environ.get("RANK", 0))
    if (code := refused(run, model, os.environ)) is not None:
        return code

    def job() -> None:
        import nemo_automodel
        import torch
        import yaml
        from nemo_automodel.components.config.loader import load_yaml_config
        from nemo_automodel.recipes.llm.train_ft import TrainFinetuneRecipeForNextTokenPrediction

        tree = automodel_config(run, model)
        recipe_yaml = run_json.parent / "automodel.yaml"
        if rank == 0:
            recipe_yaml.write_text(yaml.safe_dump(tree, sort_keys=False))
            print(kv_line("layout", world=run.gpus, tp=run.tp, ep=run.ep, dp=run.dp, sp=int(run.sp),
                          micro_batch=run.micro_batch, global_batch=run.global_batch,
                          seq_length=run.seq_length, steps=run.steps, peft="lora", lora_rank=run.lora["rank"],
                          lora_targets=",".join(AutoModelSpec().lora_targets(run.lora["targets"],
                                                                              model.get("architecture"))),
                          data=(run.data or {}).get("kind", "corpus"), device="cuda",
                          device_name=torch.cuda.get_device_name().replace(" ", "_"), torch=torch.__version__,
                          nemo_automodel=nemo_automodel.__version__), flush=True)
        recipe = TrainFinetuneRecipeForNextTokenPrediction(load_yaml_config(str(_written(recipe_yaml))))
        recipe.setup()
        recipe.run_train_validation_loop()

    return reported(job, rank, run.steps)


def _written(path: Path, timeout_s: float = 60.0) -> Path:
    """Rank 0 writes the recipe; the others wait for it (the process group does not exist yet)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{path}: not written by rank 0 within {timeout_s:.0f} s")
        time.sleep(0.2)
    return path


if __name__ == "__main__":
    sys.exit(main())
