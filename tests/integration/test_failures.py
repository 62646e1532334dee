"""A failed run keeps its row (--keep-going), and the next invocation reruns only what failed."""

from __future__ import annotations

import csv
import shutil
import stat

import yaml
from workflow import copy_workflow, snakemake

from ftscale.importing.checkpoint import import_model
from ftscale.study.models import load_model

CONFIG = "tests/config/failure.yaml"


def test_failed_run_is_reported_then_rerun_alone(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    good = import_model(load_model("tiny_llama"), tmp_path / "good")
    broken = tmp_path / "broken_src"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").chmod(stat.S_IWUSR | stat.S_IRUSR)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    spec = yaml.safe_load((work / "models/tiny_llama/model.yaml").read_text())
    spec.update(name="broken_llama", source=str(broken), weights="pretrained")
    (work / "models/broken_llama").mkdir()
    (work / "models/broken_llama/model.yaml").write_text(yaml.safe_dump(spec))

    first = snakemake(work, "results/tables.md", "--cores", "2", "--keep-going", "--configfile", CONFIG, check=False)
    assert first.returncode != 0
    rows = {r["model"]: r for r in csv.DictReader((work / "results/scaling.csv").open())}
    assert rows["tiny_llama"]["status"] == "ok"
    assert rows["broken_llama"]["status"] == "failed" and rows["broken_llama"]["reason"]
    assert rows["broken_llama"]["step_time_s"] == ""
    assert "failed" in (work / "results/tables.md").read_text()
    run_dir = work / "experiments/data_parallel/broken_llama/embedded_gpus1_mbs2_gbs2_seq32"
    assert (run_dir / "train.log").is_file() and not (run_dir / "metrics.jsonl").exists()

    # The failure goes away (say, a file system hiccup): put good weights in place.
    ckpt = work / "models/broken_llama/model"
    ckpt.chmod(0o755)
    (ckpt / "model.safetensors").chmod(0o644)
    shutil.copy(good / "model.safetensors", ckpt / "model.safetensors")

    dry = snakemake(work, "results/tables.md", "-n", "--configfile", CONFIG)
    jobs = dry.stdout + dry.stderr
    planned = [line.split(":", 1)[1].strip() for line in jobs.splitlines() if line.strip().startswith("output:")]
    trained = [out for out in planned if out.endswith("metrics.jsonl")]
    assert trained == ["experiments/data_parallel/broken_llama/embedded_gpus1_mbs2_gbs2_seq32/metrics.jsonl"]
    second = snakemake(work, "results/tables.md", "--cores", "2", "--configfile", CONFIG)
    launched = [line for line in (second.stdout + second.stderr).splitlines()
                if line.startswith("[ftscale] embedded_gpus") and "(log: " in line]
    assert len(launched) == 1 and "experiments/data_parallel/broken_llama/" in launched[0]
    rows = {r["model"]: r for r in csv.DictReader((work / "results/scaling.csv").open())}
    assert rows["broken_llama"]["status"] == "ok"
