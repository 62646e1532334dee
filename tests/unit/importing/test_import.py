"""Import: synthetic weights from a seed, a local Hugging Face directory, once and read-only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ftscale.importing.checkpoint import IMPORT_MARKER, import_model
from ftscale.study.models import load_model
from ftscale.study.schema import ConfigError


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "model"
    return import_model(load_model("tiny_llama"), out)


def test_synthetic_import_is_a_real_checkpoint(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert model.config.hidden_size == 128 and model.config.num_key_value_heads == 4
    assert len(tok) == 1024
    assert tok.decode(tok("Assignment statements")["input_ids"]) == "Assignment statements"
    marker = json.loads((tiny_ckpt / IMPORT_MARKER).read_text())
    assert marker["kind"] == "synthetic" and marker["seed"] == 0


def test_synthetic_import_is_deterministic(tiny_ckpt, tmp_path):
    again = import_model(load_model("tiny_llama"), tmp_path / "model")
    assert (again / "model.safetensors").read_bytes() == (tiny_ckpt / "model.safetensors").read_bytes()


def test_checkpoint_is_read_only_and_never_redone(tiny_ckpt):
    assert not any(p.stat().st_mode & 0o222 for p in [tiny_ckpt, *tiny_ckpt.iterdir()])
    before = (tiny_ckpt / IMPORT_MARKER).stat().st_mtime_ns
    import_model(load_model("tiny_llama"), tiny_ckpt)
    assert (tiny_ckpt / IMPORT_MARKER).stat().st_mtime_ns == before


def test_interrupted_import_is_redone(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "half-written.safetensors").write_text("x")
    import_model(load_model("tiny_llama"), out)
    assert (out / IMPORT_MARKER).is_file() and not (out / "half-written.safetensors").exists()


def _local_model(tmp_path: Path, repo: Path, source: str, **arch_changes) -> Path:
    shutil.copytree(repo / "config", tmp_path / "config")
    spec = yaml.safe_load((repo / "models/tiny_llama/model.yaml").read_text())
    spec.update(name="local_llama", source=source, weights="pretrained")
    spec["architecture"].update(arch_changes)
    (tmp_path / "models/local_llama").mkdir(parents=True)
    (tmp_path / "models/local_llama/model.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_local_hf_directory_source(tiny_ckpt, tmp_path, repo):
    shutil.copytree(tiny_ckpt, tmp_path / "hf" / "llama")
    root = _local_model(tmp_path, repo, "hf/llama")
    out = import_model(load_model("local_llama", root), root / "models/local_llama/model", root=root)
    assert (out / "model.safetensors").read_bytes() == (tiny_ckpt / "model.safetensors").read_bytes()
    assert json.loads((out / IMPORT_MARKER).read_text())["kind"] == "local"


def test_local_source_whose_architecture_differs_is_rejected(tiny_ckpt, tmp_path, repo):
    shutil.copytree(tiny_ckpt, tmp_path / "hf" / "llama")
    root = _local_model(tmp_path, repo, "hf/llama", hidden_size=256)
    with pytest.raises(ConfigError, match=r"key 'architecture.hidden_size' = 256 but the source's .*config.json says 128"):
        import_model(load_model("local_llama", root), root / "models/local_llama/model", root=root)
    assert not (root / "models/local_llama/model").exists()


def test_gated_hub_model_needs_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="gated repository: set HF_TOKEN"):
        import_model(load_model("llama31_8b"), tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_synthetic_at_load_writes_no_weights_and_builds_the_same_model_each_time(tmp_path, repo):
    import torch

    from ftscale.importing.checkpoint import load_for_training

    shutil.copytree(repo / "config", tmp_path / "config")
    spec = yaml.safe_load((repo / "models/tiny_mixtral/model.yaml").read_text())
    spec["synthetic_at_load"] = True
    (tmp_path / "models/tiny_mixtral").mkdir(parents=True)
    (tmp_path / "models/tiny_mixtral/model.yaml").write_text(yaml.safe_dump(spec))
    out = import_model(load_model("tiny_mixtral", tmp_path), tmp_path / "model", root=tmp_path)
    assert not list(out.glob("*.safetensors")) and (out / "config.json").is_file()
    a = load_for_training(out, torch.float32, "cpu")
    b = load_for_training(out, torch.float32, "cpu")
    assert a.config.num_local_experts == 4
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
