"""The training loop every track of the embedded engine shares: devices, dtypes, memory readings,
and one optimizer step after another, each printed as one ``ftscale.run.logformat`` line."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

from ftscale.engines.embedded.fused_ce import FusedHead
from ftscale.run.data import global_batch, micro_batches
from ftscale.run.logformat import step_line
from ftscale.study.run import Run


@dataclass
class TrainSetup:
    """A model made ready for one track: what to train, how the ranks share the data, and the
    layout as built (read back from the model, for the log's layout line)."""

    model: torch.nn.Module
    dp_rank: int
    dp_size: int
    layout: dict
    # Context for all but the last micro-batch of a step (DDP's no_sync), if any.
    no_sync: Callable[[], ContextManager] | None = None
    # Engine option fused_ce: the model's lm_head returns hidden states and this computes the loss.
    head: FusedHead | None = None
    # compile modes with CUDA graphs (reduce-overhead, max-autotune): each micro-batch starts a new step of
    # torch's CUDA graph trees, so a graph's outputs are not overwritten while backward still needs them.
    cuda_graphs: bool = False

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            hidden = self.model(input_ids=input_ids, use_cache=False).logits
            return self.head.loss(hidden, input_ids)
        return self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def device_for(run: Run, local_rank: int) -> torch.device:
    want = run.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def dtype_for(run: Run, device: torch.device) -> torch.dtype:
    precision = run.precision
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


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank's parameters, their gradients and the optimizer state hold, summed from the
    tensors (DTensor shards counted locally; each tensor once)."""
    seen: set[int] = set()
    total = 0
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += _local_bytes(t)
    return total


def _memory(device: torch.device) -> tuple[float, float, str]:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2**20,
                torch.cuda.max_memory_reserved(device) / 2**20, "cuda")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0.0, "rss"  # ru_maxrss is in KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, run: Run, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=run.learning_rate, fused=device.type == "cuda" or None)


def step_batches(run: Run, prepared: TrainSetup, tokens: torch.Tensor, step: int) -> list[torch.Tensor]:
    """This rank's micro-batches of optimizer step ``step`` (1-based)."""
    batch = global_batch(tokens, step, run.global_batch, run.seq_length, run.seed)
    micros = micro_batches(batch, run.micro_batch, prepared.dp_rank, prepared.dp_size)
    assert len(micros) == run.grad_accum, (len(micros), run.grad_accum)
    return micros


def train_step(prepared: TrainSetup, optimizer: torch.optim.Optimizer, micros: list[torch.Tensor],
               device: torch.device) -> torch.Tensor:
    """Forward and backward of every micro-batch (gradients synchronised on the last), then the
    optimizer step; returns the sum of the micro-batch losses (gradients are left for the caller)."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for i, micro in enumerate(micros):
        sync_ctx = prepared.no_sync() if (prepared.no_sync and i < len(micros) - 1) else contextlib.nullcontext()
        if prepared.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with sync_ctx:
            loss = prepared.loss(micro.to(device))
            (loss / len(micros)).backward()
        loss_sum += loss.detach().float()
    optimizer.step()
    return loss_sum


def train(run: Run, prepared: TrainSetup, tokens: torch.Tensor, device: torch.device, out: Path) -> None:
    rank = dist.get_rank()
    model = prepared.model
    optimizer = make_optimizer(model, run, device)
    accum = run.grad_accum
    metrics = out.open("w") if rank == 0 else None
    for step in range(1, run.steps + 1):
        micros = step_batches(run, prepared, tokens, step)
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        loss_sum = train_step(prepared, optimizer, micros, device)
        _sync(device)
        elapsed = time.perf_counter() - start
        state = state_bytes(model, optimizer) / 2**20  # gradients still held: measured before zero_grad
        optimizer.zero_grad(set_to_none=True)
        peak, reserved, kind = _memory(device)
        stats = torch.tensor([elapsed, peak, reserved, state], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        mean_loss = loss_sum.item() / (accum * dist.get_world_size())
        if rank == 0:
            elapsed, peak, reserved, state = stats.tolist()
            tokens_step = run.global_batch * run.seq_length
            print(step_line(step, run.steps, mean_loss, elapsed, tokens_step, peak, reserved, kind, state),
                  flush=True)
            metrics.write(json.dumps({"step": step, "loss": mean_loss, "step_time_s": elapsed, "tokens": tokens_step,
                                      "tokens_per_s": tokens_step / elapsed, "peak_mem_mib": peak,
                                      "reserved_mib": reserved, "mem_kind": kind, "state_mib": state}) + "\n")
            metrics.flush()
    if metrics:
        metrics.close()
