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

``TrainSetup.layout`` is read back from the split model and a probe forward, never copied from run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from ftscale.engines.embedded.grad_sync import GradSync
from ftscale.engines.embedded.moe import ExpertParallelMoE, ParallelGroups
from ftscale.engines.embedded.tensor_parallel import tp_plan
from ftscale.engines.embedded.training import TrainSetup, count_params
from ftscale.study.layout import Layout
from ftscale.study.run import Run


@dataclass
class ModelParallelSetup(TrainSetup):
    """A model split tp x ep x dp; its loss registers the gradient sync of the last micro-batch."""

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
        eps = {m.groups.ep_size for m in moes}
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


def check_model(model: nn.Module, layout: Layout, world: int, seq_length: int) -> None:
    """The layout's rules (``Layout.errors``) on the model's own config, and what this implementation
    of them needs of a Hugging Face model. Raises ValueError naming every problem."""
    cfg = model.config
    errs = []
    if layout.world_size != world:
        errs.append(f"tp {layout.tp} x ep {layout.ep} x dp {layout.dp} != world size {world}")
    errs += layout.errors(cfg.to_dict(), seq_length)
    if getattr(cfg, "num_local_experts", None) and getattr(cfg, "output_router_logits", False):
        errs.append("the router's load-balancing loss (output_router_logits) is not supported")
    if layout.tp > 1 and getattr(cfg, "tie_word_embeddings", False):
        errs.append("tied input/output embeddings are not supported with tp > 1")
    if layout.tp > 1 and cfg._attn_implementation != "sdpa":
        errs.append(f"tensor parallelism needs attn_implementation='sdpa', not {cfg._attn_implementation!r}")
    if not hasattr(getattr(model, "model", None), "layers"):
        errs.append(f"{type(model).__name__} is not a Llama-family causal LM (model.layers)")
    if errs:
        raise ValueError("model-parallel layout: " + "; ".join(errs))


def prepare_model_parallel(model: nn.Module, run: Run, device: torch.device,
                           grouped_experts: bool = True) -> ModelParallelSetup:
    layout = run.layout
    tp, ep, dp, sp = layout.tp, layout.ep, layout.dp, layout.sp
    world = dist.get_world_size()
    check_model(model, layout, world, int(run.seq_length))
    model = model.to(device)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)

    mesh = init_device_mesh(device.type, (dp, ep, tp), mesh_dim_names=("dp", "ep", "tp"))
    d, e, t = mesh.get_coordinate()
    tp_mesh = mesh["tp"] if tp > 1 else None
    groups = ParallelGroups(tp=mesh.get_group("tp"), tp_size=tp, tp_rank=t, ep=mesh.get_group("ep"), ep_size=ep, ep_rank=e)
    # Ranks with the same TP index hold the same dense shard: they average dense gradients.
    dense_group = None
    for i in range(tp):
        g = dist.new_group([r for r in range(world) if r % tp == i])
        if i == t:
            dense_group = g

    expert_ids: set[int] = set()
    if getattr(model.config, "num_local_experts", None):
        for layer in model.model.layers:
            layer.mlp = ExpertParallelMoE(layer.mlp, groups, sp and tp > 1, tp_mesh, grouped_experts).to(device)
            expert_ids.update(id(p) for p in layer.mlp.expert_parameters())
    if tp > 1:
        parallelize_module(model, tp_mesh, tp_plan(model, sp))

    params = [p for p in model.parameters() if p.requires_grad]
    sync = GradSync(params, expert_ids, dense_group, ep * dp, mesh.get_group("dp"), dp)
    built = read_layout(model, sync, int(run.seq_length), device)
    return ModelParallelSetup(model=model, dp_rank=d * ep + e, dp_size=dp * ep, layout=built,
                              no_sync=sync.no_sync, sync=sync)
