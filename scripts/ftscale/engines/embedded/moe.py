"""Expert parallelism: a Mixtral sparse-MoE block split over the ranks of an EP group (and TP).

See ``ftscale.engines.embedded.model_parallel`` for the whole layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from ftscale.engines.embedded.collectives import (
    _all_gather,
    _AllGatherRows,
    _AllToAll,
    _CopyToGroup,
    _ReduceFromGroup,
    _ReduceScatterRows,
    _ScaleGrad,
)


@dataclass
class ParallelGroups:
    """This rank's tensor- and expert-parallel process groups, sizes and ranks."""

    tp: dist.ProcessGroup | None
    tp_size: int
    tp_rank: int
    ep: dist.ProcessGroup | None
    ep_size: int
    ep_rank: int


class ExpertParallelMoE(nn.Module):
    """A Mixtral sparse-MoE block holding E/ep experts, each split tp ways (see the module doc).

    Same maths as ``MixtralSparseMoeBlock`` (softmax router, top-k, renormalised weights, SiLU
    gated experts); ``gate_up_proj`` is kept as two tensors so a TP shard is a plain slice. ``grouped``:
    each projection of all local experts is one ``torch._grouped_mm`` over the rows sorted by expert; else
    one matrix multiply per expert in a Python loop.
    """

    def __init__(self, block: nn.Module, groups: ParallelGroups, sp: bool, tp_mesh: DeviceMesh | None,
                 grouped: bool = True):
        super().__init__()
        experts, router = block.experts, block.gate
        if getattr(block, "jitter_noise", 0.0):
            raise NotImplementedError("router jitter noise is not supported by the expert-parallel MoE")
        self.num_experts = experts.num_experts
        self.top_k = router.top_k
        self.act_fn = experts.act_fn
        if grouped and not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"embedded.experts = 'grouped' needs torch._grouped_mm, which torch {torch.__version__} "
                             "lacks (torch >= 2.9): use experts: loop")
        self.groups, self.sp, self.grouped = groups, sp, grouped
        ep = groups.ep_size
        self.num_local = self.num_experts // ep
        first = groups.ep_rank * self.num_local
        mine = slice(first, first + self.num_local)
        inter = experts.gate_up_proj.shape[1] // 2
        gate = experts.gate_up_proj.data[mine, :inter]
        up = experts.gate_up_proj.data[mine, inter:]
        down = experts.down_proj.data[mine]

        def param(t, placement):
            if tp_mesh is None:
                return nn.Parameter(t.clone())
            return nn.Parameter(distribute_tensor(t.contiguous(), tp_mesh, [placement], src_data_rank=None))

        self.router = param(router.weight.data, Replicate())  # [E, h]
        self.gate_proj = param(gate, Shard(1))  # [E/ep, I, h], TP-split along I
        self.up_proj = param(up, Shard(1))  # [E/ep, I, h]
        self.down_proj = param(down, Shard(2))  # [E/ep, h, I], TP-split along I
        self.probe: dict | None = None

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.gate_proj, self.up_proj, self.down_proj]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        g, k, E, L = self.groups, self.top_k, self.num_experts, self.num_local
        tp_split = g.tp_size > 1
        x3 = hidden_states.to_local() if isinstance(hidden_states, DTensor) else hidden_states
        x = x3.reshape(-1, x3.shape[-1])
        n_tok, hid = x.shape

        # Router, replicated; under SP each TP rank routes its own tokens, so its weight gradient
        # is partial over TP (reduced by the gradient sync).
        rw = self.router
        if isinstance(rw, DTensor):
            rw = rw.to_local(grad_placements=[Partial()] if self.sp else None)
        probs = F.softmax(F.linear(x, rw).float(), dim=-1)
        top_w, top_i = torch.topk(probs, k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)

        # Rows (token copies) sorted by expert.
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = x.index_select(0, order // k)
        counts = torch.bincount(flat, minlength=E)

        # EP dispatch: rows to the ranks holding their experts.
        if g.ep_size > 1:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=g.ep)
            send_splits = counts.view(g.ep_size, L).sum(1).tolist()
            recv_splits = recv_counts.view(g.ep_size, L).sum(1).tolist()
            rows = _AllToAll.apply(rows, recv_splits, send_splits, g.ep)
            seg = recv_counts.view(g.ep_size, L)
        else:
            seg = counts.view(1, L)

        # Into the expert-TP region.
        if tp_split and self.sp:
            all_seg = seg.new_empty((g.tp_size * seg.numel(),))
            _all_gather(all_seg, seg.reshape(-1).contiguous(), group=g.tp)
            tp_sizes = all_seg.view(g.tp_size, -1).sum(1).tolist()
            rows = _AllGatherRows.apply(rows, tp_sizes, g.tp_rank, g.tp)
            seg = all_seg.view(-1, L)
        elif tp_split:
            rows = _CopyToGroup.apply(rows, g.tp)

        # Group the rows by local expert and run the experts.
        expert_of_row = torch.arange(L, device=x.device).repeat(seg.shape[0]).repeat_interleave(seg.reshape(-1))
        perm = torch.argsort(expert_of_row, stable=True)
        by_expert = rows.index_select(0, perm)
        weights = []
        for p in self.expert_parameters():
            w = p.to_local() if isinstance(p, DTensor) else p
            weights.append(_ScaleGrad.apply(w, 1.0 / g.ep_size) if g.ep_size > 1 else w)
        gate, up, down = weights
        rows_per_expert = seg.sum(0)
        y = (grouped_experts(by_expert, rows_per_expert, gate, up, down, self.act_fn) if self.grouped
             else looped_experts(by_expert, rows_per_expert, gate, up, down, self.act_fn))
        y = y.index_select(0, torch.argsort(perm))

        # Out of the expert-TP region (sum the partial outputs of the TP shards).
        if tp_split and self.sp:
            y = _ReduceScatterRows.apply(y, tp_sizes, g.tp_rank, g.tp)
        elif tp_split:
            y = _ReduceFromGroup.apply(y, g.tp)
        if g.ep_size > 1:
            y = _AllToAll.apply(y, send_splits, recv_splits, g.ep)

        # Combine: weight each token's k expert outputs.
        y = y.index_select(0, torch.argsort(order)).view(n_tok, k, hid)
        out = (y.float() * top_w.unsqueeze(-1)).sum(1).to(x.dtype)
        if self.probe is not None:
            self.probe.update(tokens_routed=n_tok, rows_computed=by_expert.shape[0])
        return out.view(x3.shape)


def grouped_experts(rows: torch.Tensor, rows_per_expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor, act_fn) -> torch.Tensor:
    """The local experts on ``rows`` (sorted by expert, ``rows_per_expert[j]`` of expert j): each projection
    one grouped matrix multiply. ``gate``/``up`` are [experts, I, h], ``down`` [experts, h, I]."""
    offs = rows_per_expert.cumsum(0).to(torch.int32)
    h = (act_fn(torch._grouped_mm(rows, gate.transpose(-2, -1), offs=offs))
         * torch._grouped_mm(rows, up.transpose(-2, -1), offs=offs))
    return torch._grouped_mm(h, down.transpose(-2, -1), offs=offs)


def looped_experts(rows: torch.Tensor, rows_per_expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor, act_fn) -> torch.Tensor:
    """The same as ``grouped_experts``, one matrix multiply per expert and projection."""
    outs = []
    for j, chunk in enumerate(rows.split(rows_per_expert.tolist())):
        if chunk.shape[0]:
            outs.append(F.linear(act_fn(F.linear(chunk, gate[j])) * F.linear(chunk, up[j]), down[j]))
    return torch.cat(outs) if outs else rows.new_zeros((0, down.shape[1]))
