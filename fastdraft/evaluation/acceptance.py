"""Acceptance and tau of a draft on a task, for a whole gamma sweep, greedy and sampled.

Two measurements, reported side by side:

* **offline (teacher-forced)**: the target writes each continuation once with its own `generate`; each
  draft then reads prompt + continuation in one forward pass. Under greedy decoding this is *exact*: a
  draft proposes its argmax given the accepted prefix, and the accepted prefix is always the target's
  own greedy output, so "draft token i is accepted" is "draft argmax at position i == target token i".
  Replaying the block process on that 0/1 vector gives the engine's D, A, F, N for every gamma at once.
  Under sampling, the chance that the draft token at position i is accepted by exact rejection sampling
  is beta_i = sum_x min(p_i(x), q_i(x)) (Leviathan et al. 2023) with both distributions warped
  identically (temperature, top-k, top-p); replaying blocks with those probabilities gives the
  *expected* counters. One target pass and one draft pass per prompt cover the whole sweep.
* **engine**: fastdraft's `SpeculativeEngine` runs the pair and its exact counters are summed (this
  is also what wall-clock speedup is measured on, see `pipeline.py`).

Block process (both, as `SpeculativeEngine` counts): a block starting at continuation position p drafts
k = min(gamma, max_new_tokens - p - 1) tokens (never more than could still be emitted), accepts the
longest accepted prefix j of them, and emits j + 1 tokens (the accepted ones plus the target's correction
or bonus token, cut at a stop token or the budget), in one target pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from fastdraft.evaluation.tasks import EvalTask
from fastdraft.speculative.sampling import warp_probs  # the engine's warping: temperature, top-k, top-p
from fastdraft.speculative.types import SamplingParams, SpecStats


def simulate_blocks(accept_prob: Sequence[float], gamma: int, max_new_tokens: int | None = None) -> SpecStats:
    """Expected counters of speculative decoding over a continuation of L = len(accept_prob) tokens.

    Args:
        accept_prob: for each continuation position i, the probability that a draft token proposed there
            (after an accepted prefix) is accepted: 0/1 for greedy (exact counters), beta_i when sampling.
        gamma: draft tokens per block.
        max_new_tokens: the generation's token budget. A continuation that ended on a stop token before it
            is drafted past like the engine does (k = min(gamma, budget left - 1)); drafts past the stop
            token count as rejected and tokens past it are not emitted. Default: L (no stop token).
    """
    n = len(accept_prob)
    budget = n if max_new_tokens is None else max(n, max_new_tokens)
    stats = SpecStats(per_position_drafted=[0] * gamma, per_position_accepted=[0] * gamma)
    start = [0.0] * (n + 1)  # probability that a block starts at position p
    start[0] = 1.0 if n else 0.0
    for p in range(n):
        w = start[p]
        if w == 0.0:
            continue
        k = min(gamma, budget - p - 1)
        stats.target_passes += w
        stats.drafted += w * k
        survive = 1.0  # probability that the first j drafts were all accepted
        for j in range(k):
            stats.per_position_drafted[j] += w
            reject = survive * (1.0 - (accept_prob[p + j] if p + j < n else 0.0))
            start[min(p + j + 1, n)] += w * reject
            stats.emitted += w * reject * min(j + 1, n - p)
            survive -= reject
            stats.per_position_accepted[j] += w * survive
            stats.accepted += w * survive
        start[min(p + k + 1, n)] += w * survive
        stats.emitted += w * survive * min(k + 1, n - p)
    return _exact_ints(stats)


def _exact_ints(stats: SpecStats) -> SpecStats:
    """Whole-number expectations (always the case for greedy) become ints, so greedy counters read exactly."""
    def fix(v):
        return int(round(v)) if abs(v - round(v)) < 1e-9 else v

    stats.truncated = stats.accepted + stats.target_passes - stats.emitted  # verified but cut at a stop token
    for name in ("drafted", "accepted", "target_passes", "emitted", "truncated"):
        setattr(stats, name, fix(getattr(stats, name)))
    stats.per_position_drafted = [fix(v) for v in stats.per_position_drafted]
    stats.per_position_accepted = [fix(v) for v in stats.per_position_accepted]
    return stats


def acceptance_probs(target_logits: torch.Tensor, draft_logits: torch.Tensor, params: SamplingParams,
                     continuation: Sequence[int] | None = None) -> list[float]:
    """Per-position acceptance: 1/0 (draft argmax == target token) when greedy, else sum_x min(p, q)."""
    if params.greedy:
        if continuation is None:
            continuation = target_logits.argmax(-1).tolist()
        return [float(d == t) for d, t in zip(draft_logits.argmax(-1).tolist(), continuation)]
    p, q = warp_probs(target_logits, params), warp_probs(draft_logits, params)
    return torch.minimum(p, q).sum(-1).clamp(max=1.0).tolist()


@dataclass
class Continuation:
    prompt_ids: list[int]
    ids: list[int]
    """The target's own output (prompt excluded), ending with a stop token or at max_new_tokens."""


def _logits_over(model: torch.nn.Module, prompt: list[int], cont: list[int], vocab: int | None = None) -> torch.Tensor:
    """Teacher-forced logits predicting each token of `cont` after `prompt`: [len(cont), vocab]."""
    ids = torch.tensor([prompt + cont], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) + len(cont) - 1].float().cpu()
    if vocab is not None and logits.shape[-1] != vocab:  # embedding tables may be padded differently
        logits = logits[:, :vocab] if logits.shape[-1] > vocab else \
            torch.cat([logits, logits.new_full((len(cont), vocab - logits.shape[-1]), float("-inf"))], dim=-1)
    return logits


def position_acceptance(target: torch.nn.Module, drafts: dict[str, torch.nn.Module], c: Continuation,
                        params: SamplingParams) -> dict[str, list[float]]:
    """Each draft's per-position acceptance on one continuation.

    The target's logits are computed once per continuation and dropped after it, so memory stays at one
    sequence x vocabulary however many prompts a task has.
    """
    if not c.ids:
        return {label: [] for label in drafts}
    t = _logits_over(target, c.prompt_ids, c.ids)
    return {label: acceptance_probs(t, _logits_over(d, c.prompt_ids, c.ids, t.shape[-1]), params, c.ids)
            for label, d in drafts.items()}


def sweep(betas: Sequence[Sequence[float]], gammas: Sequence[int], max_new_tokens: int | None = None) -> dict[int, SpecStats]:
    """Counters over many continuations (each given by its per-position acceptance) for each gamma."""
    totals = {g: SpecStats() for g in gammas}
    for beta in betas:
        for g in gammas:
            totals[g] += simulate_blocks(beta, g, max_new_tokens)
    return totals


Generate = Callable[[list[int], SamplingParams], list[int]]
"""prompt ids, params -> the target's new ids (e.g. `SpeculativeEngine.generate` with no draft)."""


def hf_generate(target: torch.nn.Module) -> Generate:
    """The target's own transformers `generate` (greedy, or multinomial sampling with the same warping)."""
    def generate(prompt: list[int], params: SamplingParams) -> list[int]:
        kwargs = dict(do_sample=False) if params.greedy else \
            dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        eos = list(params.stop_token_ids) or target.generation_config.eos_token_id
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = target.generate(torch.tensor([prompt], device=target.device), max_new_tokens=params.max_new_tokens,
                                  eos_token_id=eos, pad_token_id=_pad_id(target), **kwargs)
        return out[0, len(prompt):].tolist()

    return generate


def _pad_id(model: torch.nn.Module) -> int | None:
    cfg = model.generation_config
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    return cfg.pad_token_id if cfg.pad_token_id is not None else eos


def target_continuations(target: torch.nn.Module, task: EvalTask, params: SamplingParams, seed: int = 0,
                         generate: Generate | None = None) -> list[Continuation]:
    """The target's own output for each prompt (seeded per prompt); transformers' `generate` by default."""
    generate = generate or hf_generate(target)
    return [Continuation(prompt.ids, generate(prompt.ids, replace(params, max_new_tokens=task.max_new_tokens, seed=seed + i)))
            for i, prompt in enumerate(task.prompts)]


def offline_sweep(target: torch.nn.Module, draft: torch.nn.Module, continuations: list[Continuation],
                  params: SamplingParams, gammas: Sequence[int], max_new_tokens: int | None = None) -> dict[int, SpecStats]:
    """Counters (exact for greedy, expected for sampling) of one draft over a task, for each gamma."""
    betas = [position_acceptance(target, {"draft": draft}, c, params)["draft"] for c in continuations]
    return sweep(betas, gammas, max_new_tokens)
