"""FP8 matrix multiplies for the frozen linear layers under LoRA (``embedded.fp8``), with ``torch._scaled_mm``.

A frozen weight never changes, so it is cast to float8 (e4m3) once, when the model is built, together with
its transpose for the input gradient; each step casts only the activations in forward and the output
gradient in backward, with a dynamic scale from their absolute maximum. No weight gradient is computed (the
weight is frozen), and nothing is saved for backward but the weight's float8 copies.

Scaling: ``tensorwise``, one scale per tensor; ``rowwise``, one per row of the left operand and one per
column of the right one (finer, for outliers). The adapters, the norms, attention and the LM head stay in
the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
SCALINGS = ("tensorwise", "rowwise")


def to_fp8(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) in float8 and the scale that multiplies it back: one per tensor, or one per row ([rows, 1])."""
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()
    scale = FP8_MAX / amax.float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reciprocal()


def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b_rows: torch.Tensor, b_scale: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b_rows.T`` of float8 ``a`` [m, k] and ``b_rows`` [n, k] (row-major: its transpose is the
    column-major right operand ``_scaled_mm`` wants); ``b_scale`` is per tensor or per row of ``b_rows``."""
    if b_scale.dim() == 2:
        b_scale = b_scale.reshape(1, -1)
    return torch._scaled_mm(a, b_rows.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


class _FrozenFP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, w_scale, wt8, wt_scale, rowwise):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_scale = to_fp8(x2, rowwise)
        ctx.save_for_backward(wt8, wt_scale)
        ctx.rowwise = rowwise
        return fp8_mm(xq, x_scale, w8, w_scale, x.dtype).reshape(*x.shape[:-1], w8.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        wt8, wt_scale = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gq, g_scale = to_fp8(g2, ctx.rowwise)
        grad_input = fp8_mm(gq, g_scale, wt8, wt_scale, grad.dtype).reshape(*grad.shape[:-1], wt8.shape[0])
        return grad_input, None, None, None, None, None


class FrozenFP8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight multiplies in float8 (peft still wraps it as a Linear)."""

    def __init__(self, linear: nn.Linear, scaling: str) -> None:
        if scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling must be one of {list(SCALINGS)}, not {scaling!r}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        self.rowwise = scaling == "rowwise"
        with torch.no_grad():
            w8, w_scale = to_fp8(self.weight.detach(), self.rowwise)
            wt8, wt_scale = to_fp8(self.weight.detach().t().contiguous(), self.rowwise)
        for name, value in (("w8", w8), ("w_scale", w_scale), ("wt8", wt8), ("wt_scale", wt_scale)):
            self.register_buffer(name, value, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenFP8Matmul.apply(x, self.w8, self.w_scale, self.wt8, self.wt_scale, self.rowwise)
        return out if self.bias is None else out + self.bias


def convert_frozen_linears(model: nn.Module, scaling: str, names: tuple[str, ...]) -> int:
    """Swap every ``nn.Linear`` whose name ends in one of ``names`` (the decoder layers' projections) for a
    ``FrozenFP8Linear``, in place, before peft wraps them; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name in names:
                setattr(parent, child_name, FrozenFP8Linear(child, scaling))
                swapped += 1
    if not swapped:
        raise ValueError(f"embedded.fp8: the model has no linear layer named {list(names)}")
    return swapped
