"""The training data of a study (the config's ``data:`` section): what each kind is, and its checks.

Kinds:

- ``corpus``: the English text shipped with ftscale (no download);
- ``mock``: random tokens, made inside each job (NeMo's MockDataModule, AutoModel's
  MockIterableDataset, the same idea in the embedded engine): benchmarks and offline machines;
- ``jsonl``: your own records, ``{"input": ..., "output": ...}`` one JSON object per line, at ``path``
  (a ``.jsonl`` file, or a directory holding ``training.jsonl`` and optionally ``validation.jsonl``);
- ``squad``: SQuAD v1.1, downloaded from the Hugging Face hub by the ``prepare_data`` rule, which runs
  where Snakemake runs (a login node with network), never on a compute node.

Every kind but ``mock`` is prepared once into ``experiments/data/<dataset>/`` (training.jsonl,
validation.jsonl: NeMo's fine-tuning format), which the jobs then read; no job downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_KINDS = ("corpus", "mock", "jsonl", "squad")
#: The record keys every prepared line has (NeMo's FineTuningDataModule format).
RECORD_KEYS = ("input", "output")


def dataset_name(data: dict) -> str | None:
    """The prepared dataset's directory name under experiments/data/, or None for ``mock``."""
    kind = data.get("kind", "corpus")
    if kind == "mock":
        return None
    if kind == "jsonl":
        return "jsonl_" + Path(str(data["path"])).name.removesuffix(".jsonl")
    return kind


def jsonl_training_file(path: Path) -> Path:
    return path / "training.jsonl" if path.is_dir() else path


def check_record(line: str, where: str) -> dict:
    """One JSON line as a record with string ``input`` and ``output``; ValueError naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in RECORD_KEYS):
        raise ValueError(f"{where}: each line must be an object with string keys {list(RECORD_KEYS)}")
    return record


def data_errors(data: dict, source: str, root: Path = Path(".")) -> list[str]:
    """Why the ``data:`` section cannot be used, each message naming the file, the key and its value."""
    kind = data.get("kind", "corpus")
    errors: list[str] = []
    path = data.get("path")
    if kind != "jsonl":
        if path is not None:
            errors.append(f"{source}: key 'data.path' = {path!r}: only data.kind 'jsonl' reads a path "
                          f"(kind is {kind!r})")
        return errors
    if not path:
        return [f"{source}: key 'data.path' is required with data.kind 'jsonl' (a .jsonl file or a directory "
                "with training.jsonl)"]
    resolved = Path(path) if Path(path).is_absolute() else Path(root) / path
    training = jsonl_training_file(resolved)
    if not training.is_file():
        what = "no training.jsonl in that directory" if resolved.is_dir() else "no such file"
        return [f"{source}: key 'data.path' = {path!r}: {what} ({training})"]
    with training.open() as lines:
        count = 0
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                check_record(line, f"{training}:{lineno}")
            except ValueError as err:
                return [f"{source}: key 'data.path' = {path!r}: {err}"]
            count += 1
    if count == 0:
        errors.append(f"{source}: key 'data.path' = {path!r}: {training} holds no records")
    return errors
