"""Tensor (+ sequence) parallelism: a torchtitan-style plan for PyTorch's ``parallelize_module``."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from ftscale.engines.embedded.moe import ExpertParallelMoE


class _ReplicateParallel(ParallelStyle):
    """Weights as replicated DTensors, plain tensors in and out (norms under TP without SP)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def inputs(_mod, args, mesh):
            return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                         if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

        def outputs(_mod, out, _mesh):
            return out.to_local() if isinstance(out, DTensor) else out

        return distribute_module(module, device_mesh, None, inputs, outputs)


def tp_plan(model: nn.Module, sp: bool) -> dict[str, ParallelStyle]:
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
