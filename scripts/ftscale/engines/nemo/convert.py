"""NeMo's conversion of an imported Hugging Face checkpoint (``models/<m>/model``) into a NeMo 2
checkpoint (``models/<m>/nemo``), once, through ``llm.import_ckpt``; read-only afterwards.

NeMo is imported inside the functions: this module imports without it. The conversion needs a GPU
node in NeMo's container (Transformer Engine) or, without TE, ``transformer_impl: local`` (see
``ftscale.engines.nemo.train.model_config``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ftscale.importing.checkpoint import is_imported, write_once
from ftscale.study.models import Model

#: Files a finished ``llm.import_ckpt`` leaves in its output directory (nemo 2.7.3,
#: ModelConnector.nemo_save): ``trainer.save_checkpoint`` writes the Megatron distributed
#: checkpoint into ``weights/`` and its ``metadata.json`` last; only then does rank 0 dump
#: ``context/io.json`` and, after it, ``context/model.yaml`` (TrainerContext.io_dump).
IMPORT_COMPLETE_FILES = ("weights/metadata.json", "weights/.metadata", "context/io.json", "context/model.yaml")


def import_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished NeMo 2 import (see IMPORT_COMPLETE_FILES)."""
    out = Path(out_dir)
    return all((out / f).is_file() for f in IMPORT_COMPLETE_FILES)


#: Settings of NeMo's LLaMA/Mixtral configs that need Transformer Engine (off with transformer_impl: local):
#: the fusions, and persist_layer_norm (Megatron's torch norm asserts it is off).
TE_FUSIONS = ("apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion",
              "bias_dropout_fusion", "cross_entropy_loss_fusion", "persist_layer_norm")


#: model.yaml architecture keys -> the fields of NeMo's GPT configs they set (as NeMo's HF importers do).
ARCH_TO_NEMO = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "vocab_size": "vocab_size",
    "rope_theta": "rotary_base",
    "num_local_experts": "num_moe_experts",
    "num_experts_per_tok": "moe_router_topk",
}


def arch_fields(arch: dict) -> dict:
    """NeMo GPT-config fields of a model.yaml architecture, so that a recipe's config (the 8B one,
    say) takes the model's real shape: a 2-layer model restores into a 2-layer NeMo model. The vocab
    size is set explicitly: NeMo would otherwise size it from the tokenizer."""
    return {nemo: arch[key] for key, nemo in ARCH_TO_NEMO.items() if key in arch}


def model_config(spec: dict, options: dict):  # -> nemo.collections.llm.GPTConfig
    """NeMo's model config of a model.yaml (``nemo.config_class``) at the model's shape, with the
    engine options applied: ``transformer_impl: local`` selects Megatron-core's local layer spec and
    turns off the fusions that need Transformer Engine (NeMo's container has TE: the default is
    ``transformer_engine``). The fusions go to the constructor: NeMo's configs check them as they are made."""
    from nemo.collections import llm

    cls = getattr(llm, spec["nemo"]["config_class"])
    kwargs: dict = {**arch_fields(spec.get("architecture") or {})}
    if options.get("transformer_impl") == "local":
        kwargs.update(local_overrides(cls))
    return cls(**kwargs)


def local_overrides(config_class: type) -> dict:
    """Constructor arguments of a NeMo GPT config for Megatron-core's local (no TE) implementation."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return {**{name: False for name in TE_FUSIONS if name in names}, "transformer_layer_spec": local_layer_spec}


def local_layer_spec(config):  # -> megatron.core.transformer.ModuleSpec
    """Megatron-core's local GPT layer spec (a module-level function: NeMo serialises the config)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=getattr(config, "num_moe_experts", None), moe_grouped_gemm=False,
                                    qk_layernorm=getattr(config, "qk_layernorm", False))


def local_config_class(cls: type) -> type:
    """A dataclass subclass of a NeMo GPT config whose defaults are ``local_overrides``; it keeps the
    parent's module and name, so a checkpoint's serialized context names NeMo's own class."""
    import dataclasses
    from typing import Any

    overrides = local_overrides(cls)
    namespace = {"__annotations__": {k: Any for k in overrides}, **overrides,
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return dataclasses.dataclass(type(cls.__name__, (cls,), namespace))


@contextlib.contextmanager
def te_free_importer(model_class: type):
    """Workaround (NeMo 2.7.3): a Hugging Face importer builds its model config from the HF config
    with NeMo's defaults, which turn on TE-only fusions, so ``llm.import_ckpt`` fails without
    Transformer Engine. For the duration, the config classes named in the importer's module are
    replaced by ``local_config_class`` variants."""
    import dataclasses
    import sys

    module = sys.modules[model_class.__module__]
    saved = {name: obj for name, obj in vars(module).items()
             if isinstance(obj, type) and dataclasses.is_dataclass(obj)
             and any(f.name == "apply_rope_fusion" for f in dataclasses.fields(obj))}
    importers = [obj for obj in vars(module).values()
                 if isinstance(obj, type) and obj.__name__.startswith("HF") and obj.__name__.endswith("Importer")]
    converters = {imp: imp.convert_state for imp in importers}
    try:
        for name, cls in saved.items():
            setattr(module, name, local_config_class(cls))
        for imp, convert in converters.items():
            imp.convert_state = _with_local_norms(convert)
        yield
    finally:
        for name, cls in saved.items():
            setattr(module, name, cls)
        for imp, convert in converters.items():
            imp.convert_state = convert


#: Hugging Face norm weights -> where Megatron's local layer spec keeps them. NeMo 2.7.3's importers
#: map them onto TE's fused layer-norm weights (linear_qkv.layer_norm_weight, linear_fc1.layer_norm_weight),
#: which the local spec does not have.
LOCAL_NORMS = {"input_layernorm.weight": "input_layernorm.weight",
               "post_attention_layernorm.weight": "pre_mlp_layernorm.weight"}


def norms_in_source_dtype(target, dtype) -> int:
    """Casts the local spec's norm weights (torch norms, made in fp32) to the HF checkpoint's dtype, as TE's
    fused norms hold them in the model's params dtype: NeMo's conversion asserts that no parameter changes
    dtype, and maps the final norm straight from the source. Returns how many were cast."""
    cast = 0
    for name, param in target.named_parameters():
        if name.endswith("layernorm.weight") and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def _with_local_norms(convert):
    """``convert_state`` that also copies each layer's norm weights to the local spec's modules."""
    import functools

    import torch

    @functools.wraps(convert)
    def convert_state(self, source, target, *args, **kwargs):
        source_state = source.state_dict()
        norms_in_source_dtype(target, source_state["model.norm.weight"].dtype)
        result = convert(self, source, target, *args, **kwargs)
        params = dict(target.named_parameters())
        copied = 0
        for name, param in params.items():
            marker = "decoder.layers."
            if marker not in name:
                continue
            layer, _, rest = name.split(marker, 1)[1].partition(".")
            for hf_name, local_name in LOCAL_NORMS.items():
                if rest == local_name and (src := source_state.get(f"model.layers.{layer}.{hf_name}")) is not None:
                    with torch.no_grad():
                        param.copy_(src.to(param.dtype))
                    copied += 1
        print(f"[ftscale] te_free_importer: copied {copied} layer-norm weights to the local layer spec", flush=True)
        return result

    return convert_state


def convert_to_nemo(model: Model, hf_checkpoint: Path, out_dir: Path, options: dict | None = None) -> Path:
    """``llm.import_ckpt(model=<model_class>(<config_class>(...)), source='hf://<abs hf_checkpoint>')``
    into ``out_dir`` (written once, read-only). ``options`` are the config's ``nemo:`` section."""
    hf_checkpoint = Path(hf_checkpoint)
    if not is_imported(hf_checkpoint):
        raise FileNotFoundError(f"{hf_checkpoint}: no complete Hugging Face import to convert (run the import first)")
    nemo_cfg = model.spec.get("nemo") or {}
    for key in ("model_class", "config_class"):
        if not nemo_cfg.get(key):
            raise ValueError(f"{model.yaml_path}: key 'nemo.{key}' is missing")

    def write(tmp: Path) -> dict:
        from nemo.collections import llm

        config = model_config(model.spec, options or {})
        target = tmp / "nemo"
        model_class = getattr(llm, nemo_cfg["model_class"])
        local = (options or {}).get("transformer_impl") == "local"
        with te_free_importer(model_class) if local else contextlib.nullcontext():
            llm.import_ckpt(model=model_class(config), source="hf://" + str(hf_checkpoint.resolve()),
                            output_path=target, overwrite=True)
        if not import_complete(target):
            raise RuntimeError(f"llm.import_ckpt returned but {target} lacks "
                               f"{[f for f in IMPORT_COMPLETE_FILES if not (target / f).is_file()]}")
        for item in target.iterdir():
            item.rename(tmp / item.name)
        target.rmdir()
        return {"model": model.name, "format": "nemo2", "from": str(hf_checkpoint)}

    return write_once(out_dir, f"converting {hf_checkpoint} to NeMo 2 (llm.import_ckpt)", write)
