"""Packing tokenized documents into fixed-length training rows (pure numpy, no Ray).

Documents are joined with one EOS after each document and cut into rows of exactly `seq_len`
tokens, across document boundaries: no padding, no attention tricks, every token is trained on.
A `Packer` carries the unfinished tail from one call to the next, so one input shard (read by
one actor, in order) packs deterministically; the tail left at the end of a shard (< seq_len
tokens) is dropped and counted (`dropped_tail_tokens` in the manifest).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def join_with_eos(docs: Sequence[Sequence[int]], eos: int) -> np.ndarray:
    """All documents as one int32 stream, each followed by `eos`."""
    if not docs:
        return np.empty(0, dtype=np.int32)
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    out = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    for doc, end, n in zip(docs, ends, lengths):
        out[end - n : end - 1] = doc
    out[ends - 1] = eos
    return out


def pack_with_eos(docs: Sequence[Sequence[int]], eos: int, seq_len: int, carry: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pack documents into rows of `seq_len` tokens.

    Args:
        docs: token ids of each document (without EOS).
        eos: the id appended after every document.
        seq_len: tokens per row.
        carry: tokens left over from an earlier call; they come first.

    Returns:
        (rows, remainder): an int32 array of shape (n, seq_len) and the < seq_len tokens left over.
    """
    stream = join_with_eos(docs, eos)
    if carry is not None and len(carry):
        stream = np.concatenate([carry.astype(np.int32, copy=False), stream])
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len), stream[n * seq_len :].copy()


class Packer:
    """Packs a stream of document batches into rows, carrying the tail between batches."""

    def __init__(self, eos: int, seq_len: int):
        self.eos, self.seq_len = eos, seq_len
        self.carry = np.empty(0, dtype=np.int32)

    def add(self, docs: Sequence[Sequence[int]]) -> np.ndarray:
        """The rows completed by these documents, shape (n, seq_len)."""
        rows, self.carry = pack_with_eos(docs, self.eos, self.seq_len, self.carry)
        return rows

    @property
    def tail(self) -> int:
        """Tokens waiting for the next row (dropped if the stream ends here)."""
        return len(self.carry)
