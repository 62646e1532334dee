"""The embedded engine's speed options (config ``embedded:``), applied to a model as the engine builds it.

Which options exist, their defaults and which need a GPU: ``ftscale.engines.embedded.spec``, checked there
before any job (``EmbeddedSpec.option_errors``) and again here with the device the job got.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ContextManager

import torch

from ftscale.engines.embedded.spec import EmbeddedOptions, EmbeddedSpec
from ftscale.study.run import Run

#: The ``attention`` option -> torch.nn.attention.SDPBackend member name (auto: PyTorch chooses).
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def resolve(run: Run, device: torch.device) -> EmbeddedOptions:
    """The run's options as the engine applies them, every one present; raises ValueError when ``device``
    cannot honour one. ``fused_ce`` applies to the data_parallel track only (the model_parallel track
    splits the LM head with tensor parallelism): there it is off, said on stdout and on the layout line."""
    spec = EmbeddedSpec()
    errors = spec.option_errors(run, device.type)
    if errors:
        raise ValueError("; ".join(errors))
    options = spec.options(run)
    if options.fused_ce != "off" and run.track != "data_parallel":
        print(f"[ftscale] note embedded.fused_ce={options.fused_ce} not applied on the {run.track} track "
              "(its LM head is split by tensor parallelism): fused_ce=off", flush=True)
        options = dataclasses.replace(options, fused_ce="off")
    return options


def attention_context(name: str) -> ContextManager:
    """The SDPA backend the training steps run under: only ``name``'s backend is allowed (PyTorch raises
    when it cannot run the shapes); ``auto`` leaves the choice to PyTorch."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def apply_liger_kernels(model: torch.nn.Module) -> str:
    """liger-kernel's RMSNorm, SwiGLU and RoPE patched into ``model`` (a transformers LLaMA or Mixtral,
    before peft wraps it); its own cross-entropy stays off (that is the ``fused_ce`` option). Returns
    the name of the function applied."""
    import liger_kernel.transformers as liger

    model_type = model.config.model_type
    apply = {"llama": "apply_liger_kernel_to_llama", "mixtral": "apply_liger_kernel_to_mixtral"}.get(model_type)
    if apply is None:
        raise ValueError(f"embedded.liger_kernels: no liger-kernel patch for model type {model_type!r}")
    getattr(liger, apply)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                          fused_linear_cross_entropy=False, model=model)
    return apply


#: The ``experts`` option -> transformers' experts implementation (the data_parallel track's MoE blocks).
EXPERTS_IMPLEMENTATION = {"grouped": "grouped_mm", "loop": "eager"}


def apply_experts(model: torch.nn.Module, experts: str) -> str | None:
    """The ``experts`` option set on a transformers mixture-of-experts model (``grouped``: torch's grouped
    matrix multiply per projection; ``loop``: one matrix multiply per expert); returns the implementation the
    model now reports, None for a dense model. Raises when transformers does not take it."""
    if not getattr(model.config, "num_local_experts", None):
        return None
    wanted = EXPERTS_IMPLEMENTATION[experts]
    model.set_experts_implementation(wanted)
    got = model.config._experts_implementation
    if got != wanted:
        raise ValueError(f"embedded.experts = {experts!r}: transformers runs the experts with {got!r}, not {wanted!r}")
    return got


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model`` (a transformers model, bare or wrapped by peft and DDP): the
    modules of the classes its ``_no_split_modules`` names (LlamaDecoderLayer, MixtralDecoderLayer)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError("embedded.compile_scope = 'layers': the model names no decoder layer class "
                         f"(_no_split_modules: {sorted(names)}); use compile_scope: model")
    return layers


def compile_model(model: torch.nn.Module, mode: str, scope: str = "model") -> int:
    """torch.compile ``model`` in place (``default``: torch's default mode); returns how many modules were
    compiled. ``scope``:

    - ``layers``: each decoder layer on its own (regional compilation). All layers share one compiled graph
      (parameters are graph inputs), so compilation takes one layer's time, and the attention mask is built
      outside the graph: transformers then calls SDPA with ``is_causal`` and no mask (flash/cuDNN kernels,
      grouped-query attention without repeating K/V), where inside a compiled graph it materialises the mask.
    - ``model``: the whole model in one graph (fuses across layers and the loss; slower to compile).
    """
    kwargs = {} if mode == "default" else {"mode": mode}
    modules = decoder_layers(model) if scope == "layers" else [model]
    for module in modules:
        module.compile(**kwargs)
    return len(modules)


def layout_fields(options: EmbeddedOptions) -> dict:
    """The options as the log's layout line names them (booleans as 0/1)."""
    return {key: int(value) if isinstance(value, bool) else value
            for key, value in dataclasses.asdict(options).items()}
