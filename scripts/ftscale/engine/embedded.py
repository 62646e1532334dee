"""The embedded engine: a real fine-tuning loop on PyTorch + transformers + peft.

Launched by torchrun, one process per GPU (or per CPU "GPU" with gloo):

    torchrun --standalone --nproc-per-node N -m ftscale.engine.embedded RUN_DIR/run.json

The data-parallel track trains LoRA adapters under DistributedDataParallel; the model-parallel
track fully fine-tunes a model split by ``ftscale.engine.parallel``. Every step prints one line in
the format of ``ftscale.logformat`` and appends a record to RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

from ftscale.data import corpus_tokens, global_batch, micro_batches
from ftscale.logformat import error_line, kv_line, step_line

EXIT_OOM = 3


@dataclass
class Prepared:
    """A model made ready for one track: what to train and how the ranks share the data."""

    model: torch.nn.Module
    dp_rank: int
    dp_size: int
    layout: dict
    # Context for all but the last micro-batch of a step (DDP's no_sync), if any.
    no_sync: Callable[[], ContextManager] | None = None
    extra: dict = field(default_factory=dict)

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def _device(run: dict, local_rank: int) -> torch.device:
    want = run.get("device", "auto")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _dtype(run: dict, device: torch.device) -> torch.dtype:
    precision = run.get("precision", "auto")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters held by this rank, trainable ones); DTensor shards counted locally."""
    total = trainable = 0
    for p in model.parameters():
        n = p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def prepare_data_parallel(model: torch.nn.Module, run: dict, device: torch.device) -> Prepared:
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    lora = run["lora"]
    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                        target_modules=list(lora["targets"]), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config).to(device)
    held, trainable = count_params(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = {"world": world, "tp": 1, "ep": 1, "dp": world, "sp": 0, "lora_rank": lora["rank"],
              "params_per_rank": held, "trainable_per_rank": trainable}
    return Prepared(model=ddp, dp_rank=rank, dp_size=world, layout=layout, no_sync=ddp.no_sync)


def _memory(device: torch.device) -> tuple[float, float, str]:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2**20,
                torch.cuda.max_memory_reserved(device) / 2**20, "cuda")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0.0, "rss"  # ru_maxrss is in KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(run: dict, prepared: Prepared, tokens: torch.Tensor, device: torch.device, out: Path) -> None:
    rank = dist.get_rank()
    model = prepared.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run["learning_rate"], fused=device.type == "cuda" or None)
    accum = run["grad_accum"]
    metrics = out.open("w") if rank == 0 else None
    for step in range(1, run["steps"] + 1):
        batch = global_batch(tokens, step, run["global_batch"], run["seq_length"], run["seed"])
        micros = micro_batches(batch, run["micro_batch"], prepared.dp_rank, prepared.dp_size)
        assert len(micros) == accum, (len(micros), accum)
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        for i, micro in enumerate(micros):
            sync_ctx = prepared.no_sync() if (prepared.no_sync and i < len(micros) - 1) else contextlib.nullcontext()
            with sync_ctx:
                loss = prepared.loss(micro.to(device))
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        elapsed = time.perf_counter() - start
        peak, reserved, kind = _memory(device)
        stats = torch.tensor([elapsed, peak, reserved], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        mean_loss = loss_sum.item() / (accum * dist.get_world_size())
        if rank == 0:
            elapsed, peak, reserved = stats.tolist()
            tokens_step = run["global_batch"] * run["seq_length"]
            print(step_line(step, run["steps"], mean_loss, elapsed, tokens_step, peak, reserved, kind), flush=True)
            metrics.write(json.dumps({"step": step, "loss": mean_loss, "step_time_s": elapsed, "tokens": tokens_step,
                                      "tokens_per_s": tokens_step / elapsed, "peak_mem_mib": peak,
                                      "reserved_mib": reserved, "mem_kind": kind}) + "\n")
            metrics.flush()
    if metrics:
        metrics.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun ... -m ftscale.engine.embedded RUN_DIR/run.json", file=sys.stderr)
        return 2
    run_json = Path(argv[0])
    run = json.loads(run_json.read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(run, local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if world != run["gpus"]:
            raise RuntimeError(f"launched with {world} processes but the run asks for {run['gpus']} GPUs")
        if device.type == "cpu":
            # The launcher sets FTSCALE_THREADS_PER_RANK from the job's CPUs (torchrun's own default is 1).
            per_rank = os.environ.get("FTSCALE_THREADS_PER_RANK")
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(int(per_rank) if per_rank else max(1, (os.cpu_count() or 1) // local))
        torch.manual_seed(run["seed"])
        from transformers import AutoTokenizer

        from ftscale.models import load_for_training

        dtype = _dtype(run, device)
        # Synthetic at-load weights are made on the GPU; with model parallelism every rank builds the
        # same full model on the CPU first and keeps its shards.
        where = device if (device.type == "cuda" and run["track"] == "data_parallel") else torch.device("cpu")
        model = load_for_training(run["checkpoint"], dtype, where)
        options = run.get("engine_options") or {}
        if options.get("activation_checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tokens = corpus_tokens(AutoTokenizer.from_pretrained(run["checkpoint"]))
        if run["track"] == "data_parallel":
            prepared = prepare_data_parallel(model, run, device)
        else:
            from ftscale.engine.parallel import prepare_model_parallel

            prepared = prepare_model_parallel(model, run, device)
        if options.get("compile"):
            prepared.model.compile()
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if rank == 0:
            print(kv_line("layout", **prepared.layout, device=device.type, device_name=device_name.replace(" ", "_"),
                          dtype=str(dtype).removeprefix("torch."),
                          activation_checkpointing=int(bool(options.get("activation_checkpointing"))),
                          compile=int(bool(options.get("compile")))), flush=True)
        train(run, prepared, tokens, device, run_json.parent / "metrics.jsonl")
        if rank == 0:
            print(kv_line("done", steps=run["steps"]), flush=True)
        code = 0
    except torch.OutOfMemoryError as err:
        print(error_line("oom", f"rank {rank}: {err}"), flush=True)
        code = EXIT_OOM
    except Exception as err:  # noqa: BLE001 - any failure must end the job with a reason in the log
        traceback.print_exc()
        print(error_line("failed", f"rank {rank}: {type(err).__name__}: {err}"), flush=True)
        code = 1
    if code == 0:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
