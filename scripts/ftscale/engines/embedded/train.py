"""The embedded engine: a real fine-tuning loop on PyTorch + transformers + peft.

One process per GPU (or per CPU "GPU" with gloo), each with torchrun's environment (RANK, WORLD_SIZE, ...),
started by ``ftscale.run.launch`` (``ftscale.run.ranks`` on one node) as torchrun would start it:

    torchrun --standalone --nproc-per-node N -m ftscale.engines.embedded.train RUN_DIR/run.json

The data-parallel track trains LoRA adapters under DistributedDataParallel; the model-parallel
track fully fine-tunes a model split by ``ftscale.engines.embedded.model_parallel``. The config's
``embedded:`` options (``ftscale.engines.embedded.options``) are applied as the model is built and named on
the layout line. Every step prints one line in
the format of ``ftscale.run.logformat`` and appends a record to RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ftscale.engines.base import HF_LINEAR
from ftscale.engines.embedded.data_parallel import prepare_data_parallel
from ftscale.engines.embedded.fp8 import convert_frozen_linears
from ftscale.engines.embedded.fused_ce import install as install_fused_head
from ftscale.engines.embedded.model_parallel import prepare_model_parallel
from ftscale.engines.embedded.options import (
    apply_experts,
    apply_liger_kernels,
    attention_context,
    compile_model,
    layout_fields,
    resolve,
)
from ftscale.engines.embedded.spec import CUDA_GRAPH_MODES, EmbeddedOptions
from ftscale.engines.embedded.training import TrainSetup, device_for, dtype_for, train
from ftscale.importing.checkpoint import load_for_training
from ftscale.run.data import dataset_tokens
from ftscale.run.logformat import kv_line
from ftscale.run.outcome import reported
from ftscale.study.paths import RunPaths
from ftscale.study.run import Run


def build(run: Run, device: torch.device) -> tuple[TrainSetup, torch.Tensor, EmbeddedOptions, torch.dtype]:
    """The run's model made ready to train on ``device`` with its options applied, its token stream, the
    options (every one present) and the dtype. Needs the process group (DDP, model parallelism)."""
    from transformers import AutoTokenizer

    options = resolve(run, device)  # refuses an option this device cannot honour, before any work
    dtype = dtype_for(run, device)
    # Synthetic at-load weights are made on the GPU; with model parallelism every rank builds the
    # same full model on the CPU first and keeps its shards.
    where = device if (device.type == "cuda" and run.track == "data_parallel") else torch.device("cpu")
    model = load_for_training(run.checkpoint, dtype, where)
    if run.track == "data_parallel":
        apply_experts(model, options.experts)  # the model_parallel track's own MoE block takes it below
    if options.liger_kernels:
        apply_liger_kernels(model)
    if options.fp8 != "off":
        convert_frozen_linears(model, options.fp8, HF_LINEAR)
    if options.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = (install_fused_head(model, options.fused_ce, compiled=options.compile)
            if options.fused_ce != "off" else None)
    tokens = dataset_tokens(run, AutoTokenizer.from_pretrained(run.checkpoint), model.config.vocab_size)
    if run.track == "data_parallel":
        prepared = prepare_data_parallel(model, run, device, options.lora_dtype, broadcast_buffers=options.fp8 == "off")
    else:
        prepared = prepare_model_parallel(model, run, device, grouped_experts=options.experts == "grouped")
    prepared.head = head
    if options.compile:
        compiled = compile_model(prepared.model, options.compile_mode, options.compile_scope)
        prepared.cuda_graphs = options.compile_mode in CUDA_GRAPH_MODES
        if dist.get_rank() == 0:
            print(f"[ftscale] torch.compile: {compiled} module(s), scope {options.compile_scope}, "
                  f"mode {options.compile_mode}", flush=True)
    return prepared, tokens, options, dtype


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun ... -m ftscale.engines.embedded.train RUN_DIR/run.json", file=sys.stderr)
        return 2
    run_json = Path(argv[0])
    run = Run.load(run_json)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = device_for(run, local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def job() -> None:
        if world != run.gpus:
            raise RuntimeError(f"launched with {world} processes but the run asks for {run.gpus} GPUs")
        if device.type == "cpu":
            # The launcher sets FTSCALE_THREADS_PER_RANK from the job's CPUs (torchrun's own default is 1).
            per_rank = os.environ.get("FTSCALE_THREADS_PER_RANK")
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(int(per_rank) if per_rank else max(1, (os.cpu_count() or 1) // local))
        torch.manual_seed(run.seed)
        prepared, tokens, options, dtype = build(run, device)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        # The node of each rank (Slurm's name for it where srun started the rank): the layout line says where
        # the run ran, so a run across nodes shows that it did.
        node_names: list[str] = [""] * world
        dist.all_gather_object(node_names, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
        if rank == 0:
            print(kv_line("layout", **prepared.layout, device=device.type, device_name=device_name.replace(" ", "_"),
                          dtype=str(dtype).removeprefix("torch."), nodes=len(set(node_names)),
                          node_names=",".join(sorted(set(node_names))), **layout_fields(options)), flush=True)
        with attention_context(options.attention):
            train(run, prepared, tokens, device, RunPaths(run_json.parent).metrics)

    code = reported(job, rank, run.steps)
    if code == 0:
        dist.destroy_process_group()
    # Everything is measured and written. The interpreter's last garbage collections would now walk every object
    # torch and transformers made, most of a small CPU run's teardown: frozen objects are not walked; exit
    # handlers and finalization still run.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
