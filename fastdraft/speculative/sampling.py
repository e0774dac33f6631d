"""The maths of speculative decoding: logit warping, greedy acceptance and exact rejection sampling.

Pure tensor functions, batched over sequences, no model code: the engine calls them once per round.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): the draft proposes d_1..d_g sampled from
its warped distributions q_1..q_g; the target's warped distributions p_1..p_{g+1} come from one pass.
d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the correction
token is sampled from norm(max(0, p_i - q_i)); when all g are accepted a bonus token is sampled from
p_{g+1}. Every emitted token is then distributed exactly as the target's own (warped) sampling.
Temperature, top-k and top-p are applied identically to p and q, with transformers' semantics, so
the output distribution equals `generate(do_sample=True, temperature=, top_k=, top_p=)`.

Per-row settings: every function takes `Settings`, one `SamplingParams` for all rows or one per row, so that one
batch can mix requests (a continuous batch). Each row's numbers are exactly what its own setting alone would give:
the per-row values are tensors in the scores' dtype (the same rounding as a Python scalar), and a row whose setting
is off gets the identity (divide by 1, add 0, keep all), never an approximation of it. Temperature 0 (greedy) is the
T -> 0 limit, a one-hot distribution at the argmax: rejection sampling then accepts exactly the argmax matches and
corrects to the argmax, i.e. `greedy_accept`, so greedy and sampled rows verify in one pass.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from fastdraft.speculative.types import SamplingParams

Settings = Union[SamplingParams, Sequence[SamplingParams]]
"""One setting for every row, or one per row (row r of the tensors follows settings[r])."""
Random = Union[torch.Generator, Sequence[torch.Generator], None]
"""One random stream for the whole batch, or one per row (a row's draws then do not depend on its batchmates')."""


def each(settings: Settings) -> list[SamplingParams]:
    """The settings as a list: one entry (it broadcasts over every row) or one per row."""
    return [settings] if isinstance(settings, SamplingParams) else list(settings)


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row values as a tensor that broadcasts over `like` [B, ..., V]: shape [B or 1, 1, ..., 1]."""
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


def _rows_mask(rows: list[SamplingParams], vocab: int, ids_of, device, fill: bool = False) -> torch.Tensor:
    """[len(rows), V] bool: True at the token ids `ids_of(row)` gives (None: the whole row is `fill`)."""
    mask = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for r, p in enumerate(rows):
        ids = ids_of(p)
        if ids is None:
            mask[r] = fill
        elif ids:
            mask[r, list(ids)] = True
    return mask.to(device)


def warp_logits(logits: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then min-p, as transformers' logits warpers do (masked entries = -inf).

    `logits` is [B, ..., V]; the result has the same shape (float32 at least, for stable softmax). A greedy row
    (temperature 0) keeps its argmax alone: its softmax is one-hot.
    """
    rows = each(settings)
    scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    vocab = scores.shape[-1]
    if any(p.greedy for p in rows):
        greedy = _column([p.greedy for p in rows], scores, torch.bool)
        best = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.argmax(dim=-1, keepdim=True), True)
        scores = scores.masked_fill(greedy & ~best, float("-inf"))
    if any(p.temperature not in (0.0, 1.0) for p in rows):
        # A greedy row divides by 1: its argmax alone is finite already.
        scores = scores / _column([p.temperature or 1.0 for p in rows], scores)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in rows]
    if any(ks):
        top = torch.topk(scores, max(ks), dim=-1).values
        index = _column([max(k, 1) - 1 for k in ks], scores, torch.long).expand(*scores.shape[:-1], 1)
        kth = top.gather(-1, index)
        kth = kth.masked_fill(~_column([k > 0 for k in ks], scores, torch.bool), float("-inf"))  # off: keep all
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in rows):
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= _column([1.0 - p.top_p for p in rows], scores)
        drop_sorted &= _column([p.top_p < 1.0 for p in rows], scores, torch.bool)  # top_p 1 is off, not "drop 0 mass"
        drop_sorted[..., -1:] = False  # always keep the most likely token (min_tokens_to_keep=1)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if any(p.min_p > 0 for p in rows):
        probs = scores.softmax(dim=-1)
        # min_p 0 drops nothing (no probability is below 0); the most likely token always stays.
        drop = probs < _column([p.min_p for p in rows], probs) * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def history(outputs: list[list[int]], prompts: list[list[int]], settings: Settings, vocab: int,
            device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the penalties need of each row's tokens so far: (output token counts [B, V] or None, seen [B, V] or None).

    `seen` (prompt and output tokens) is for `repetition_penalty`; the counts (output only) for the OpenAI penalties.
    Either is computed for every row as soon as one row's setting needs it (the others' penalties are then identities).
    """
    rows = each(settings)
    counts = seen = None
    if any(p.presence_penalty or p.frequency_penalty for p in rows):
        counts = torch.stack([torch.bincount(torch.tensor(o, dtype=torch.long), minlength=vocab)[:vocab] for o in outputs])
        counts = counts.to(device)
    if any(p.repetition_penalty != 1.0 for p in rows):
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool)
        for r, (p, o) in enumerate(zip(prompts, outputs)):
            seen[r, torch.tensor(list(p) + list(o), dtype=torch.long)] = True
        seen = seen.to(device)
    return counts, seen


def process_logits(logits: torch.Tensor, settings: Settings, produced: list[int], counts: torch.Tensor | None = None,
                   seen: torch.Tensor | None = None, block: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that the sampler (and `greedy_accept`) sees, before temperature / top-k / top-p warping.

    In order: `logit_bias` added; tokens outside `allowed_token_ids` masked; stop tokens masked while fewer than
    `min_new_tokens` new tokens precede the position; `repetition_penalty` on tokens of the prompt and the output
    (transformers' rule: divide a positive logit, multiply a negative one); then OpenAI's penalties
    `logit -= frequency_penalty * count + presence_penalty * (count > 0)` over output tokens. Masked = -inf.
    Applied identically to target and draft, so the output is exactly the processed target's.

    Args:
        logits: [B, V] (one position per row) or [B, L, V] (L consecutive positions per row).
        settings: the requests' settings (one for all rows, or one per row).
        produced: per row, how many output tokens come before the first position.
        counts, seen: from `history` (at the first position), or None when the penalties are off.
        block: [B, L - 1] the tokens at positions 0..L-2, which count as history for the positions after them.
    """
    rows = each(settings)
    flat = logits.dim() == 2
    scores = logits[:, None] if flat else logits
    batch, positions, vocab = scores.shape
    device = scores.device
    if any(p.logit_bias for p in rows):
        bias = torch.zeros(len(rows), vocab, dtype=scores.dtype)
        for r, p in enumerate(rows):
            if p.logit_bias:
                ids, values = zip(*p.logit_bias)
                bias[r, list(ids)] = torch.tensor(values, dtype=scores.dtype)
        scores = scores + bias.to(device)[:, None]  # + 0 where a row has no bias: exact
    if any(p.allowed_token_ids is not None for p in rows):
        allowed = _rows_mask(rows, vocab, lambda p: p.allowed_token_ids, device, fill=True)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    floor = [p.min_new_tokens if p.stop_token_ids else 0 for p in rows]
    if produced and min(produced) < max(floor):  # some row may still be before its floor (the mask says which)
        offsets = torch.tensor(produced, device=device)[:, None] + torch.arange(positions, device=device)
        early = (offsets < torch.tensor(floor, device=device)[:, None])[..., None]  # [B, L, 1]
        stops = _rows_mask(rows, vocab, lambda p: p.stop_token_ids, device)[:, None]  # [B or 1, 1, V]
        scores = scores.masked_fill(early & stops, float("-inf"))
    if seen is not None or counts is not None:
        # History at position j: what came before the block, plus the block's tokens 0..j-1.
        grown = torch.zeros(batch, positions, vocab, dtype=torch.long, device=device)
        if block is not None and block.shape[1] and positions > 1:
            hot = torch.nn.functional.one_hot(block[:, :positions - 1], vocab).cumsum(dim=1)
            grown[:, 1:] = hot
        if seen is not None:
            mask = seen[:, None] | (grown > 0)
            rp = _column([p.repetition_penalty for p in rows], scores)  # 1 where a row has none: x * 1, x / 1 exact
            penalized = torch.where(scores < 0, scores * rp, scores / rp)
            scores = torch.where(mask, penalized, scores)
        if counts is not None:
            c = (counts[:, None] + grown).to(scores.dtype)
            frequency = _column([p.frequency_penalty for p in rows], scores)
            presence = _column([p.presence_penalty for p in rows], scores)
            scores = scores - frequency * c - presence * (c > 0).to(scores.dtype)
    return scores[:, 0] if flat else scores


def warp_probs(logits: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The sampling distribution of `logits` under `settings` (softmax of the warped scores; one-hot if greedy)."""
    return warp_logits(logits, settings).softmax(dim=-1)


def _streams(generator: Random, batch: int) -> list[torch.Generator] | None:
    """The per-row generators of `generator`, or None when it is one stream (or None) for the whole batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    streams = list(generator)
    if len(streams) != batch:
        raise ValueError(f"{len(streams)} generators for {batch} rows")
    return streams


def sample(probs: torch.Tensor, generator: Random) -> torch.Tensor:
    """One token per row of `probs` [B, V] -> [B] (long), from one stream or from each row's own.

    Inverse CDF: one float64 uniform per row, and the first token whose cumulative probability exceeds it. This is
    exactly the categorical draw; `torch.multinomial` reaches the same with an exponential per vocabulary entry,
    1.3 ms a row over SmolLM2's 49k tokens on 2 cores (6-9% of the target's decode step) against 0.05 ms here.
    """
    batch, vocab = probs.shape
    if batch == 0:
        return torch.empty(0, dtype=torch.long, device=probs.device)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = uniform(batch, 1, generator, probs.device, torch.float64)
    # Strictly below the total: the first entry above it then has a positive probability (the cdf rises there).
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=vocab - 1)  # an all-zero row: the last token


def uniform(batch: int, n: int, generator: Random, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[batch, n] uniforms in [0, 1), from one stream or row r's from its own."""
    streams = _streams(generator, batch)
    if streams is None:
        return torch.rand(batch, n, generator=generator, device=device, dtype=dtype)
    return torch.stack([torch.rand(n, generator=g, device=device, dtype=dtype) for g in streams]) if streams else \
        torch.empty(0, n, device=device, dtype=dtype)


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification.

    Args:
        draft_tokens: [B, g] proposed tokens.
        target_logits: [B, g + 1, V] the target's logits at the g + 1 verified positions.
        lengths: [B] how many of each row's g tokens are proposals (the rest is padding); default all.

    Returns:
        (accepted [B], next_token [B]): how many drafts match the target's argmax (a prefix), and the
        target's argmax right after them (the correction, or the bonus token when all match).
    """
    best = target_logits.argmax(dim=-1)  # same tie-breaking as transformers' greedy search
    g = draft_tokens.shape[1]
    accepted = (draft_tokens == best[:, :g]).long().cumprod(dim=-1).sum(dim=-1)
    if lengths is not None:
        accepted = torch.minimum(accepted, lengths)
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def rejection_accept(
    draft_tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, generator: Random,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling.

    Args:
        draft_tokens: [B, g] tokens the draft sampled from `q`.
        q: [B, g, V] the draft's warped distributions at each drafted position (None when g = 0).
        p: [B, g + 1, V] the target's warped distributions at the g + 1 verified positions.
        generator: the seeded random source: one for the batch, or one per row.
        lengths: [B] how many of each row's g tokens are proposals (default all); q must be 0 past them, so that a
            row whose proposals all pass draws its next token from p, as after a full accept.

    Returns:
        (accepted [B], next_token [B]) as in `greedy_accept`; for a row whose p and q are one-hot (greedy), exactly
        what `greedy_accept` gives: a draft is kept iff it is the argmax (u * 1 < 1, u * 1 < 0 never), and the
        residual of a rejection is the target's argmax alone.
    """
    batch, g = draft_tokens.shape
    rows = torch.arange(batch, device=p.device)
    if g:
        p_d = p[:, :g].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_d = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u = uniform(batch, g, generator, p.device, p.dtype)
        # u < min(1, p/q)  <=>  u * q < p  (q > 0 for a sampled token): no division, no 0/0.
        accepted = (u * q_d < p_d).long().cumprod(dim=-1).sum(dim=-1)
        if lengths is not None:
            accepted = torch.minimum(accepted, lengths)
        q_next = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)[rows, accepted]  # 0 after a full accept
    else:
        accepted = torch.zeros(batch, dtype=torch.long, device=p.device)
        q_next = torch.zeros_like(p[:, 0])
    p_next = p[rows, accepted]
    residual = (p_next - q_next).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q up to rounding leaves no residual mass; a rejection then has probability ~0, and p is the limit.
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(p.dtype).tiny), p_next)
    return accepted, sample(residual, generator)
