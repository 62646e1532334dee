"""The automodel engine's recipe tree (ftscale.engines.automodel.train.automodel_config) and the parsing of
NeMo AutoModel's step line. The tree is plain data: AutoModel itself is needed only on the GPU."""

from __future__ import annotations

import os

import pytest
from runs import make_run

from ftscale.engines.automodel.train import automodel_config
from ftscale.run.logformat import parse_steps
from ftscale.study.models import load_model
from ftscale.study.run import Run

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]}


def run_dict(**changes) -> Run:
    """A one-GPU AutoModel run of the synthetic 8B, with ``changes``."""
    return make_run(**{**dict(model="llama31_8b_synthetic_files", engine="automodel", dp=1, micro_batch=2,
                              global_batch=32, seq_length=4096, steps=20, warmup_steps=5, learning_rate=1e-5,
                              seed=42, precision="bf16", device="cuda", lora=LORA, data={"kind": "mock"}),
                       **changes})


def test_tree_carries_the_run(repo):
    spec = load_model("llama31_8b_synthetic_files", repo).spec
    tree = automodel_config(run_dict(), spec)
    assert tree["step_scheduler"]["global_batch_size"] == 32 and tree["step_scheduler"]["local_batch_size"] == 2
    assert tree["step_scheduler"]["max_steps"] == 20
    assert tree["model"]["pretrained_model_name_or_path"] == os.path.abspath("models/llama31_8b_synthetic_files/model")
    assert tree["peft"]["target_modules"] == ["*." + t for t in LORA["targets"]]
    assert (tree["peft"]["dim"], tree["peft"]["alpha"]) == (8, 16)
    assert tree["dataset"]["seq_len"] == 4096 and tree["dataset"]["vocab_size"] == 128256
    assert tree["dataset"]["batch_size"] == 2 and tree["dataloader"]["batch_size"] is None
    assert tree["optimizer"]["lr"] == 1e-5 and tree["checkpoint"]["enabled"] is False


def test_prepared_data_and_nemo_lora_names(repo):
    spec = load_model("llama31_8b_synthetic_files", repo).spec
    run = run_dict(data={"kind": "corpus"}, lora={**LORA, "targets": ["linear_qkv", "linear_proj"]})
    tree = automodel_config(run, spec)
    assert tree["dataset"]["path_or_dataset_id"] == os.path.abspath("experiments/data/corpus/training.jsonl")
    assert tree["dataset"]["column_mapping"] == {"context": "input", "answer": "output"}
    assert tree["peft"]["target_modules"] == ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj"]


def test_invalid_runs_are_refused_with_the_reason(repo):
    spec = load_model("llama31_8b_synthetic_files", repo).spec
    with pytest.raises(ValueError, match="automodel engine runs the data_parallel track"):
        automodel_config(run_dict(track="model_parallel", tp=2, gpus=2, lora=None, global_batch=32), spec)
    with pytest.raises(ValueError, match="synthetic_at_load"):
        automodel_config(run_dict(model="llama31_8b_synthetic"), load_model("llama31_8b_synthetic", repo).spec)


def test_automodel_step_lines_parse_into_records():
    log = (
        "[ftscale] layout world=1 tp=1 ep=1 dp=1 sp=0 micro_batch=2 global_batch=32 seq_length=4096 steps=3\n"
        "2026-12-01 10:00:00 | INFO | root | step 0 | epoch 0 | loss 11.9312 | grad_norm 1.2000 | lr 1.00e-05 | "
        "mem 48.80 GiB | tps 9000.00(9000.00/gpu) | num_label_tokens 131040\n"
        "2026-12-01 10:00:13 | INFO | root | step 1 | epoch 0 | loss 11.5000 | grad_norm 1.1000 | lr 1.00e-05 | "
        "mem 49.00 GiB | tps 10240.00(10240.00/gpu) | num_label_tokens 131040\n"
    )
    steps, layout, _ = parse_steps(log)
    assert [s["step"] for s in steps] == [1, 2] and layout["global_batch"] == 32
    assert steps[1]["step_time_s"] == pytest.approx(32 * 4096 / 10240.0)
    assert steps[1]["peak_mem_mib"] == pytest.approx(49.0 * 1024) and steps[1]["loss"] == 11.5
