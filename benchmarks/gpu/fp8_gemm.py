"""The frozen linear layer's forward + input gradient in bf16 against embedded.fp8 (tensorwise, rowwise), at
LLaMA 3.1 8B's projection shapes, on one GPU; prints the time of each and the ratio, and the relative error
against bf16. Eager and torch.compile'd. Run on the lent machine:
    PYTHONPATH=scripts python3 benchmarks/gpu/fp8_gemm.py [--tokens 8192]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ftscale.engines.embedded.fp8 import FrozenFP8Linear

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}


def _time(fn, x: torch.Tensor, repeat: int = 20) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def _step(layer: nn.Module, compiled: bool, grad: torch.Tensor):
    """forward and the input gradient of ``layer`` (compiled or eager), for a given output gradient"""
    body = torch.compile(layer) if compiled else layer

    def run(inp: torch.Tensor):
        out = body(inp)
        (g,) = torch.autograd.grad(out, inp, grad)
        return out, g
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "tokens", args.tokens)
    print(f"{'layer':10} {'mode':8} {'bf16 ms':>8} {'tw ms':>8} {'rw ms':>8} {'tw x':>6} {'rw x':>6} {'tw err':>7} {'rw err':>7}")
    for name, (k, n) in SHAPES.items():
        linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layers = {"bf16": linear, "tw": FrozenFP8Linear(linear, "tensorwise"), "rw": FrozenFP8Linear(linear, "rowwise")}
        grad = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        for mode in ("eager", "compile"):
            runs = {key: _step(layer, mode == "compile", grad) for key, layer in layers.items()}
            times = {key: _time(run, x) for key, run in runs.items()}
            ref_out, ref_g = runs["bf16"](x)
            err = {}
            for key in ("tw", "rw"):
                out, g = runs[key](x)
                err[key] = max(((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item(),
                               ((g.float() - ref_g.float()).norm() / ref_g.float().norm()).item())
            print(f"{name:10} {mode:8} {times['bf16']:8.3f} {times['tw']:8.3f} {times['rw']:8.3f} "
                  f"{times['bf16'] / times['tw']:6.2f} {times['bf16'] / times['rw']:6.2f} {err['tw']:7.4f} {err['rw']:7.4f}")


if __name__ == "__main__":
    main()
