"""The training data: the shipped corpus, tokenized once, cut into deterministic batches.

The global batch of a step is the same whatever the number of ranks, so runs that differ only in
their parallel layout train on the same sequences (and, in fp32, give the same losses).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftscale.study.paths import CORPUS
from ftscale.study.run import Run


def corpus_tokens(tokenizer, corpus: Path = CORPUS) -> torch.Tensor:
    text = "\n".join(line for line in corpus.read_text().splitlines() if not line.startswith("# "))
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def global_batch(tokens: torch.Tensor, step: int, size: int, seq_length: int, seed: int) -> torch.Tensor:
    """``size`` sequences of ``seq_length`` tokens for optimizer step ``step`` ([size, seq_length]).

    Sequences start at offsets drawn from a generator seeded by (seed, step); a corpus shorter than a
    sequence is repeated.
    """
    if tokens.numel() <= seq_length:
        tokens = tokens.repeat(seq_length // max(tokens.numel(), 1) + 2)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_length, (size,), generator=gen)
    return torch.stack([tokens[s : s + seq_length] for s in starts.tolist()])


def micro_batches(batch: torch.Tensor, micro_batch: int, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """The micro-batches of one data-parallel rank: sequences rank, rank + dp, ... in chunks."""
    mine = batch[dp_rank::dp_size]
    return list(mine.split(micro_batch))


# ----------------------------------------------------------------------------------------------
# Datasets other than the corpus (see ftscale.study.data): prepared once, read by every job
# ----------------------------------------------------------------------------------------------

SQUAD_REPO = "rajpurkar/squad"
SQUAD_FILES = {"training": "plain_text/train-00000-of-00001.parquet",
               "validation": "plain_text/validation-00000-of-00001.parquet"}


def squad_record(row: dict) -> dict:
    """A SQuAD row as a fine-tuning record, in NeMo's SQuAD prompt format (first answer)."""
    return {"input": f"Context: {row['context']} Question: {row['question']} Answer:",
            "output": str(row["answers"]["text"][0])}


def corpus_records(corpus: Path = CORPUS) -> list[dict]:
    """The shipped corpus as records: each paragraph's first line is the input, the rest the output."""
    text = "\n".join(line for line in corpus.read_text().splitlines() if not line.startswith("# "))
    records = []
    for paragraph in text.split("\n\n"):
        lines = [line for line in paragraph.strip().splitlines() if line.strip()]
        if len(lines) >= 2:
            records.append({"input": lines[0], "output": " ".join(lines[1:])})
    return records


def read_records(path: Path) -> list[dict]:
    from ftscale.study.data import check_record

    return [check_record(line, f"{path}:{i}") for i, line in enumerate(path.read_text().splitlines(), start=1)
            if line.strip()]


def split_records(records: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded hold-out of ``fraction`` of the records (at least one) for validation."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(len(records) * fraction))
    validation = sorted(order[:held])
    keep = sorted(order[held:])
    return [records[i] for i in keep], [records[i] for i in validation]


def squad_splits(cache_dir: Path | None = None) -> dict[str, list[dict]]:
    """SQuAD from the Hugging Face hub (needs network: the prepare_data rule runs on the login node)."""
    import pandas as pd
    from huggingface_hub import hf_hub_download

    out = {}
    for split, filename in SQUAD_FILES.items():
        local = hf_hub_download(SQUAD_REPO, filename, repo_type="dataset", cache_dir=cache_dir)
        out[split] = [squad_record(row) for row in pd.read_parquet(local).to_dict("records")]
    return out


def dataset_splits(data: dict, root: Path = Path(".")) -> tuple[dict[str, list[dict]], dict]:
    """The records of the ``data:`` section's dataset, by split, and what they were made from."""
    from ftscale.study.data import jsonl_training_file

    kind = data.get("kind", "corpus")
    fraction = data.get("validation_fraction", 0.05)
    if kind == "corpus":
        training, validation = split_records(corpus_records(), fraction)
        return {"training": training, "validation": validation}, {"kind": kind, "source": str(CORPUS)}
    if kind == "squad":
        return squad_splits(), {"kind": kind, "source": f"hf://datasets/{SQUAD_REPO}"}
    if kind == "jsonl":
        given = Path(data["path"])
        path = given if given.is_absolute() else Path(root) / given
        training_file = jsonl_training_file(path)
        records = read_records(training_file)
        validation_file = path / "validation.jsonl" if path.is_dir() else None
        if validation_file is not None and validation_file.is_file():
            splits = {"training": records, "validation": read_records(validation_file)}
        else:
            training, validation = split_records(records, fraction)
            splits = {"training": training, "validation": validation}
        return splits, {"kind": kind, "source": str(training_file.resolve())}
    raise ValueError(f"data.kind = {kind!r}: nothing to prepare (mock data is made inside each job)")


def prepare_dataset(data: dict, out_dir: Path, root: Path = Path(".")) -> Path:
    """Write the dataset into ``out_dir`` (training.jsonl, validation.jsonl, DATASET.json last),
    through a temporary sibling renamed into place, so a half-written dataset is never read."""
    import json
    import os
    import shutil
    import time

    from ftscale.study.paths import DATA_FILES

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits, info = dataset_splits(data, root)
        for split, records in splits.items():
            with (tmp / DATA_FILES[split]).open("w") as out:
                for record in records:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
            print(f"[ftscale] {split}: {len(records)} records", flush=True)
        info.update(records={split: len(r) for split, r in splits.items()}, date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (tmp / DATA_FILES["info"]).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def dataset_tokens(run: Run, tokenizer, vocab_size: int) -> torch.Tensor:
    """The token stream the embedded engine samples its batches from, for the run's data kind:
    the corpus, the prepared records (input and output joined, one record per line), or, for mock
    data, seeded random tokens (as NeMo's and AutoModel's mock datasets)."""
    kind = (run.data or {}).get("kind", "corpus")
    if kind == "corpus":
        return corpus_tokens(tokenizer)
    if kind == "mock":
        length = max(run.global_batch * run.seq_length * 4, 1 << 16)
        return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(run.seed))
    from ftscale.study.paths import DATA_FILES

    records = read_records(Path(run.dataset_dir) / DATA_FILES["training"])
    text = "\n".join(f"{r['input']} {r['output']}" for r in records)
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def prepare_dataset_logged(data: dict, out_dir: str | Path, log: str | Path) -> Path:
    """``prepare_dataset`` for the prepare_data rule, its output (and any error) in ``log``."""
    import contextlib
    import traceback

    with open(log, "w") as out, contextlib.redirect_stdout(out):
        try:
            return prepare_dataset(data, Path(out_dir))
        except Exception:
            traceback.print_exc(file=out)
            raise
