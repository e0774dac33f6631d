"""Context lookup: proposals copied from the sequence's own earlier text (prompt lookup decoding, Saxena 2023; vLLM's
`ngram` speculator), used by the engine beside the draft model.

When the last n tokens (n from `max_ngram` down to `min_ngram`) occurred earlier in the prompt or the output, the
tokens that followed that occurrence are proposed. Copying is what a 2-layer draft does worst and what small targets
do most (code repeats names, answers quote their prompt, greedy text loops): on the demo's FT draft, at the positions
where a 2-gram matches, the copied token was the target's 66-75% of the time against the draft's 20-25%.

A proposal that costs no model step needs no cache either, and it is lossless like any other: the target verifies it
against a one-hot proposal distribution (`engine.Run.step`).
"""

from __future__ import annotations

from fastdraft.errors import FastdraftError


class NgramLookup:
    """The most recent earlier occurrence of each n-gram of one growing sequence, indexed as tokens arrive.

    `propose(tokens, k)` looks up the sequence's last `max_ngram` .. `min_ngram` tokens (longest first) and returns
    up to k tokens that followed their most recent earlier occurrence, or [] when none occurred. `tokens` must be
    the same sequence each call, only ever grown (the engine's committed tokens): each call indexes what is new, so a
    round costs O(new tokens), not O(length)."""

    def __init__(self, min_ngram: int = 2, max_ngram: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise FastdraftError(f"lookup n-grams need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.index: dict[tuple[int, ...], int] = {}
        """n-gram -> the position right after its latest occurrence whose next token is known."""
        self.indexed = 0
        """n-grams ending before this position are in the index."""

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        # Index every n-gram whose next token exists: those ending at positions up to len - 2. The sequence's own
        # suffix (ending at len - 1) is not indexed yet, so a lookup finds an earlier occurrence, never itself.
        for end in range(self.indexed, len(tokens) - 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end + 1 >= n:
                    self.index[tuple(tokens[end + 1 - n:end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            at = self.index.get(tuple(tokens[len(tokens) - n:]))
            if at is not None:
                return tokens[at:at + k]
        return []
