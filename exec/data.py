"""Token batches for the executor: synthetic (seeded) or bytes of a local text file.

Both sources answer ``batch(step, batch_size) -> LongTensor [B, seq_length + 1]``, a pure
function of (source, seed, step): every rank of a pipeline (the first stage needs the
inputs, the last the targets) can fetch the same batch without communicating. Split a
batch with `split_batch` into inputs ``[:, :-1]`` and targets ``[:, 1:]``.

- `SyntheticTokens`: sequences of a seeded random Markov chain over the vocabulary in
  which every token has `branching` possible successors, so a model can learn far below
  the uniform loss ln(vocab): the floor is at most ln(branching).
- `ByteFileTokens` (``--data PATH``): the file's bytes are the token ids 0..255
  (`ByteTokenizer`), cut into sequences of seq_length + 1 bytes with stride seq_length (so
  every byte after the first is a target exactly once per epoch); batches draw sequences in a
  seeded order, reshuffled every epoch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from aptmoe.exec.model import stable_seed

BYTE_VOCAB = 256


class ByteTokenizer:
    """Bytes are tokens: ids 0..255, UTF-8 for text."""

    vocab_size = BYTE_VOCAB

    @staticmethod
    def encode(data: bytes | bytearray | str) -> torch.Tensor:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        return torch.tensor(list(raw), dtype=torch.long)

    @staticmethod
    def decode(ids: torch.Tensor) -> bytes:
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= BYTE_VOCAB):
            raise ValueError(f"byte token ids must be in 0..255; got {int(ids.min())}..{int(ids.max())}")
        return bytes(ids.tolist())


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L+1] sequences -> inputs [B, L], targets [B, L] (the next token of each input)."""
    return batch[:, :-1], batch[:, 1:]


def _check_sizes(batch_size: int, step: int) -> None:
    if batch_size < 1 or step < 0:
        raise ValueError(f"need batch_size >= 1 and step >= 0; got {batch_size}, {step}")


class SyntheticTokens:
    """Seeded Markov-chain token sequences (see the module doc)."""

    def __init__(self, seq_length: int, *, vocab_size: int = BYTE_VOCAB, seed: int = 42, branching: int = 4) -> None:
        if seq_length < 1 or vocab_size < 2 or not 1 <= branching <= vocab_size:
            raise ValueError(f"need seq_length >= 1, vocab_size >= 2, 1 <= branching <= vocab_size; got "
                             f"{seq_length}, {vocab_size}, {branching}")
        self.seq_length, self.vocab_size, self.seed, self.branching = seq_length, vocab_size, seed, branching
        g = torch.Generator().manual_seed(stable_seed("synthetic-table", seed))
        # each token's successors: `branching` distinct tokens
        self.successors = torch.stack([torch.randperm(vocab_size, generator=g)[:branching]
                                       for _ in range(vocab_size)])

    @property
    def entropy_floor(self) -> float:
        """The chain's per-token entropy (nats): the best a model can do after the first token."""
        return math.log(self.branching)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        _check_sizes(batch_size, step)
        g = torch.Generator().manual_seed(stable_seed("synthetic-batch", self.seed, step))
        out = torch.empty(batch_size, self.seq_length + 1, dtype=torch.long)
        out[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=g)
        choice = torch.randint(self.branching, (batch_size, self.seq_length), generator=g)
        for t in range(self.seq_length):
            out[:, t + 1] = self.successors[out[:, t], choice[:, t]]
        return out


class ByteFileTokens:
    """Sequences of a local file's bytes (see the module doc)."""

    vocab_size = BYTE_VOCAB

    def __init__(self, path: str | os.PathLike, seq_length: int, *, seed: int = 42) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        p = Path(path)
        if not p.exists():
            raise ValueError(f"--data {p}: no such file")
        if not p.is_file():
            raise ValueError(f"--data {p}: not a regular file")
        raw = p.read_bytes()
        if not raw:
            raise ValueError(f"--data {p}: the file is empty; give a text file of at least "
                             f"{seq_length + 1} bytes (one sequence of --seq_length {seq_length} plus its target)")
        if len(raw) < seq_length + 1:
            raise ValueError(f"--data {p}: {len(raw)} bytes is shorter than one sequence: --seq_length "
                             f"{seq_length} needs at least {seq_length + 1} bytes; use a longer file or a "
                             f"smaller --seq_length")
        self.path, self.seq_length, self.seed = p, seq_length, seed
        self.tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        self.num_sequences = (len(raw) - 1) // seq_length
        self._perm: tuple[int, torch.Tensor] | None = None

    def sequence(self, i: int) -> torch.Tensor:
        """Sequence i of the file, [seq_length + 1] long."""
        s = i * self.seq_length
        return self.tokens[s:s + self.seq_length + 1].long()

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(stable_seed("bytes-epoch", self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.num_sequences, generator=g))
        return self._perm[1]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        _check_sizes(batch_size, step)
        N = self.num_sequences
        idx = []
        for s in range(step * batch_size, (step + 1) * batch_size):
            idx.append(int(self._order(s // N)[s % N]))
        starts = torch.tensor(idx, dtype=torch.long) * self.seq_length
        return self.tokens[starts[:, None] + torch.arange(self.seq_length + 1)].long()


def make_source(data: str | os.PathLike | None, seq_length: int, *, vocab_size: int = BYTE_VOCAB,
                seed: int = 42) -> SyntheticTokens | ByteFileTokens:
    """The executor's token source: the bytes of `data` (``--data PATH``) or synthetic tokens."""
    if data is None:
        return SyntheticTokens(seq_length, vocab_size=vocab_size, seed=seed)
    if vocab_size != BYTE_VOCAB:
        raise ValueError(f"--data reads bytes (256 token ids); the model's vocab_size is {vocab_size}")
    return ByteFileTokens(data, seq_length, seed=seed)
