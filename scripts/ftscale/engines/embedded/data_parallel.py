"""The data-parallel track of the embedded engine: LoRA adapters (peft) under DistributedDataParallel."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ftscale.engines.embedded.training import TrainSetup, count_params
from ftscale.study.run import Run


def lora_target_modules(model: torch.nn.Module, run: Run) -> list[str]:
    """peft's ``target_modules`` for the run: its targets checked against the model's architecture
    (``EngineSpec.lora_targets``, as before any job), then against the loaded model's own nn.Linear names,
    so that peft never adapts fewer modules than asked for. ValueError naming the valid names."""
    targets = run.spec.lora_targets(run.lora["targets"], {"type": model.config.model_type})
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if missing := [t for t in targets if t not in linear]:
        raise ValueError(f"run {run.name}: lora.targets = {run.lora['targets']!r}: the loaded model has no nn.Linear "
                         f"named {missing}; its linear layers are {sorted(linear)}")
    return targets


def prepare_data_parallel(model: torch.nn.Module, run: Run, device: torch.device,
                          lora_dtype: str = "float32", broadcast_buffers: bool = True) -> TrainSetup:
    """LoRA adapters on ``model`` (``lora_dtype``: ``float32``, peft's default, upcasts bf16/fp16 adapters
    and with them each target's input, so the adapters' matrix multiplies run in fp32; ``model``: adapters
    in the model's dtype, on the tensor cores), wrapped in DDP. ``broadcast_buffers`` off: DDP does not send
    rank 0's buffers at every forward (the frozen weights' float8 copies are buffers, the same on every rank)."""
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    lora = run.lora
    targets = lora_target_modules(model, run)
    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config, autocast_adapter_dtype=lora_dtype == "float32").to(device)
    held, trainable = count_params(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=broadcast_buffers)
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = {"world": world, "tp": 1, "ep": 1, "dp": world, "sp": 0, "lora_rank": lora["rank"],
              "params_per_rank": held, "trainable_per_rank": trainable}
    return TrainSetup(model=ddp, dp_rank=rank, dp_size=world, layout=layout, no_sync=ddp.no_sync)
