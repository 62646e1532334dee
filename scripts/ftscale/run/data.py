"""The training data: the shipped corpus, tokenized once, cut into deterministic batches.

The global batch of a step is the same whatever the number of ranks, so runs that differ only in
their parallel layout train on the same sequences (and, in fp32, give the same losses).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftscale.study.paths import CORPUS


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
