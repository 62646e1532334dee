"""Import: turn a model description (models/<name>/model.yaml) into a checkpoint directory, once.

The checkpoint is written to a temporary sibling and renamed into place only when complete, then
made read-only: every experiment reads it, none writes it. A directory that already holds a
complete import (``IMPORT.json`` written last) is never redone.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Callable

from ftscale.importing.synthetic import write_synthetic
from ftscale.study.models import Model
from ftscale.study.schema import ConfigError

IMPORT_MARKER = "IMPORT.json"
# model.yaml architecture keys -> the Hugging Face config.json keys they must match.
_ARCH_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "num_local_experts", "num_experts_per_tok",
)


def load_for_training(checkpoint: str | Path, dtype, device):  # -> PreTrainedModel
    """The checkpoint's model on ``device``: weights from the files, or, for a synthetic
    at-load import, created from its seed directly on the device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    marker = json.loads((checkpoint / IMPORT_MARKER).read_text()) if (checkpoint / IMPORT_MARKER).is_file() else {}
    if marker.get("at_load"):
        config = AutoConfig.from_pretrained(checkpoint)
        config._attn_implementation = "sdpa"
        torch.manual_seed(marker["seed"])
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")


def is_imported(out_dir: Path) -> bool:
    return (out_dir / IMPORT_MARKER).is_file()


def _check_hf_dir(model: Model, directory: Path) -> None:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{model.yaml_path}: key 'source' = {model.spec['source']!r}: no config.json in {directory}")
    cfg = json.loads(cfg_path.read_text())
    for key in _ARCH_KEYS:
        if key in model.arch and key in cfg and cfg[key] != model.arch[key]:
            raise ConfigError(
                f"{model.yaml_path}: key 'architecture.{key}' = {model.arch[key]} but the source's "
                f"{cfg_path} says {cfg[key]}"
            )


def _write_local(model: Model, tmp: Path, root: Path) -> dict:
    src = model.local_source(root)
    _check_hf_dir(model, src)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    return {"kind": "local", "path": str(src)}


def _write_hub(model: Model, tmp: Path) -> dict:
    repo = model.spec["source"].removeprefix("hf://")
    token = os.environ.get("HF_TOKEN") or None
    if model.spec["gated"] and not token:
        raise ConfigError(
            f"{model.yaml_path}: key 'source' = {model.spec['source']!r} is a gated repository: "
            "set HF_TOKEN in the environment (it is never written to a file or a log)"
        )
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=repo, local_dir=tmp, token=token,
                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    _check_hf_dir(model, tmp)
    return {"kind": "hub", "repo": repo}


def make_read_only(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _remove_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(path)


def write_once(out_dir: Path, what: str, write: Callable[[Path], dict]) -> Path:
    """Write a checkpoint into ``out_dir`` once: ``write(tmp)`` fills a temporary sibling and returns
    what the marker records; the directory is renamed into place only when complete, then made
    read-only. A directory that already holds a complete import is kept as it is."""
    out_dir = Path(out_dir)
    if is_imported(out_dir):
        print(f"[ftscale] {out_dir} already holds a complete import; nothing to do", flush=True)
        return out_dir
    if out_dir.exists():
        # Left over by an interrupted import (no marker): it never looked complete, so redo it.
        _remove_tree(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    if tmp.exists():
        _remove_tree(tmp)
    tmp.mkdir(parents=True)
    start = time.time()
    print(f"[ftscale] {what} into {out_dir}", flush=True)
    try:
        info = write(tmp)
        import torch
        import transformers

        marker = {
            **info,
            "seconds": round(time.time() - start, 2),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.rename(out_dir)
    except BaseException:
        _remove_tree(tmp)
        raise
    make_read_only(out_dir)
    print(f"[ftscale] done in {time.time() - start:.1f} s; {out_dir} is now read-only", flush=True)
    return out_dir


def import_model(model: Model, out_dir: Path, root: Path = Path("."), device: str = "auto") -> Path:
    """Import ``model`` as a Hugging Face checkpoint into ``out_dir`` unless it already holds one."""

    def write(tmp: Path) -> dict:
        if model.source_kind() == "synthetic":
            import torch

            dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            info = write_synthetic(model, tmp, dev)
        elif model.source_kind() == "local":
            info = _write_local(model, tmp, root)
        else:
            info = _write_hub(model, tmp)
        return {"model": model.name, "source": model.spec["source"], "weights": model.spec["weights"],
                "format": "huggingface", **info}

    return write_once(out_dir, f"importing {model.name} from {model.spec['source']}", write)
