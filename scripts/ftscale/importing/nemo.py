"""NeMo's conversion of an imported Hugging Face checkpoint (``models/<m>/model``) into a NeMo 2
checkpoint (``models/<m>/nemo``), once, through ``llm.import_ckpt``; read-only afterwards.

NeMo is imported inside the functions: this module imports without it. The conversion needs a GPU
node in NeMo's container (Transformer Engine) or, without TE, ``transformer_impl: local`` (see
``ftscale.run.engine.nemo.model_config``).
"""

from __future__ import annotations

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


#: Fusions of NeMo's LLaMA/Mixtral configs that need Transformer Engine (off with transformer_impl: local).
TE_FUSIONS = ("apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion",
              "bias_dropout_fusion", "cross_entropy_loss_fusion")


def model_config(spec: dict, options: dict):  # -> nemo.collections.llm.GPTConfig
    """NeMo's model config of a model.yaml (``nemo.config_class``), with the engine options applied:
    ``transformer_impl: local`` selects Megatron-core's local layer spec and turns off the fusions
    that need Transformer Engine (NeMo's container has TE: the default is ``transformer_engine``).
    The fusions go to the constructor: NeMo's configs check them as they are made."""
    from nemo.collections import llm

    cls = getattr(llm, spec["nemo"]["config_class"])
    kwargs: dict = {}
    if options.get("transformer_impl") == "local":
        kwargs = local_overrides(cls)
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
        llm.import_ckpt(model=getattr(llm, nemo_cfg["model_class"])(config),
                        source="hf://" + str(hf_checkpoint.resolve()), output_path=target, overwrite=True)
        if not import_complete(target):
            raise RuntimeError(f"llm.import_ckpt returned but {target} lacks "
                               f"{[f for f in IMPORT_COMPLETE_FILES if not (target / f).is_file()]}")
        for item in target.iterdir():
            item.rename(tmp / item.name)
        target.rmdir()
        return {"model": model.name, "format": "nemo2", "from": str(hf_checkpoint)}

    return write_once(out_dir, f"converting {hf_checkpoint} to NeMo 2 (llm.import_ckpt)", write)
