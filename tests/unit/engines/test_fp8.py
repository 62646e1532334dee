"""embedded.fp8: the frozen linear layers' matrix multiplies in float8 (ftscale.engines.embedded.fp8).

torch's ``_scaled_mm`` runs on the CPU too, so the numerics, the missing weight gradient and peft's wrapping
are checked here on real tensors; the option itself is refused for CPU runs (it is for Hopper GPUs)."""

from __future__ import annotations

import pytest
import torch
from runs import make_run
from torch import nn

from ftscale.engines import engine
from ftscale.engines.embedded.fp8 import FrozenFP8Linear, convert_frozen_linears
from ftscale.estimate.plan import setting_for
from ftscale.study.models import load_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_forward_and_input_gradient_match_bf16_and_no_weight_gradient(scaling):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 32, 256, dtype=torch.bfloat16, requires_grad=True)
    ref_out = linear(x)
    (ref_grad,) = torch.autograd.grad(ref_out.float().square().sum(), x)

    fp8 = FrozenFP8Linear(linear, scaling)
    x8 = x.detach().clone().requires_grad_(True)
    out = fp8(x8)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and out.shape == ref_out.shape
    assert _rel(out, ref_out) < 0.06  # e4m3 keeps 3 mantissa bits: a few % per element, less summed
    assert _rel(x8.grad, ref_grad) < 0.08
    assert fp8.weight.grad is None and not fp8.weight.requires_grad


def test_rowwise_scaling_keeps_a_small_row_beside_an_outlier():
    torch.manual_seed(0)
    linear = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    x[0] *= 1e5  # one outlier token: under one tensor-wide scale the others fall to float8's subnormals
    errors = {s: _rel(FrozenFP8Linear(linear, s)(x)[1:], linear(x)[1:]) for s in ("tensorwise", "rowwise")}
    assert errors["rowwise"] < errors["tensorwise"] / 2, errors


def test_peft_wraps_the_converted_layers_and_only_the_adapters_train():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftscale.importing.synthetic import hf_config

    torch.manual_seed(0)
    config = hf_config(load_model("tiny_llama").arch)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict())).to(torch.bfloat16)
    swapped = convert_frozen_linears(model, "rowwise", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"))
    assert swapped == 7 * config.num_hidden_layers
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and all("lora_" in n for n in trainable)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, FrozenFP8Linear)
    with pytest.raises(ValueError, match="no linear layer named"):
        convert_frozen_linears(nn.Sequential(nn.Linear(2, 2)), "tensorwise", ("q_proj",))


def test_fp8_is_refused_off_the_gpu_and_off_lora_and_planned_with_its_copies():
    spec = engine("embedded")
    cpu = make_run(engine_options={"fp8": "rowwise"})
    assert any("embedded.fp8 = 'rowwise': needs a CUDA GPU" in e for e in spec.option_errors(cpu, "cpu"))
    mp = make_run(track="model_parallel", gpus=2, tp=2, sp=True, device="cuda", engine_options={"fp8": "tensorwise"})
    assert any("under LoRA" in e for e in spec.option_errors(mp, "cuda"))
    gpu = make_run(device="cuda", precision="bf16", engine_options={"fp8": "tensorwise"})
    assert spec.option_errors(gpu, "cuda") == []
    arch = load_model("llama31_8b").arch
    plain = setting_for(make_run(device="cuda", precision="bf16"), arch)
    with_fp8 = setting_for(gpu, arch)
    linear_params = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    from ftscale.estimate.memory import predict_memory, state_bytes

    # the float8 copies are buffers: in the peak, not in the state (parameters, gradients, optimizer) runs measure
    assert state_bytes(with_fp8).fp8_copies == 2 * linear_params and state_bytes(plain).fp8_copies == 0
    assert state_bytes(with_fp8).total == state_bytes(plain).total
    assert predict_memory(with_fp8).peak_mib - predict_memory(plain).peak_mib == pytest.approx(2 * linear_params / 2**20)
