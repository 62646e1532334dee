"""The model-parallel track (ftscale.engines.embedded.model_parallel) against single-process training, on CPU (gloo).

Every layout runs the product end to end: ``ftscale.engines.embedded.train.main`` on a run.json written
from ``ftscale.study.run.Run`` (load, split, read the layout back, train 3 steps, write metrics.jsonl),
one forked process per rank. The reference is the unsplit Hugging Face model trained by the same
``embedded.train`` loop in one process on the same global batches. fp32: per-step losses and the
step-1 gradients the optimizer sees (full tensors, gathered over TP and EP) agree to 1e-4 (relative
for gradients; ~1e-6 is typical). Gradients are needed: AdamW is blind to a gradient's scale.

Launcher: ranks are forked from this process (imports paid once; torchrun would pay ~5 s per job).
Each rank ends with ``os._exit`` (a forked rank that returns normally can hang in teardown) and
runs one intra-op thread: a forked child must not start an OpenMP pool its parent already used.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from runs import make_run

from ftscale.analyze.parse import parse_steps
from ftscale.engines.embedded import train as embedded
from ftscale.engines.embedded import training
from ftscale.engines.embedded.model_parallel import check_model
from ftscale.estimate.comm import params_per_gpu, trainable_params_per_gpu
from ftscale.importing.checkpoint import import_model
from ftscale.study.layout import Layout
from ftscale.study.models import load_model
from ftscale.study.run import Run

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")

BATCH = dict(micro_batch=1, global_batch=4, seq_length=32, steps=3)
LR = 1e-2  # large enough that a wrong gradient direction changes the losses of steps 2-3 beyond TOL
TOL = 1e-4
JOB_TIMEOUT_S = 120


# --------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(target, rank: int, world: int, port: int, log: Path, args: tuple) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # pytest replaced sys.stdout too
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port),
                      # embedded.main gives each rank cpu_count // LOCAL_WORLD_SIZE threads: make it one.
                      LOCAL_WORLD_SIZE=str(max(world, os.cpu_count() or 1)))
    torch.set_num_threads(1)
    code = 1
    try:
        code = target(*args)
    except BaseException:  # noqa: BLE001 - report, then leave without Python teardown
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(target, world: int, args: tuple, logdir: Path) -> list[str]:
    """Run ``target(*args)`` in ``world`` forked ranks; fail with their logs unless all return 0."""
    logdir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    logs = [logdir / f"rank{r}.log" for r in range(world)]
    procs = [ctx.Process(target=_child, args=(target, r, world, port, logs[r], args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    texts = [log.read_text() if log.exists() else "" for log in logs]
    codes = [p.exitcode for p in procs]
    if any(codes):
        pytest.fail(f"ranks exited {codes}:\n" + "\n".join(f"--- rank {r}\n{t[-3000:]}" for r, t in enumerate(texts)))
    return texts


# --------------------------------------------------------------------------- jobs


def _run_json(directory: Path, model: str, tp: int, ep: int, dp: int, sp: bool, experts: str = "grouped") -> Path:
    """The run's run.json in ``directory``; the job reads its checkpoint under its workflow directory (``root``)."""
    run = make_run(track="model_parallel", model=model, gpus=tp * ep * dp, tp=tp, ep=ep, dp=dp, sp=sp,
                   learning_rate=LR, seed=0, precision="fp32", lora=None, engine_options={"experts": experts}, **BATCH)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.json"
    path.write_text(json.dumps(run.to_dict(), indent=2))
    return path.resolve()


class _GradCapture:
    """Swaps in an AdamW that saves, before its first step, the full gradients the optimizer sees
    (gathered over TP and EP, named as in the Hugging Face model) to ``out`` on rank 0.

    AdamW is invariant to a constant scale of a gradient, so losses alone would not catch a wrong
    average (say, expert gradients not divided by ep): the gradients are compared too."""

    def __init__(self, out: Path):
        self.out, self.model, self.done = out, None, False
        capture = self

        class AdamW(torch.optim.AdamW):
            def step(self, *args, **kwargs):
                if not capture.done:
                    capture.save()
                    capture.done = True
                return super().step(*args, **kwargs)

        torch.optim.AdamW = AdamW

    def save(self) -> None:
        from torch.distributed.tensor import DTensor

        from ftscale.engines.embedded.moe import ExpertParallelMoE

        grads, experts = {}, {}
        for name, p in self.model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            module_name, _, leaf = name.rpartition(".")
            moe = self.model.get_submodule(module_name)
            if not isinstance(moe, ExpertParallelMoE):
                grads[name] = g
            elif leaf == "router":
                grads[f"{module_name}.gate.weight"] = g
            else:  # this rank's experts: gather them over the EP group
                parts = [torch.empty_like(g) for _ in range(moe.groups.ep_size)]
                dist.all_gather(parts, g.contiguous(), group=moe.groups.ep)
                experts[(module_name, leaf)] = torch.cat(parts)
        for (module_name, leaf), g in experts.items():
            if leaf == "gate_proj":
                grads[f"{module_name}.experts.gate_up_proj"] = torch.cat([g, experts[(module_name, "up_proj")]], 1)
            elif leaf == "down_proj":
                grads[f"{module_name}.experts.down_proj"] = g
        if dist.get_rank() == 0:
            torch.save(grads, self.out)


def _layout_job(root: str, run_json: str, grads_out: str) -> int:
    """``embedded.main`` as torchrun would run it in the workflow directory ``root``, recording the step-1
    gradients."""
    os.chdir(root)
    capture, prepare = _GradCapture(Path(grads_out)), embedded.prepare_model_parallel

    def prepare_and_remember(model, run, device, **options):
        prepared = prepare(model, run, device, **options)
        capture.model = prepared.model
        return prepared

    embedded.prepare_model_parallel = prepare_and_remember  # this forked rank only
    return embedded.main([run_json])


def _reference(root: str, run_json: str, grads_out: str) -> int:
    """The unsplit model in one process through the engine's own training loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftscale.run.data import corpus_tokens

    os.chdir(root)
    run = Run.load(run_json)
    dist.init_process_group("gloo")
    torch.manual_seed(run.seed)
    model = AutoModelForCausalLM.from_pretrained(run.checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    tokens = corpus_tokens(AutoTokenizer.from_pretrained(run.checkpoint))
    _GradCapture(Path(grads_out)).model = model
    prepared = training.TrainSetup(model=model, dp_rank=0, dp_size=1, layout={})
    training.train(run, prepared, tokens, torch.device("cpu"), Path(run_json).parent / "metrics.jsonl")
    dist.destroy_process_group()
    return 0


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A workflow directory with both tiny models imported where runs read them (models/<m>/model)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name in ("tiny_llama", "tiny_mixtral"):
        import_model(load_model(name), root / "models" / name / "model")
    return root


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    cache: dict[str, tuple[list[float], dict]] = {}

    def get(model: str) -> tuple[list[float], dict]:
        if model not in cache:
            run_dir = tmp_path_factory.mktemp(f"ref_{model}")
            run_json = _run_json(run_dir, model, 1, 1, 1, False)
            launch(_reference, 1, (str(checkpoints), str(run_json), str(run_dir / "grads.pt")), run_dir / "logs")
            cache[model] = _losses(run_dir), torch.load(run_dir / "grads.pt")
        return cache[model]

    return get


# --------------------------------------------------------------------------- tests

LAYOUTS = [
    pytest.param("tiny_llama", 2, 1, 1, True, "grouped", id="llama-tp2-sp"),
    pytest.param("tiny_mixtral", 1, 2, 1, False, "grouped", id="mixtral-ep2"),
    pytest.param("tiny_mixtral", 2, 2, 1, True, "grouped", id="mixtral-tp2-ep2-sp"),
    # Beyond the three above: expert gradients averaged over dp, TP without SP, and TP with DP.
    pytest.param("tiny_mixtral", 1, 2, 2, False, "grouped", id="mixtral-ep2-dp2"),
    pytest.param("tiny_mixtral", 2, 2, 1, False, "grouped", id="mixtral-tp2-ep2"),
    pytest.param("tiny_llama", 2, 1, 2, True, "grouped", id="llama-tp2-dp2-sp"),
    # The experts one matrix multiply each in a loop (embedded.experts: loop) rather than grouped.
    pytest.param("tiny_mixtral", 2, 2, 1, True, "loop", id="mixtral-tp2-ep2-sp-loop"),
]


@pytest.mark.parametrize(("model", "tp", "ep", "dp", "sp", "experts"), LAYOUTS)
def test_model_parallel_matches_single_process(model, tp, ep, dp, sp, experts, checkpoints, reference, tmp_path):
    run_json = _run_json(tmp_path, model, tp, ep, dp, sp, experts)
    texts = launch(_layout_job, tp * ep * dp, (str(checkpoints), str(run_json), str(tmp_path / "grads.pt")),
                   tmp_path / "logs")

    steps, layout, done = parse_steps(texts[0])
    assert done and [s["step"] for s in steps] == [1, 2, 3], texts[0][-2000:]
    (ref, ref_grads), losses = reference(model), _losses(tmp_path)
    assert len(losses) == len(ref) == BATCH["steps"]
    diffs = [abs(a - b) for a, b in zip(losses, ref)]
    assert max(diffs) < TOL, f"losses {losses} vs single-process {ref}"
    assert ref[2] < ref[0]  # it trains

    grads = torch.load(tmp_path / "grads.pt")
    assert grads.keys() == ref_grads.keys()
    rel = {k: ((grads[k] - r).abs().max() / r.abs().max()).item() for k, r in ref_grads.items()}
    assert max(rel.values()) < TOL, sorted(rel.items(), key=lambda kv: -kv[1])[:5]

    # The layout line is read back from the split model: it must be the one asked for, and the
    # elements each rank holds must be those of the analytic model in ftscale.estimate.comm.
    arch = load_model(model).arch
    expected = {"world": tp * ep * dp, "tp": tp, "ep": ep, "dp": dp, "sp": int(sp),
                "params_per_rank": params_per_gpu(arch, tp, ep),
                "trainable_per_rank": sum(trainable_params_per_gpu(arch, tp, ep))}
    if arch["type"] == "mixtral":
        expected["experts_per_rank"] = arch["num_local_experts"] // ep
    assert {k: layout.get(k) for k in expected} == expected
    assert layout["device"] == "cpu" and layout["dtype"] == "float32" and layout["experts"] == experts


def test_bad_layouts_are_refused_before_splitting():
    """The layout's rules (Layout.errors, on the model's own config) and the implementation's own."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256,
                        vocab_size=1024, num_local_experts=4, output_router_logits=False)
    cfg._attn_implementation = "sdpa"
    model = SimpleNamespace(config=cfg, model=SimpleNamespace(layers=[]))
    check_model(model, Layout(2, 2, 1, True), 4, 32)  # fine
    for (tp, ep, dp, sp, world, seq), words in [((8, 1, 1, False, 8, 32), "key/value heads \\(4\\)"),
                                                 ((1, 3, 1, False, 3, 32), "divide the number of experts"),
                                                 ((2, 1, 1, True, 2, 33), "divide seq_length = 33"),
                                                 ((1, 1, 2, True, 2, 32), "needs tp > 1"),
                                                 ((2, 1, 1, False, 4, 32), "world size")]:
        with pytest.raises(ValueError, match=words):
            check_model(model, Layout(tp, ep, dp, sp), world, seq)
    cfg.output_router_logits = True
    with pytest.raises(ValueError, match="load-balancing loss"):
        check_model(model, Layout(2, 2, 1, True), 4, 32)
