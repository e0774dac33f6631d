"""A preallocated key/value cache with one length per sequence.

Speculative decoding writes KV for tokens that may be rejected; rolling back is just forgetting them:
the engine passes each sequence's valid length (its write offset) with every forward, entries beyond
it are masked out of attention and overwritten later. Nothing is copied or recomputed on rejection,
and sequences in one batch may accept different numbers of tokens.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values for all layers: [layers, batch, kv_heads, capacity, head_dim] each."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, offsets: list[int], pos: torch.Tensor) -> None:
        """Store k, v [batch, kv_heads, T, head_dim] at positions pos [batch, T] (offsets[b] + 0 .. T - 1)."""
        t = k.shape[2]
        first = offsets[0]
        if all(o == first for o in offsets):  # the common case (batch 1, or aligned rows): one slice copy
            self.k[layer, :, :, first:first + t] = k
            self.v[layer, :, :, first:first + t] = v
            return
        # Ragged rows: one scatter for the whole batch (advanced indices -> [batch, T, kv_heads, head_dim]).
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, :, pos] = k.transpose(1, 2)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)

    def view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) for all rows (entries past a row's length are masked)."""
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]

    def append(self, other: "StaticKVCache") -> None:
        """Add `other`'s rows after these (sequences joining a running batch); capacities are padded to the larger."""
        capacity = max(self.capacity, other.capacity)
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, capacity - t.shape[3]))  # noqa: E731
        self.k = torch.cat([pad(self.k), pad(other.k)], dim=1)
        self.v = torch.cat([pad(self.v), pad(other.v)], dim=1)

    def put_rows(self, start: int, other: "StaticKVCache") -> None:
        """Copy all of `other` (fewer rows, no more capacity) into rows start .. start + its batch of this cache."""
        rows, length = other.k.shape[1], other.capacity
        self.k[:, start:start + rows, :, :length] = other.k
        self.v[:, start:start + rows, :, :length] = other.v

    def put_prefix(self, other: "StaticKVCache") -> None:
        """Copy `other`'s one row (a prefilled prefix, no more capacity) into the first positions of every row."""
        length = other.capacity
        self.k[:, :, :, :length] = other.k
        self.v[:, :, :, :length] = other.v

    def keep_rows(self, rows: list[int], length: int | None = None) -> None:
        """Drop finished sequences so that later passes compute only live ones. With `length`, only positions
        [0, length) are copied (no row has written past them); the capacity stays."""
        index = torch.tensor(rows, device=self.k.device)
        if length is None:
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros((old.shape[0], len(rows), *old.shape[2:]), dtype=old.dtype, device=old.device)
            new[:, :, :, :length] = old[:, :, :, :length].index_select(1, index)
            setattr(self, name, new)
