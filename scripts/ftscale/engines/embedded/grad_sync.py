"""Gradient averaging over the data-parallel replicas of the model-parallel track."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


class GradSync:
    """Averages gradients over the data-parallel replicas once a step, at the end of the backward
    of the last micro-batch (the engine enters ``no_sync`` for the others)."""

    def __init__(self, params: list[nn.Parameter], expert_ids: set[int], dense_group, dense_size: int,
                 expert_group, expert_size: int):
        self.params = params
        self.buckets = [(g, n, [p for p in params if (id(p) in expert_ids) == is_expert])
                        for g, n, is_expert in ((dense_group, dense_size, False), (expert_group, expert_size, True))]
        self.enabled = True
        self.syncs = 0

    @contextlib.contextmanager
    def no_sync(self):
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def hook(self, grad: torch.Tensor) -> None:
        """Grad hook on the loss: schedules the sync for the end of this backward."""
        if self.enabled:
            torch.autograd.Variable._execution_engine.queue_callback(self.sync)

    @torch.no_grad()
    def sync(self) -> None:
        for p in self.params:
            if p.grad is None:  # e.g. an expert that got no token: the reference's gradient is 0
                p.grad = torch.zeros_like(p)
            elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)  # TP partial sums
        for group, size, params in self.buckets:
            if size == 1 or not params:
                continue
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for p in params:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                by_dtype.setdefault(g.dtype, []).append(g)
            for grads in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=group)
                flat /= size
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        self.syncs += 1
