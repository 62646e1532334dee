"""The data stage (ftscale.study.data, ftscale.run.data): every data setting is checked before any job,
each kind but mock is prepared once into experiments/data/<dataset>/, and every engine reads it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from runs import make_run

from ftscale.run.data import corpus_records, dataset_tokens, prepare_dataset, squad_record
from ftscale.study.data import data_errors, dataset_name
from ftscale.study.schema import ConfigError
from ftscale.study.sweep import load_study


def study(cfg, root):
    return load_study(cfg, source="config/my.yaml", root=root)


def with_data(default_config, data: dict, engine="embedded") -> dict:
    cfg = copy.deepcopy(default_config)
    cfg["data"] = data
    cfg["engine"] = engine
    return cfg


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("data, words", [
    ({"kind": "jsonl"}, "key 'data.path' is required with data.kind 'jsonl'"),
    ({"kind": "jsonl", "path": "no/such.jsonl"}, "key 'data.path' = 'no/such.jsonl': no such file"),
    ({"kind": "corpus", "path": "x.jsonl"}, "key 'data.path' = 'x.jsonl': only data.kind 'jsonl' reads a path"),
    ({"kind": "squad", "path": "x.jsonl"}, "only data.kind 'jsonl' reads a path (kind is 'squad')"),
])
def test_bad_data_settings_are_rejected_before_any_job(default_config, repo, data, words):
    with pytest.raises(ConfigError) as err:
        study(with_data(default_config, data), repo)
    assert "config/my.yaml" in str(err.value) and words in str(err.value)


def test_schema_rejects_an_unknown_kind(default_config, repo):
    with pytest.raises(ConfigError) as err:
        study(with_data(default_config, {"kind": "parquet"}), repo)
    assert "data" in str(err.value) and "parquet" in str(err.value)


def test_a_bad_record_is_named_by_file_and_line(tmp_path):
    good = {"input": "a", "output": "b"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, '{"input": "a"', good])
    [message] = data_errors({"kind": "jsonl", "path": str(path)}, "config/my.yaml")
    assert f"{path}:2: not JSON" in message and "key 'data.path'" in message
    write_jsonl(path, [good, {"input": "a", "answer": "b"}])
    [message] = data_errors({"kind": "jsonl", "path": str(path)}, "config/my.yaml")
    assert f"{path}:2: each line must be an object with string keys ['input', 'output']" in message
    path.write_text("\n")
    assert "holds no records" in data_errors({"kind": "jsonl", "path": str(path)}, "c.yaml")[0]
    (tmp_path / "dir").mkdir()
    assert "no training.jsonl in that directory" in data_errors({"kind": "jsonl", "path": str(tmp_path / "dir")},
                                                                 "c.yaml")[0]


def test_runs_read_the_prepared_dataset_and_mock_needs_none(default_config, repo, tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"input": "q", "output": "a"}] * 3)
    runs = study(with_data(default_config, {"kind": "jsonl", "path": str(path)}), repo).runs
    assert {r.dataset_dir for r in runs} == {"experiments/data/jsonl_mine"}
    assert {r.to_dict()["dataset_dir"] for r in runs} == {"experiments/data/jsonl_mine"}
    assert {r.dataset_dir for r in study(with_data(default_config, {"kind": "mock"}), repo).runs} == {None}
    # The embedded engine reads the shipped corpus itself; the other engines read it prepared.
    assert {r.dataset_dir for r in study(default_config, repo).runs} == {None}
    assert dataset_name({"kind": "squad"}) == "squad" and dataset_name({"kind": "mock"}) is None


def test_prepare_corpus_and_jsonl(tmp_path):
    out = prepare_dataset({"kind": "corpus", "validation_fraction": 0.1}, tmp_path / "corpus")
    training = [json.loads(x) for x in (out / "training.jsonl").read_text().splitlines()]
    validation = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert len(training) > 100 and len(validation) == round((len(training) + len(validation)) * 0.1)
    assert training[0] == corpus_records()[0] or training[0] in corpus_records()
    info = json.loads((out / "DATASET.json").read_text())
    assert info["kind"] == "corpus" and info["records"] == {"training": len(training), "validation": len(validation)}
    # A directory with its own validation split keeps it; the prepared copy is complete or absent.
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "training.jsonl", [{"input": f"q{i}", "output": "a"} for i in range(5)])
    write_jsonl(src / "validation.jsonl", [{"input": "v", "output": "a"}])
    out = prepare_dataset({"kind": "jsonl", "path": str(src)}, tmp_path / "mine")
    assert len((out / "training.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "validation.jsonl").read_text()) == {"input": "v", "output": "a"}
    assert not list(tmp_path.glob("*.partial-*"))


def test_squad_rows_become_records():
    row = {"context": "Paris is in France.", "question": "Where is Paris?", "answers": {"text": ["France", "FR"]}}
    assert squad_record(row) == {"input": "Context: Paris is in France. Question: Where is Paris? Answer:",
                                 "output": "France"}


def test_embedded_tokens_for_each_kind(tmp_path, monkeypatch):
    from ftscale.importing.synthetic import train_tokenizer

    tok = train_tokenizer(512)
    base = {"global_batch": 2, "seq_length": 16, "seed": 3}
    corpus = dataset_tokens(make_run(**base, data={"kind": "corpus"}), tok, 512)
    mock = dataset_tokens(make_run(**base, data={"kind": "mock"}), tok, 512)
    assert corpus.numel() > 1000 and int(mock.max()) < 512
    assert torch.equal(mock, dataset_tokens(make_run(**base, data={"kind": "mock"}), tok, 512))  # seeded
    monkeypatch.chdir(tmp_path)  # the run reads its prepared dataset under experiments/data/
    run = make_run(**base, data={"kind": "jsonl", "path": "mine.jsonl"})
    out = Path(run.dataset_dir)
    out.mkdir(parents=True)
    write_jsonl(out / "training.jsonl", [{"input": "hello", "output": "world"}] * 4)
    tokens = dataset_tokens(run, tok, 512)
    assert tok.decode(tokens[:8].tolist()).startswith("hello world")
