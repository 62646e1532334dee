"""Every run of the workshop plan (config/workshop.yaml) against the real NeMo 2.7.3 recipes.

NeMo lives in its own virtual environment (.ci/nemo-venv, made by .ci/setup at .venv-nemo): this test
writes the plan as the workflow expands it and runs tests/nemo there. In CI a missing NeMo venv is
a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from ftscale.study.sweep import load_study


def nemo_python(repo) -> str | None:
    path = os.environ.get("FTSCALE_NEMO_PYTHON") or str(repo / ".venv-nemo" / "bin" / "python")
    return path if os.path.exists(path) else None


def require_nemo_python(repo) -> str:
    """The NeMo venv's interpreter; without one, a failure in CI and a skip elsewhere."""
    python = nemo_python(repo)
    if python is None:
        msg = "no NeMo venv: run .ci/nemo-venv .venv-nemo (or set FTSCALE_NEMO_PYTHON)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return python


def workshop_study(repo):
    cfg = yaml.safe_load((repo / "config/workshop.yaml").read_text())
    cfg["container"] = "nvcr.io/nvidia/nemo:test"
    return load_study(cfg, "config/workshop.yaml", root=repo)


def test_workshop_plan_has_every_run(repo):
    study = workshop_study(repo)
    names = sorted(f"{r.model}/{r.track}/{r.name.split('_mbs')[0]}" for r in study.runs)
    assert names == sorted(
        [f"llama31_8b/data_parallel/nemo_gpus{g}" for g in (1, 2, 4, 8)]
        + [f"mixtral_8x7b/data_parallel/nemo_gpus{g}{'' if g == 1 else f'_ep{g}'}" for g in (1, 2, 4, 8)]
        + [f"llama31_8b/model_parallel/nemo_tp{t}_ep1_dp1_sp" for t in (2, 4, 8)]
        + [f"mixtral_8x7b/model_parallel/nemo_{n}" for n in ("tp1_ep2_dp1", "tp2_ep2_dp1_sp", "tp1_ep4_dp1",
                                                              "tp2_ep4_dp1_sp", "tp1_ep8_dp1", "tp1_pp2_ep8_dp1",
                                                              "tp1_ep8_dp2", "tp1_pp2_ep8_dp2", "tp1_pp4_ep8_dp1")]
    )
    assert all(r.name.endswith("_bf16") for r in study.runs)
    assert all(r.lora for r in study.runs_of("data_parallel"))
    assert not any(r.lora for r in study.runs_of("model_parallel"))


def test_every_workshop_run_builds_a_real_nemo_recipe(repo, tmp_path):
    python = require_nemo_python(repo)
    study = workshop_study(repo)
    plan = {"models": {name: m.spec for name, m in study.models.items()},
            "runs": [r.to_dict() for r in study.runs]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, FTSCALE_NEMO_PLAN=str(tmp_path / "plan.json"), PYTHONPATH=str(repo / "scripts"))
    proc = subprocess.run([python, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(repo / "tests/nemo")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    sys.stdout.write(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for run in plan["runs"]:  # each run of the plan was built and validated by NeMo itself
        case = f"{run['model']}-{run['track']}-{run['name']}"
        for test in ("test_recipe_carries_the_run", "test_recipe_builds_and_passes_nemo_validation"):
            assert f"{test}[{case}] PASSED" in proc.stdout, (test, case)


def test_synthetic_files_read_the_same_under_nemos_transformers(repo, tmp_path):
    """The import writes HF files with transformers 5; NeMo 2.7.3 reads them with its pinned 4.57: the
    tokenizer loads and the RoPE base is the model's (4.x reads ``rope_theta``, 5.x ``rope_parameters``)."""
    from ftscale.importing.synthetic import write_synthetic
    from ftscale.study.models import load_model

    python = require_nemo_python(repo)
    model = load_model("tiny_llama", repo)
    model.arch["rope_theta"] = 500000.0  # LLaMA 3.1's, not transformers 4.x's default of 10000
    write_synthetic(model, tmp_path, "cpu")
    read = ("import sys, transformers; from transformers import AutoConfig, AutoTokenizer; "
            "c = AutoConfig.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(transformers.__version__, c.rope_theta, type(t).__name__, t('hello world')['input_ids'][:2])")
    proc = subprocess.run([python, "-c", read, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, theta, tokenizer, _ = proc.stdout.split(maxsplit=3)
    assert version.startswith("4.") and float(theta) == model.arch["rope_theta"]
    assert tokenizer == "PreTrainedTokenizerFast"
