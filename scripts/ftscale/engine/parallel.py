"""The model-parallel track of the embedded engine: full fine-tuning split tp x ep x dp.

``prepare_model_parallel(model, run, device)`` takes a Hugging Face Llama-family model (Llama, or
Mixtral for experts) loaded whole on every rank and splits it, Megatron style, over a device mesh
``(dp, ep, tp)`` of world = tp*ep*dp ranks (tp innermost, so a TP group is adjacent ranks):

- TP (+ SP): PyTorch's own ``torch.distributed.tensor.parallel.parallelize_module`` with a
  torchtitan-style plan. Vocab-parallel embedding and lm_head, column-parallel q/k/v/gate/up,
  row-parallel o/down. With SP, norms run on sequence shards (``SequenceParallel``) and the
  all-reduces become all-gather + reduce-scatter pairs. Without SP, norms hold replicated DTensor
  weights, so with tp > 1 every parameter is a DTensor (fused/foreach AdamW refuse a mix).
- EP (Mixtral): each MoE block is replaced by ``ExpertParallelMoE``: the router is replicated; this
  rank keeps experts [e*E/ep, (e+1)*E/ep) and exchanges the routed tokens with the other ranks of
  its EP group by a differentiable all-to-all (there and back). With tp > 1 the experts are also
  tensor-parallel (expert-TP = tp, as in ``ftscale.comm``): gate/up split along the intermediate
  dim, down along its input; with SP a rank routes only its sequence shard, the rows it receives
  are all-gathered over TP before the experts and reduce-scattered after; without SP every TP rank
  routes all tokens and the expert outputs are all-reduced over TP.
- DP: the ep*dp replicas of the dense part each get their own micro-batches; at the end of the
  backward of the last micro-batch of a step (``no_sync`` holds off the others, as DDP does)
  dense gradients are averaged over the ep*dp ranks of the same TP index, expert gradients over the
  dp ranks holding the same experts (their backward already summed the ep replicas' tokens, and a
  1/ep gradient scale makes that a mean). TP partial gradients (norms and router under SP) are
  reduced first. The result equals single-process training on the same global batch.

``Prepared.layout`` is read back from the split model and a probe forward, never copied from run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from ftscale.engine.embedded import Prepared, count_params

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------- differentiable collectives


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


# --------------------------------------------------------------------------- expert parallel MoE


@dataclass
class _Groups:
    tp: dist.ProcessGroup | None
    tp_size: int
    tp_rank: int
    ep: dist.ProcessGroup | None
    ep_size: int
    ep_rank: int


class ExpertParallelMoE(nn.Module):
    """A Mixtral sparse-MoE block holding E/ep experts, each split tp ways (see the module doc).

    Same maths as ``MixtralSparseMoeBlock`` (softmax router, top-k, renormalised weights, SiLU
    gated experts); ``gate_up_proj`` is kept as two tensors so a TP shard is a plain slice.
    """

    def __init__(self, block: nn.Module, groups: _Groups, sp: bool, tp_mesh: DeviceMesh | None):
        super().__init__()
        experts, router = block.experts, block.gate
        if getattr(block, "jitter_noise", 0.0):
            raise NotImplementedError("router jitter noise is not supported by the expert-parallel MoE")
        self.num_experts = experts.num_experts
        self.top_k = router.top_k
        self.act_fn = experts.act_fn
        self.g, self.sp = groups, sp
        ep, tp = groups.ep_size, groups.tp_size
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
        g, k, E, L = self.g, self.top_k, self.num_experts, self.num_local
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
        grouped = rows.index_select(0, perm)
        weights = []
        for p in self.expert_parameters():
            w = p.to_local() if isinstance(p, DTensor) else p
            weights.append(_ScaleGrad.apply(w, 1.0 / g.ep_size) if g.ep_size > 1 else w)
        gate, up, down = weights
        outs = []
        for j, chunk in enumerate(grouped.split(seg.sum(0).tolist())):
            if chunk.shape[0]:
                h = self.act_fn(F.linear(chunk, gate[j])) * F.linear(chunk, up[j])
                outs.append(F.linear(h, down[j]))
        y = torch.cat(outs) if outs else grouped.new_zeros((0, hid))
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
            self.probe.update(tokens_routed=n_tok, rows_computed=grouped.shape[0])
        return out.view(x3.shape)


# --------------------------------------------------------------------------- tensor (+ sequence) parallel plan


class _ReplicateParallel(ParallelStyle):
    """Weights as replicated DTensors, plain tensors in and out (norms under TP without SP)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def inputs(_mod, args, mesh):
            return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                         if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

        def outputs(_mod, out, _mesh):
            return out.to_local() if isinstance(out, DTensor) else out

        return distribute_module(module, device_mesh, None, inputs, outputs)


def _tp_plan(model: nn.Module, sp: bool) -> dict[str, ParallelStyle]:
    out_layout = Shard(1) if sp else Replicate()
    norm = SequenceParallel if sp else _ReplicateParallel
    plan: dict[str, ParallelStyle] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=out_layout),
        "model.norm": SequenceParallel(use_local_output=True) if sp else _ReplicateParallel(),
        "lm_head": ColwiseParallel(input_layouts=out_layout, output_layouts=Replicate()),
    }
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        plan[f"{p}.input_layernorm"] = norm()
        plan[f"{p}.post_attention_layernorm"] = norm()
        if sp:
            plan[f"{p}.self_attn"] = PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                        desired_input_kwarg_layouts={"hidden_states": Replicate()})
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"{p}.self_attn.{name}"] = ColwiseParallel()
        plan[f"{p}.self_attn.o_proj"] = RowwiseParallel(output_layouts=out_layout)
        if not isinstance(layer.mlp, ExpertParallelMoE):
            if sp:
                plan[f"{p}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan[f"{p}.mlp.gate_proj"] = ColwiseParallel()
            plan[f"{p}.mlp.up_proj"] = ColwiseParallel()
            plan[f"{p}.mlp.down_proj"] = RowwiseParallel(output_layouts=out_layout)
    return plan


# --------------------------------------------------------------------------- gradient sync (data parallel)


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


@dataclass
class ModelParallelPrepared(Prepared):
    sync: GradSync | None = None

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Explicit positions: under SP the model sees only a sequence shard after the embedding.
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        loss = self.model(input_ids=input_ids, labels=input_ids, position_ids=pos, use_cache=False).loss
        if self.sync is not None and loss.requires_grad:
            loss.register_hook(self.sync.hook)
        return loss


# --------------------------------------------------------------------------- layout read-back


def _probe(model: nn.Module, seq_length: int, device: torch.device) -> dict:
    """One forward on a dummy sequence, recording what the split model really did."""
    layer = model.model.layers[0]
    seen: dict = {}

    def norm_hook(_mod, _args, out):
        seen["norm_out"] = out

    def q_hook(_mod, _args, out):
        seen["q_out"] = out.to_local() if isinstance(out, DTensor) else out

    handles = [layer.input_layernorm.register_forward_hook(norm_hook),
               layer.self_attn.q_proj.register_forward_hook(q_hook)]
    moe = layer.mlp if isinstance(layer.mlp, ExpertParallelMoE) else None
    if moe is not None:
        moe.probe = {}
    try:
        with torch.no_grad():
            ids = torch.zeros((1, seq_length), dtype=torch.long, device=device)
            pos = torch.arange(seq_length, device=device).unsqueeze(0)
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    norm_out = seen["norm_out"]
    local = norm_out.to_local() if isinstance(norm_out, DTensor) else norm_out
    sharded = isinstance(norm_out, DTensor) and any(pl.is_shard(1) for pl in norm_out.placements)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = {"seq_local": local.shape[1], "sp": int(sharded and local.shape[1] < seq_length),
           "tp_heads": cfg.num_attention_heads * head_dim // seen["q_out"].shape[-1],
           "logits_ok": bool(torch.isfinite(logits).all()) and logits.shape[-1] == cfg.vocab_size}
    if moe is not None:
        out.update(moe.probe)
        moe.probe = None
    return out


def read_layout(model: nn.Module, sync: GradSync, seq_length: int, device: torch.device) -> dict:
    """The layout as built: TP degree from the DTensor shards, EP from the MoE modules, DP from the
    gradient-sync groups, SP from a probe forward; cross-checked against each other."""
    world = dist.get_world_size()
    tp_sizes = {p.device_mesh.size(i) for p in model.parameters() if isinstance(p, DTensor)
                for i, pl in enumerate(p.placements) if pl.is_shard()}
    if len(tp_sizes) > 1:
        raise RuntimeError(f"parameters sharded over meshes of different sizes {sorted(tp_sizes)}")
    tp = tp_sizes.pop() if tp_sizes else 1
    moes = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    ep, experts_per_rank = 1, None
    if moes:
        eps = {m.g.ep_size for m in moes}
        local = {m.gate_proj.to_local().shape[0] if isinstance(m.gate_proj, DTensor) else m.gate_proj.shape[0]
                 for m in moes}
        if len(eps) != 1 or len(local) != 1:
            raise RuntimeError(f"MoE layers disagree: ep sizes {eps}, experts per rank {local}")
        ep, experts_per_rank = eps.pop(), local.pop()
        if experts_per_rank * ep != moes[0].num_experts:
            raise RuntimeError(f"{experts_per_rank} experts per rank x ep {ep} != {moes[0].num_experts} experts")
    dense_size, expert_size = (size for _, size, _ in sync.buckets)
    dp = dense_size // ep
    if tp * ep * dp != world or (moes and expert_size != dp):
        raise RuntimeError(f"layout does not add up: tp {tp} x ep {ep} x dp {dp} (expert replicas {expert_size}) "
                           f"on {world} ranks")
    probe = _probe(model, seq_length, device)
    if probe["tp_heads"] != tp or not probe["logits_ok"]:
        raise RuntimeError(f"probe forward disagrees with the shards: {probe} (tp {tp})")
    if probe["sp"] and probe["seq_local"] * tp != seq_length:
        raise RuntimeError(f"sequence shard of {probe['seq_local']} tokens for tp {tp} and sequence {seq_length}")
    held, trainable = count_params(model)
    layout = {"world": world, "tp": tp, "ep": ep, "dp": dp, "sp": probe["sp"],
              "params_per_rank": held, "trainable_per_rank": trainable}
    if moes:
        layout["experts_per_rank"] = experts_per_rank
    return layout


# --------------------------------------------------------------------------- entry point


def _check(model: nn.Module, tp: int, ep: int, dp: int, sp: bool, world: int, seq_length: int) -> None:
    cfg = model.config
    errs = []
    if min(tp, ep, dp) < 1 or tp * ep * dp != world:
        errs.append(f"tp {tp} x ep {ep} x dp {dp} != world size {world}")
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(cfg, key) % tp:
            errs.append(f"tp {tp} must divide {key} ({getattr(cfg, key)})")
    experts = getattr(cfg, "num_local_experts", None)
    if ep > 1 and not experts:
        errs.append(f"ep {ep} needs a mixture-of-experts model, {type(model).__name__} has no experts")
    if experts and experts % ep:
        errs.append(f"ep {ep} must divide the number of experts ({experts})")
    if experts and getattr(cfg, "output_router_logits", False):
        errs.append("the router's load-balancing loss (output_router_logits) is not supported")
    if sp and tp < 2:
        errs.append("sequence parallelism needs tp > 1")
    if sp and seq_length % tp:
        errs.append(f"tp {tp} must divide the sequence length ({seq_length}) under sequence parallelism")
    if tp > 1 and getattr(cfg, "tie_word_embeddings", False):
        errs.append("tied input/output embeddings are not supported with tp > 1")
    if tp > 1 and cfg._attn_implementation != "sdpa":
        errs.append(f"tensor parallelism needs attn_implementation='sdpa', not {cfg._attn_implementation!r}")
    if not hasattr(getattr(model, "model", None), "layers"):
        errs.append(f"{type(model).__name__} is not a Llama-family causal LM (model.layers)")
    if errs:
        raise ValueError("model-parallel layout: " + "; ".join(errs))


def prepare_model_parallel(model: nn.Module, run: dict, device: torch.device) -> Prepared:
    tp, ep, dp, sp = int(run.get("tp", 1)), int(run.get("ep", 1)), int(run.get("dp", 1)), bool(run.get("sp"))
    world, rank = dist.get_world_size(), dist.get_rank()
    _check(model, tp, ep, dp, sp, world, int(run["seq_length"]))
    model = model.to(device)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)

    mesh = init_device_mesh(device.type, (dp, ep, tp), mesh_dim_names=("dp", "ep", "tp"))
    d, e, t = mesh.get_coordinate()
    tp_mesh = mesh["tp"] if tp > 1 else None
    groups = _Groups(tp=mesh.get_group("tp"), tp_size=tp, tp_rank=t, ep=mesh.get_group("ep"), ep_size=ep, ep_rank=e)
    # Ranks with the same TP index hold the same dense shard: they average dense gradients.
    dense_group = None
    for i in range(tp):
        g = dist.new_group([r for r in range(world) if r % tp == i])
        if i == t:
            dense_group = g

    expert_ids: set[int] = set()
    if getattr(model.config, "num_local_experts", None):
        for layer in model.model.layers:
            layer.mlp = ExpertParallelMoE(layer.mlp, groups, sp and tp > 1, tp_mesh).to(device)
            expert_ids.update(id(p) for p in layer.mlp.expert_parameters())
    if tp > 1:
        parallelize_module(model, tp_mesh, _tp_plan(model, sp))

    params = [p for p in model.parameters() if p.requires_grad]
    sync = GradSync(params, expert_ids, dense_group, ep * dp, mesh.get_group("dp"), dp)
    layout = read_layout(model, sync, int(run["seq_length"]), device)
    return ModelParallelPrepared(model=model, dp_rank=d * ep + e, dp_size=dp * ep, layout=layout,
                                 no_sync=sync.no_sync, extra={"mesh": mesh, "rank": rank}, sync=sync)
