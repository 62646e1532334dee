"""The embedded engine's speed options (config ``embedded:``): the chunked fused LM head + cross-entropy
against the unfused loss, the options' validation, and one real CPU run of the engine with them on.

The GPU-only options (liger, flash/cudnn/efficient attention) are checked here for being refused on a CPU
and for what they call; their speed is measured on a GPU (docs/journal/gpu-sessions.md)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from paths import REPO
from runs import make_run

from ftscale.engines.embedded import fused_ce, options
from ftscale.engines.embedded.fused_ce import ChunkedLinearCrossEntropy, chunked_linear_cross_entropy
from ftscale.engines.embedded.spec import EmbeddedSpec
from ftscale.engines.embedded.training import TrainSetup
from ftscale.study.check import run_errors
from ftscale.study.models import load_model
from ftscale.study.run import Run

LORA = {"rank": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _inputs(n=37, h=16, v=50, dtype=torch.float64, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=weight_grad)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6, 30]] = -100  # padding / ignored positions, some inside a chunk, one at a chunk's end
    return hidden, weight, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t.requires_grad])


@pytest.mark.parametrize("chunk", [1, 7, 8, 64])
def test_chunked_matches_cross_entropy_float64(chunk):
    hidden, weight, labels = _inputs()
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="mean")
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(got * 3.0, hidden, weight), _grads(ref * 3.0, hidden, weight)):  # scaled upstream grad
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_compiled_matches_cross_entropy(weight_grad):
    """embedded.compile with fused_ce: chunked runs each chunk's softmax and gradient compiled (inductor, real
    compilation on the CPU here): the same loss and gradients as the unfused loss, the last chunk shorter."""
    import torch._dynamo

    torch._dynamo.reset()
    hidden, weight, labels = _inputs(dtype=torch.float32, weight_grad=weight_grad)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, -100, 8, True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(got * 2.0, hidden, weight), _grads(ref * 2.0, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    loss, grad = fused_ce.softmax_grad(hidden.detach()[:8] @ weight.detach().t(), labels[:8].clamp(min=0),
                                       labels[:8] != -100, torch.tensor(1.0))
    assert grad.dtype == torch.float32 and loss.ndim == 0


def test_chunked_frozen_weight_float32_and_nothing_to_predict():
    hidden, weight, labels = _inputs(dtype=torch.float32, weight_grad=False)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk=5)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    (g_got,), (g_ref,) = _grads(got, hidden, weight), _grads(ref, hidden, weight)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)
    assert weight.grad is None
    # every label ignored: NaN as F.cross_entropy's mean gives, zero gradients
    none = torch.full_like(labels, -100)
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, none, -100, 8)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.t(), none, ignore_index=-100))
    (g,) = torch.autograd.grad(loss, hidden)
    assert torch.equal(g, torch.zeros_like(g))


def test_chunk_tokens_bounds_the_logits():
    assert fused_ce.chunk_tokens(128256) == 512
    assert fused_ce.chunk_tokens(1024) == 65536
    assert fused_ce.chunk_tokens(1000, elements=3000) == 2


def _tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA["targets"], init_lora_weights=False)
    return get_peft_model(model, lora)


def _loss_and_lora_grads(setup: TrainSetup, ids: torch.Tensor):
    loss = setup.loss(ids)
    params = {n: p for n, p in setup.model.named_parameters() if p.requires_grad}
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("attention", ["auto", "math"])
def test_fused_head_matches_transformers_loss_on_a_lora_model(monkeypatch, attention):
    monkeypatch.setattr(fused_ce, "CHUNK_ELEMENTS", 97 * 8)  # 8 tokens a chunk: several chunks per sequence
    plain = _tiny_lora_model()
    fused = copy.deepcopy(plain)
    head = fused_ce.install(fused, "chunked")
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    layout = {}
    with options.attention_context(attention):
        ref_loss, ref_grads = _loss_and_lora_grads(TrainSetup(plain, 0, 1, layout), ids)
        got_loss, got_grads = _loss_and_lora_grads(TrainSetup(fused, 0, 1, layout, head=head), ids)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    assert len(ref_grads) == 2 * 4 * 2  # lora_A and lora_B of 4 projections in 2 layers
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- validation


SPEC = EmbeddedSpec()


def _run(device="cpu", track="data_parallel", **opts) -> Run:
    return make_run(track=track, precision="fp32", device=device, lora=LORA if track == "data_parallel" else None,
                    engine_options=opts)


@pytest.mark.parametrize("opts, device, key, words", [
    ({"fused_ce": "liger"}, "cpu", "embedded.fused_ce", "needs a CUDA GPU and this run's device is cpu; use 'chunked'"),
    ({"liger_kernels": True}, "cpu", "embedded.liger_kernels", "needs a CUDA GPU"),
    ({"attention": "flash"}, "cpu", "embedded.attention", "use 'math' or 'auto' on the CPU"),
    ({"attention": "cudnn"}, "cpu", "embedded.attention", "needs a CUDA GPU"),
    ({"compile_mode": "max-autotune"}, "cuda", "embedded.compile_mode", "set embedded.compile: true"),
    ({"compile_scope": "model"}, "cuda", "embedded.compile_scope", "set embedded.compile: true"),
    ({"compile_scope": "blocks"}, "cuda", "embedded.compile_scope", "must be one of ['layers', 'model']"),
    ({"lora_dtype": "bf16"}, "cuda", "embedded.lora_dtype", "must be one of ['float32', 'model']"),
    ({"fused_ce": "liger"}, "cuda", "embedded.fused_ce", "needs liger-kernel, which is not installed"),
    ({"liger_kernels": True}, "auto", "embedded.liger_kernels", "pip install -e '.[gpu]'"),
    ({"attention": "fast"}, "cuda", "embedded.attention", "must be one of ['auto', 'flash'"),
    ({"compile_mode": "reduce-overhead", "compile": True}, "cuda", "embedded.compile_mode",
     "cannot run with embedded.compile_scope: layers"),
    ({"compile_mode": "max-autotune", "compile": True, "compile_scope": "layers"}, "cuda", "embedded.compile_mode",
     "compile_scope: model"),
    ({"liger_kernels": True, "compile": True}, "cuda", "embedded.liger_kernels", "cannot run with embedded.compile"),
    ({"liger_kernels": True, "compile": True, "compile_scope": "model"}, "cuda", "embedded.liger_kernels",
     "BackendCompilerFailed"),
    ({"fused": "chunked"}, "cuda", "embedded.fused", "unknown option"),
])
def test_options_a_device_cannot_honour_are_refused(opts, device, key, words):
    run = _run(device, **opts)
    errors = SPEC.option_errors(run, device, have_liger=lambda: False)
    value = next(iter(opts.values()))
    assert any(e.startswith(f"run {run.name}: {key} = {value!r}: ") and words in e for e in errors), errors


def test_options_that_can_run_pass(repo):
    model = load_model("tiny_llama", repo).spec
    assert run_errors(_run("cpu", fused_ce="chunked", attention="math"), model) == []
    assert run_errors(_run("cpu", fused_ce=False), model) == []  # YAML's bare `off`
    assert SPEC.options(_run("cpu", fused_ce=False)).fused_ce == "off"
    gpu = _run("cuda", fused_ce="liger", attention="cudnn", compile=True, compile_mode="max-autotune",
               compile_scope="model")
    assert SPEC.option_errors(gpu, "cuda", have_liger=lambda: True) == []
    liger_eager = _run("cuda", fused_ce="liger", liger_kernels=True, lora_dtype="model")
    assert SPEC.option_errors(liger_eager, "cuda", have_liger=lambda: True) == []
    mp = _run("cpu", track="model_parallel", fused_ce="chunked")
    assert SPEC.option_errors(mp, "cpu") == []
    assert options.resolve(mp, torch.device("cpu")).fused_ce == "off"  # not applied there, and said so
    assert options.resolve(_run("cpu", fused_ce="chunked"), torch.device("cpu")).fused_ce == "chunked"
    assert SPEC.options(_run()).attention == "auto" and SPEC.options(_run()).fused_ce == "off"


def test_bad_options_name_file_key_and_value(default_config, repo):
    from ftscale.study.schema import ConfigError
    from ftscale.study.sweep import load_study

    with pytest.raises(ConfigError, match=r"my.yaml: run \S+: embedded.attention = 'fast': must be one of \['auto'"):
        load_study({**default_config, "embedded": {"attention": "fast"}}, "my.yaml", repo)
    with pytest.raises(ConfigError, match=r"my.yaml: key 'embedded' = 3: the embedded engine's options are a mapping"):
        load_study({**default_config, "embedded": 3}, "my.yaml", repo)
    with pytest.raises(ConfigError, match=r"my.yaml: key 'embedded\[0\]' = 1: an option set is a mapping"):
        load_study({**default_config, "embedded": [1]}, "my.yaml", repo)
    study = load_study({**default_config, "embedded": {"fused_ce": False}}, "my.yaml", repo)
    assert dataclasses.asdict(study.runs[0].options) == {
        "activation_checkpointing": False, "compile": False, "compile_mode": "default", "compile_scope": "layers",
        "fused_ce": "off", "liger_kernels": False, "attention": "auto", "lora_dtype": "float32", "fp8": "off",
        "experts": "grouped"}


def test_experts_grouped_and_looped_give_the_same_mixtral(tmp_path):
    """``embedded.experts`` on the data_parallel track: transformers runs tiny Mixtral's experts with torch's grouped
    matrix multiply or its loop over experts, as asked, with the same loss and gradients; a dense model has none."""
    from ftscale.importing.checkpoint import import_model, load_for_training

    import_model(load_model("tiny_mixtral"), tmp_path / "mixtral")
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for experts in ("grouped", "loop"):
        model = load_for_training(tmp_path / "mixtral", torch.float32, torch.device("cpu"))
        assert options.apply_experts(model, experts) == options.EXPERTS_IMPLEMENTATION[experts]
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        results[experts] = loss.item(), model.model.layers[0].mlp.experts.gate_up_proj.grad.clone()
    (grouped_loss, grouped_grad), (loop_loss, loop_grad) = results["grouped"], results["loop"]
    assert grouped_loss == pytest.approx(loop_loss, rel=1e-6)
    assert torch.allclose(grouped_grad, loop_grad, rtol=1e-4, atol=1e-6) and grouped_grad.abs().sum() > 0
    import_model(load_model("tiny_llama"), tmp_path / "llama")
    assert options.apply_experts(load_for_training(tmp_path / "llama", torch.float32, torch.device("cpu")), "loop") is None


def test_liger_kernels_patch_the_model_by_type(monkeypatch):
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda **kw: calls.append(("llama", kw))
    fake.apply_liger_kernel_to_mixtral = lambda **kw: calls.append(("mixtral", kw))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mixtral"))
    assert options.apply_liger_kernels(model) == "apply_liger_kernel_to_mixtral"
    assert calls == [("mixtral", {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                  "fused_linear_cross_entropy": False, "model": model})]
    with pytest.raises(ValueError, match="no liger-kernel patch for model type 'qwen2'"):
        options.apply_liger_kernels(types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen2")))


def test_compile_mode_and_layout_fields(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert options.compile_model(model, "default", "model") == 1
    assert options.compile_model(model, "reduce-overhead", "model") == 1
    assert seen == [("Sequential", {}), ("Sequential", {"mode": "reduce-overhead"})]
    with pytest.raises(ValueError, match="compile_scope = 'layers': the model names no decoder layer class"):
        options.compile_model(model, "default", "layers")
    assert options.layout_fields(SPEC.options(_run(fused_ce="chunked"))) == {
        "activation_checkpointing": 0, "compile": 0, "compile_mode": "default", "compile_scope": "layers",
        "fused_ce": "chunked", "liger_kernels": 0, "attention": "auto", "lora_dtype": "float32", "fp8": "off",
        "experts": "grouped"}
    with pytest.raises(ValueError, match="embedded.attention = 'flash': needs a CUDA GPU"):
        options.resolve(_run("auto", attention="flash"), torch.device("cpu"))  # the engine's own check


def test_compile_scope_layers_compiles_each_decoder_layer_with_causal_sdpa(monkeypatch):
    """Real dynamo on a real tiny LLaMA under peft (a recording backend in place of inductor): scope
    ``layers`` compiles each decoder layer, all layers share two graphs (the first layer's input, from the
    frozen embedding, needs no gradient; the others' do), and in them SDPA is causal with no mask; scope ``model`` is one graph in which transformers passes a materialised mask instead (why the
    whole-model compile could not use the flash kernel)."""
    import torch._dynamo
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    graphs: list[list[dict]] = []

    def recording(gm, example_inputs):
        graphs.append([dict(n.kwargs) for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)])
        return gm.forward

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend=recording, **kw))
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    ids = torch.randint(0, 128, (2, 16))
    for scope in ("layers", "model"):
        torch._dynamo.reset()
        graphs.clear()
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        assert options.compile_model(model, "default", scope) == (4 if scope == "layers" else 1)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        calls = [c for g in graphs for c in g]
        if scope == "layers":
            assert len(graphs) == 2 and len(calls) == 2  # layer 0's graph, and one for layers 1-3
            assert all(c["is_causal"] is True and c["attn_mask"] is None for c in calls)
        else:
            assert len(calls) == 4 and all(c["attn_mask"] is not None and not c["is_causal"] for c in calls)
    torch._dynamo.reset()


@pytest.mark.parametrize("lora_dtype, adapter", [("float32", torch.float32), ("model", torch.bfloat16)])
def test_lora_dtype_sets_the_adapters_dtype(lora_dtype, adapter, tmp_path):
    """A bf16 model through the engine's own data-parallel preparation (peft + DDP, one gloo rank): peft's
    default upcasts the adapters to fp32; ``model`` keeps them in bf16, and the loss still trains them."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftscale.engines.embedded.data_parallel import prepare_data_parallel

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        prepared = prepare_data_parallel(LlamaForCausalLM(config).to(torch.bfloat16), _run("cpu"),
                                         torch.device("cpu"), lora_dtype)
        trainable = {n: p for n, p in prepared.model.named_parameters() if p.requires_grad}
        assert trainable and all(p.dtype == adapter for p in trainable.values()), {n: p.dtype for n, p in trainable.items()}
        frozen = [p.dtype for p in prepared.model.parameters() if not p.requires_grad]
        assert set(frozen) == {torch.bfloat16}
        ids = torch.randint(0, 128, (2, 8))
        prepared.loss(ids).backward()
        assert all(p.grad is not None and p.grad.dtype == adapter for n, p in trainable.items() if "lora_A" in n)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the engine, end to end


def test_engine_runs_with_fused_ce_and_math_attention(tmp_path):
    """Two real runs of the engine (``python -m ftscale.engines.embedded.train``, one rank, gloo; a fresh
    interpreter each, as torchrun starts it): the default and chunked + math. The layout line names the
    options and the per-step losses agree."""
    from test_model_parallel import _free_port

    from ftscale.importing.checkpoint import import_model

    import_model(load_model("tiny_llama"), tmp_path / "models" / "tiny_llama" / "model")  # where the run reads it
    losses, layouts = {}, {}
    for name, opts in (("off", {}), ("fused", {"fused_ce": "chunked", "attention": "math"})):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "run.json").write_text(json.dumps(_run("cpu", **opts).to_dict()))
        env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "FTSCALE_THREADS_PER_RANK": "1"}
        done = subprocess.run([sys.executable, "-m", "ftscale.engines.embedded.train", str(run_dir / "run.json")],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        layouts[name] = next(line for line in done.stdout.splitlines() if "[ftscale] layout" in line)
        losses[name] = [json.loads(r)["loss"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "fused_ce=off" in layouts["off"] and "attention=auto" in layouts["off"]
    assert "fused_ce=chunked" in layouts["fused"] and "attention=math" in layouts["fused"]
    assert len(losses["fused"]) == 3
    assert losses["fused"] == pytest.approx(losses["off"], rel=1e-5)


def test_tables_say_which_options_a_run_used():
    def label(engine: str, built: dict, **given) -> str:
        run = dataclasses.replace(_run(), engine=engine, engine_options=given)
        return run.spec.options_label(run, built)

    configured = {"compile": True, "fused_ce": "chunked"}
    assert label("embedded", {}, **configured) == "compile, fused_ce=chunked"
    # as built (the layout line) wins over as configured; an old line names only compile
    built = {"compile": 1, "fused_ce": "off", "attention": "flash", "liger_kernels": 1}
    assert label("embedded", built, **configured) == \
        "compile, compile_scope=model, liger_kernels, attention=flash"  # a line from before compile_scope
    assert label("embedded", {"compile": 0, "activation_checkpointing": 0}) == "defaults"
    # a compiled run's line from before compile_scope existed: the whole model was compiled
    assert label("embedded", {"compile": 1, "fused_ce": "chunked"}) == "compile, compile_scope=model, fused_ce=chunked"
    assert label("embedded", {"compile": 1, "compile_scope": "layers"}) == "compile"
    assert label("nemo", built) == ""
    assert label("nemo", {}, transformer_impl="local") == "transformer_impl=local"
    assert label("nemo", {}, transformer_impl="transformer_engine") == ""
    assert label("automodel", {}) == ""


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "gpu").glob("*.yaml")), ids=lambda p: p.stem)
def test_gpu_benchmark_configs_are_valid(path, monkeypatch):
    """Every GPU benchmark config (docs/journal/gpu-sessions.md) loads here, liger-kernel taken as installed: a
    device call never spends its time on a config the workflow refuses."""
    from ftscale.engines.embedded import spec
    from ftscale.study.sweep import load_config_file, load_study

    monkeypatch.setattr(spec, "liger_installed", lambda: True)
    study = load_study(load_config_file(path), source=str(path), root=REPO)
    assert study.runs
