"""What the main command marks to do again (ftscale.analyze.results.mark_for_redo), what a dry run leaves
alone, and the one line an unwritable results directory ends in; on a fixture run, without Snakemake."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from paths import FIXTURES, REPO

from ftscale.analyze.results import (
    REDO_FILE,
    TABLES_INPUTS,
    ResultsError,
    mark_for_redo,
    write_tables,
)
from ftscale.study.sweep import load_study

COMPLETE = FIXTURES / "embedded" / "complete"
RUN = "experiments/data_parallel/tiny_llama/embedded_gpus2_mbs4_gbs16_seq128"


def one_run_study(gpus: list[int]):
    cfg = {"models": ["tiny_llama"], "engine": "embedded",
           "batch": {"micro_batch": 4, "global_batch": 8, "seq_length": 128, "steps": 12, "warmup_steps": 2},
           "tracks": {"data_parallel": {"gpus": gpus, "scaling": ["weak"]}, "model_parallel": {"enabled": False}}}
    return load_study(cfg, "test", REPO)


@pytest.fixture
def finished(tmp_path, monkeypatch) -> Path:
    """A study of one finished run (the fixture) whose tables are written."""
    monkeypatch.setenv("FTSCALE_PARTICIPANT", "tester")
    shutil.copytree(COMPLETE, tmp_path / RUN)
    (tmp_path / RUN / "metrics.jsonl").write_text('{"step": 1}\n')  # the fixture keeps only the log
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "references.yaml", tmp_path / "config")
    results = tmp_path / "results"
    write_tables(one_run_study([2]), results / "scaling.csv", results / "tables.md", results / "plots",
                 results / "logs/tables.log", root=tmp_path)
    assert json.loads((tmp_path / TABLES_INPUTS).read_text())["runs"][RUN]["metrics.jsonl"]
    return tmp_path


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_nothing_to_do_on_the_finished_study(finished):
    assert mark_for_redo(one_run_study([2]), finished) == {}


def test_a_dry_run_changes_nothing(finished):
    log = finished / RUN / "train.log"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))  # damaged after it finished
    before = tree(finished)
    todo = mark_for_redo(one_run_study([2]), finished, write=False)
    assert list(todo) == [RUN] and "log says" in todo[RUN]
    assert tree(finished) == before  # no redo.txt, metrics.jsonl not moved aside

    assert mark_for_redo(one_run_study([2]), finished) == todo  # the main command: marks and moves
    assert (finished / RUN / "metrics.jsonl.stale").is_file() and RUN in (finished / REDO_FILE).read_text()


def test_run_files_changed_after_the_tables_mark_the_tables(finished):
    launch = finished / RUN / "launch.json"
    launch.write_text(launch.read_text())  # written again, the same: nothing changed
    assert mark_for_redo(one_run_study([2]), finished) == {}
    record = json.loads(launch.read_text())
    launch.write_text(json.dumps({**record, "host": "elsewhere"}))  # say, the run was redone by hand
    todo = mark_for_redo(one_run_study([2]), finished)
    assert todo == {RUN: "changed since the tables were written: launch.json"}
    assert (finished / RUN / "metrics.jsonl").is_file()  # a changed run is not redone, only its tables
    assert f"{RUN}: changed since the tables were written" in (finished / REDO_FILE).read_text()


def test_runs_the_tables_were_not_built_from_are_not_marked(finished):
    """Another config's runs (never run here): the tables' set of inputs differs, Snakemake sees to it."""
    (finished / REDO_FILE).write_text("# as it was\n")
    assert mark_for_redo(one_run_study([1, 2]), finished) == {}
    assert (finished / REDO_FILE).read_text() == "# as it was\n"


def test_a_first_run_has_nothing_to_do_again(tmp_path):
    """No tables yet and no run finished: every run is still to do, none to do *again*."""
    assert mark_for_redo(one_run_study([2]), tmp_path) == {}
    redo = tmp_path / REDO_FILE
    assert not redo.exists() or RUN not in redo.read_text()


def test_an_unwritable_results_directory_is_one_line_naming_it(finished, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(kwargs["dir"]))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(ResultsError) as err:
        mark_for_redo(one_run_study([2]), finished)
    assert str(err.value) == f"{finished / 'results'}: cannot write: Permission denied"


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_tables_that_cannot_be_written_are_one_line_and_stay_marked(finished, monkeypatch, code):
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == "tables.md":
            raise OSError(code, os.strerror(code), str(self))
        return real(self, data, *args, **kwargs)

    (finished / RUN / "train.log").write_text((finished / RUN / "train.log").read_text() + "\n")  # a new log
    monkeypatch.setattr(Path, "write_text", write_text)
    results = finished / "results"
    with pytest.raises(ResultsError) as err:
        write_tables(one_run_study([2]), results / "scaling.csv", results / "tables.md", results / "plots",
                     results / "logs/tables.log", root=finished)
    assert str(err.value) == f"{results / 'tables.md'}: cannot write the results: {os.strerror(code)}"
    monkeypatch.undo()
    # The tables' record still holds the old log: the next main command rebuilds them.
    assert mark_for_redo(one_run_study([2]), finished) == {RUN: "changed since the tables were written: train.log"}
