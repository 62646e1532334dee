"""Synthetic models: seeded random weights of a model.yaml's architecture, and a small BPE tokenizer
trained on the shipped corpus, so that every stage runs with no download."""

from __future__ import annotations

import json
from pathlib import Path

from ftscale.study.models import Model
from ftscale.study.paths import CORPUS


def hf_config(arch: dict):  # -> transformers.PretrainedConfig
    """The transformers config of an architecture block."""
    from transformers import LlamaConfig, MixtralConfig

    kwargs = {k: v for k, v in arch.items() if k != "type"}
    if arch["type"] == "llama":
        return LlamaConfig(**kwargs)
    # Router load-balancing loss off: it would make losses depend on how experts are sharded.
    return MixtralConfig(**kwargs, output_router_logits=False)


def train_tokenizer(vocab_size: int, corpus: Path = CORPUS):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on the shipped corpus (deterministic, ~0.1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([corpus.read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def readable_by_transformers_4(directory: Path) -> None:
    """Makes an HF directory written by transformers 5 read the same under transformers 4.x, which NeMo 2.7.3
    pins (its HF importer reads ``config.rope_theta``): the tokenizer class gets the name both versions know,
    and the RoPE settings are also written in the 4.x keys. Published checkpoints carry both already."""
    tokenizer_config = directory / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters")
    if rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", rope)
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def write_synthetic(model: Model, tmp: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    arch = model.arch
    config = hf_config(arch)
    if model.spec["synthetic_at_load"]:
        config.save_pretrained(tmp)
        train_tokenizer(arch["vocab_size"]).save_pretrained(tmp)
        readable_by_transformers_4(tmp)
        return {"kind": "synthetic", "seed": model.spec["seed"], "at_load": True}
    torch.manual_seed(model.spec["seed"])
    # Large shapes are made in bf16 on the GPU (an 8B model in fp32 on the host would need 32 GB);
    # small ones in fp32, where the embedded default trains.
    dtype = torch.bfloat16 if arch["hidden_size"] >= 1024 else torch.float32
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    net.save_pretrained(tmp, safe_serialization=True)
    train_tokenizer(arch["vocab_size"]).save_pretrained(tmp)
    readable_by_transformers_4(tmp)
    return {"kind": "synthetic", "seed": model.spec["seed"], "dtype": str(dtype).removeprefix("torch.")}
