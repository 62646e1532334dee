"""Differentiable collectives of the model-parallel track (Megatron's f/g pairs, all-to-all, rows
of uneven size gathered and scattered over a group)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllToAll(torch.autograd.Function):
    """Rows to the ranks of ``group``: ``in_splits`` rows to each, ``out_splits`` from each."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _gather_rows(x, sizes, group):
    """Rows of every rank of ``group`` (rank i holds sizes[i]), concatenated in rank order."""
    m = max(sizes)
    if m == 0:
        return x.new_empty((0, *x.shape[1:]))
    padded = F.pad(x, (0, 0, 0, m - x.shape[0])).contiguous()
    buf = x.new_empty((len(sizes) * m, *x.shape[1:]))
    _all_gather(buf, padded, group=group)
    return torch.cat([buf[i * m : i * m + n] for i, n in enumerate(sizes)])


def _reduce_scatter_rows(x, sizes, rank, group):
    """Sum ``x`` (rows of every rank, in rank order) over ``group``; keep this rank's rows."""
    m = max(sizes)
    if m == 0:
        return x.new_empty((0, *x.shape[1:]))
    parts = x.split(sizes)
    padded = torch.cat([F.pad(p, (0, 0, 0, m - p.shape[0])) for p in parts]).contiguous()
    out = x.new_empty((m, *x.shape[1:]))
    _reduce_scatter(out, padded, group=group)
    return out[: sizes[rank]]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, rank, group)
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, *ctx.args), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, group)
        return _reduce_scatter_rows(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.args
        return _gather_rows(grad, sizes, group), None, None, None


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce backward (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward, identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None
