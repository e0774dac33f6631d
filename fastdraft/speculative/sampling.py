"""The maths of speculative decoding: logit warping, greedy acceptance and exact rejection sampling.

Pure tensor functions, batched over sequences, no model code: the engine calls them once per round.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): the draft proposes d_1..d_g sampled from
its warped distributions q_1..q_g; the target's warped distributions p_1..p_{g+1} come from one pass.
d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the correction
token is sampled from norm(max(0, p_i - q_i)); when all g are accepted a bonus token is sampled from
p_{g+1}. Every emitted token is then distributed exactly as the target's own (warped) sampling.
Temperature, top-k and top-p are applied identically to p and q, with transformers' semantics, so
the output distribution equals `generate(do_sample=True, temperature=, top_k=, top_p=)`.
"""

from __future__ import annotations

import torch

from fastdraft.speculative.types import SamplingParams


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then min-p, as transformers' logits warpers do (masked entries = -inf).

    `logits` is [..., V]; the result has the same shape (float32 at least, for stable softmax).
    """
    scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if params.temperature != 1.0:
        scores = scores / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - params.top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token (min_tokens_to_keep=1)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = scores.softmax(dim=-1)
        drop = probs < params.min_p * probs.amax(dim=-1, keepdim=True)  # the most likely token always stays
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def history(outputs: list[list[int]], prompts: list[list[int]], params: SamplingParams, vocab: int,
            device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the penalties need of each row's tokens so far: (output token counts [B, V] or None, seen [B, V] or None).

    `seen` (prompt and output tokens) is for `repetition_penalty`; the counts (output only) for the OpenAI penalties.
    """
    counts = seen = None
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.stack([torch.bincount(torch.tensor(o, dtype=torch.long), minlength=vocab)[:vocab] for o in outputs])
        counts = counts.to(device)
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool)
        for r, (p, o) in enumerate(zip(prompts, outputs)):
            seen[r, torch.tensor(list(p) + list(o), dtype=torch.long)] = True
        seen = seen.to(device)
    return counts, seen


def process_logits(logits: torch.Tensor, params: SamplingParams, produced: list[int], counts: torch.Tensor | None = None,
                   seen: torch.Tensor | None = None, block: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that the sampler (and `greedy_accept`) sees, before temperature / top-k / top-p warping.

    In order: `logit_bias` added; tokens outside `allowed_token_ids` masked; stop tokens masked while fewer than
    `min_new_tokens` new tokens precede the position; `repetition_penalty` on tokens of the prompt and the output
    (transformers' rule: divide a positive logit, multiply a negative one); then OpenAI's penalties
    `logit -= frequency_penalty * count + presence_penalty * (count > 0)` over output tokens. Masked = -inf.
    Applied identically to target and draft, so the output is exactly the processed target's.

    Args:
        logits: [B, V] (one position per row) or [B, L, V] (L consecutive positions per row).
        params: the request's settings.
        produced: per row, how many output tokens come before the first position.
        counts, seen: from `history` (at the first position), or None when the penalties are off.
        block: [B, L - 1] the tokens at positions 0..L-2, which count as history for the positions after them.
    """
    flat = logits.dim() == 2
    scores = logits[:, None] if flat else logits
    batch, positions, vocab = scores.shape
    if params.logit_bias:
        bias = torch.zeros(vocab, dtype=scores.dtype, device=scores.device)
        ids, values = zip(*params.logit_bias)
        bias[list(ids)] = torch.tensor(values, dtype=scores.dtype, device=scores.device)
        scores = scores + bias
    if params.allowed_token_ids is not None:
        allowed = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
        allowed[list(params.allowed_token_ids)] = True
        scores = scores.masked_fill(~allowed, float("-inf"))
    if params.min_new_tokens > 0 and params.stop_token_ids and min(produced) < params.min_new_tokens:
        offsets = torch.tensor(produced, device=scores.device)[:, None] + torch.arange(positions, device=scores.device)
        early = (offsets < params.min_new_tokens)[..., None]  # [B, L, 1]
        stops = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
        stops[list(params.stop_token_ids)] = True
        scores = scores.masked_fill(early & stops, float("-inf"))
    if seen is not None or counts is not None:
        # History at position j: what came before the block, plus the block's tokens 0..j-1.
        grown = torch.zeros(batch, positions, vocab, dtype=torch.long, device=scores.device)
        if block is not None and block.shape[1] and positions > 1:
            hot = torch.nn.functional.one_hot(block[:, :positions - 1], vocab).cumsum(dim=1)
            grown[:, 1:] = hot
        if seen is not None:
            mask = seen[:, None] | (grown > 0)
            penalized = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
            scores = torch.where(mask, penalized, scores)
        if counts is not None:
            c = (counts[:, None] + grown).to(scores.dtype)
            scores = scores - params.frequency_penalty * c - params.presence_penalty * (c > 0).to(scores.dtype)
    return scores[:, 0] if flat else scores


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution of `logits` under `params` (softmax of the warped scores)."""
    return warp_logits(logits, params).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` [B, V] -> [B] (long)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification.

    Args:
        draft_tokens: [B, g] proposed tokens.
        target_logits: [B, g + 1, V] the target's logits at the g + 1 verified positions.

    Returns:
        (accepted [B], next_token [B]): how many drafts match the target's argmax (a prefix), and the
        target's argmax right after them (the correction, or the bonus token when all match).
    """
    best = target_logits.argmax(dim=-1)  # same tie-breaking as transformers' greedy search
    g = draft_tokens.shape[1]
    accepted = (draft_tokens == best[:, :g]).long().cumprod(dim=-1).sum(dim=-1)
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def rejection_accept(
    draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling.

    Args:
        draft_tokens: [B, g] tokens the draft sampled from `q`.
        q: [B, g, V] the draft's warped distributions at each drafted position.
        p: [B, g + 1, V] the target's warped distributions at the g + 1 verified positions.
        generator: the seeded random source.

    Returns:
        (accepted [B], next_token [B]) as in `greedy_accept`.
    """
    batch, g = draft_tokens.shape
    rows = torch.arange(batch, device=p.device)
    if g:
        p_d = p[:, :g].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_d = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u = torch.rand(batch, g, generator=generator, device=p.device, dtype=p.dtype)
        # u < min(1, p/q)  <=>  u * q < p  (q > 0 for a sampled token): no division, no 0/0.
        accepted = (u * q_d < p_d).long().cumprod(dim=-1).sum(dim=-1)
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
