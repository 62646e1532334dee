"""Where one training step of the embedded engine spends its time, by kernel family.

Builds the engine's model for one run of a config exactly as the engine does (``embedded.build``: the
config's ``embedded:`` options applied), runs warm-up steps, then one step under torch.profiler, and
prints time by family (GEMM, attention, norm/elementwise, cross-entropy/softmax, optimizer, memcpy,
communication, other) and the top kernels. On a GPU it counts CUDA kernel time; on a CPU (tiny models,
tests) the self time of the aten operators. One process (a 1-GPU run of the data_parallel track).

    PYTHONPATH=scripts python3 benchmarks/gpu/profile_step.py benchmarks/gpu/llama8b_lora.yaml \\
        --set option_sets=[compile] --micro-batch 2 [--warmup 3] [--trace trace.json]

A config whose ``embedded:`` lists option sets profiles the first run that matches: select the set with
``--set option_sets=[NAME]`` (or ``--run`` with a part of the run's name); ``--set embedded.KEY=VALUE``
changes an option where the section is one mapping.

Run from the workflow's root (the config's models are imported there if they are not yet).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
import time
from pathlib import Path

#: Kernel (or CPU operator) name -> family: the first pattern that matches (case-insensitive) wins.
FAMILIES: list[tuple[str, str]] = [
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|c10d|gloo|broadcast"),
    ("memcpy", r"memcpy|memset|aten::copy_|aten::_to_copy|aten::to\b|aten::contiguous|aten::clone"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
    ("cross-entropy/softmax", r"cross_?entropy|nll_loss|log_?softmax|softmax|logsumexp|liger.*(ce|entropy)"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|mha"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_.*(tn|nt|nn|tt)|aten::(mm|addmm|bmm|matmul|linear|baddbmm)\b"
             r"|triton_tem|splitk|s\d+gemm|wgmma"),
    ("norm/elementwise", r"norm|rms|elementwise|vectorized|reduce|triton_|silu|swiglu|rope|rotary|aten::(mul|add|"
                         r"sub|div|pow|rsqrt|mean|cat|neg|exp|silu|fill_|where|embedding|sum|index|gather|scatter)"),
]
_COMPILED = [(family, re.compile(pattern, re.IGNORECASE)) for family, pattern in FAMILIES]
FAMILY_ORDER = [f for f, _ in FAMILIES] + ["other"]
#: Profiler rows that are wrappers around their children's time, not work of their own (DDP's forward is a GPU-side
#: annotation spanning its kernels).
WRAPPERS = re.compile(r"^(ProfilerStep|## |autograd::|Optimizer\.|cudaDeviceSynchronize|aten::empty"
                      r"|DistributedDataParallel\.)", re.I)


def kernel_family(name: str) -> str:
    for family, pattern in _COMPILED:
        if pattern.search(name):
            return family
    return "other"


def by_family(kernels: list[tuple[str, float, int]]) -> dict[str, tuple[float, int]]:
    """(name, time us, calls) rows -> family -> (time us, calls), every family present."""
    out = {f: (0.0, 0) for f in FAMILY_ORDER}
    for name, us, calls in kernels:
        t, n = out[kernel_family(name)]
        out[kernel_family(name)] = (t + us, n + calls)
    return out


def family_table(kernels: list[tuple[str, float, int]], top: int = 15) -> str:
    """The families as a Markdown table (time, share, calls), then the ``top`` kernels by time."""
    fam = by_family(kernels)
    total = sum(t for t, _ in fam.values()) or 1.0
    lines = ["| family | time (ms) | share | calls |", "|---|---:|---:|---:|"]
    lines += [f"| {f} | {t / 1e3:,.2f} | {t / total:.1%} | {n:,} |" for f, (t, n) in fam.items()]
    lines += [f"| total | {total / 1e3:,.2f} | 100.0% | {sum(n for _, n in fam.values()):,} |", "",
              f"Top {top} by time:", "", "| time (ms) | share | calls | family | kernel |", "|---:|---:|---:|---|---|"]
    for name, us, calls in sorted(kernels, key=lambda k: -k[1])[:top]:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| {us / 1e3:,.2f} | {us / total:.1%} | {calls:,} | {kernel_family(name)} | "
                     f"`{short.replace('|', '/')}` |")
    return "\n".join(lines)


def profiled_kernels(prof, device_type: str) -> list[tuple[str, float, int]]:
    """(name, self time us, calls) of the CUDA kernels (GPU) or the CPU operators (CPU) of a profile."""
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if device_type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue  # CPU-side rows also carry their kernels' time: count each kernel once
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0 and not WRAPPERS.search(e.key):
            rows.append((e.key, float(us), int(e.count)))
    return rows


def _pick_run(study, micro_batch: int | None, name: str | None):
    runs = [r for r in study.runs if r.engine == "embedded" and r.gpus == 1 and r.track == "data_parallel"]
    if micro_batch is not None:
        runs = [r for r in runs if r.micro_batch == micro_batch]
    if name:
        runs = [r for r in runs if name in r.name]
    if not runs:
        raise SystemExit("no 1-GPU embedded data_parallel run of the config matches "
                         f"(micro batch {micro_batch}, name {name!r}); runs: {[r.name for r in study.runs]}")
    return runs[0]


def _set(config: dict, assignments: list[str]) -> dict:
    """--set embedded.fused_ce=chunked: a config key changed from the command line (YAML value)."""
    import yaml

    for item in assignments:
        key, _, value = item.partition("=")
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--run", help="a part of the run's name")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled one (compile, autotune)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="override the config's device")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace", help="also write a Chrome trace of the profiled step here")
    parser.add_argument("--memory-snapshot", help="CUDA only: also record the allocations of the last warm-up step and "
                                                  "the profiled one and write the allocator's snapshot (pickle) here, "
                                                  "for torch.cuda._memory_viz or benchmarks/gpu/memory_at_peak.py")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from ftscale.engines.embedded.options import attention_context
    from ftscale.engines.embedded.train import build
    from ftscale.engines.embedded.training import device_for, make_optimizer, step_batches, train_step
    from ftscale.importing.checkpoint import import_model
    from ftscale.study.sweep import load_config_file, load_study

    config = _set(load_config_file(args.config), args.set + ([f"device={args.device}"] if args.device else []))
    study = load_study(config, source=args.config)
    run = _pick_run(study, args.micro_batch, args.run)
    if not (Path(run.checkpoint) / "config.json").is_file():
        import_model(study.models[run.model], Path(run.checkpoint))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = device_for(run, 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        torch.manual_seed(run.seed)
        prepared, tokens, options, dtype = build(run, device)
        optimizer = make_optimizer(prepared.model, run, device)
        print(f"run {run.name} ({args.config}); device {device.type}"
              + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
              + f"; dtype {str(dtype).removeprefix('torch.')}; options "
              + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(options).items()), flush=True)

        def one_step(step: int) -> float:
            micros = step_batches(run, prepared, tokens, step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = train_step(prepared, optimizer, micros, device)
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(f"step {step}: {time.perf_counter() - start:.3f} s, loss {loss.item() / len(micros):.4f}", flush=True)
            return time.perf_counter() - start

        with attention_context(options.attention):
            for step in range(1, args.warmup + 1):
                if args.memory_snapshot and step == args.warmup and device.type == "cuda":
                    torch.cuda.memory._record_memory_history(max_entries=200_000)
                one_step(step)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                wall = one_step(args.warmup + 1)
        tokens_step = run.tokens_per_step
        print(f"\nprofiled step: {wall:.3f} s wall (under the profiler), {tokens_step / wall:,.0f} tokens/s; "
              f"time by {'CUDA kernel' if device.type == 'cuda' else 'CPU operator (self time)'}:\n")
        print(family_table(profiled_kernels(prof, device.type), args.top), flush=True)
        if device.type == "cuda":
            print(f"\npeak memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB")
        if args.trace:
            prof.export_chrome_trace(args.trace)
        if args.memory_snapshot and device.type == "cuda":
            torch.cuda.memory._dump_snapshot(args.memory_snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
