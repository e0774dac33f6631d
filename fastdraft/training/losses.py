"""Per-token losses for the training loop: cross-entropy and token-level KD from sparse top-k teacher log-probs.

Conventions (shared with `loop.py`): position t of `logits` predicts token t+1 of `input_ids`; teacher
columns (`topk_ids`, `topk_logprobs`, shape [B, L, K]) are aligned with the *predicted* token, i.e. row t holds
the target's top-k for token t given tokens < t. Ids < 0 in `topk_ids` are padding.

Token-level KD with only the teacher's top-k is done on the coarsened distributions over K + 1 outcomes:
the K teacher tokens plus one "rest" bucket holding the remaining mass (1 - sum of the top-k
probabilities, for teacher and student alike). KL and TVD of these coarsened distributions are exact for
them and lower bounds of the full-vocabulary values; with K = vocabulary size they are the full values.
The paper's mixes are ½CE + ½KL and ½CE + ½TVD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "kl", "tvd", "ce+kl", "ce+tvd")
_EPS = 1e-12


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position: logits [B, T, V], labels [B, T] -> [B, T] (labels < 0 give 0).

    A label the model cannot emit (logit -inf: outside a draft's `SubsetHead`) gives 0 too: no finite loss
    could move it, and an infinite one would poison the step."""
    emittable = torch.gather(logits, -1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).isfinite()
    labels = labels.where(emittable, -1)
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none")
    return flat.view(labels.shape) * (labels >= 0)


def sparse_kd(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) and TVD per position on the top-k + rest coarsening.

    Args:
        logits: student logits [B, T, V].
        topk_ids: teacher top-k token ids [B, T, K] (< 0: padding).
        topk_logprobs: teacher log-probabilities of those ids [B, T, K] (full-vocabulary log-softmax values).
    Returns:
        (kl, tvd), each [B, T].
    """
    logq = torch.log_softmax(logits.float(), dim=-1)
    logq_k = torch.gather(logq, -1, topk_ids.clamp_min(0).long())
    # Teacher tokens the student cannot emit (outside a SubsetHead: q = 0) join the rest bucket.
    valid = (topk_ids >= 0) & logq_k.isfinite()
    logq_k = logq_k.where(valid, 0.0)
    p_k = topk_logprobs.float().exp() * valid
    q_k = logq_k.exp() * valid
    p_rest = (1 - p_k.sum(-1)).clamp_min(0)
    q_rest = (1 - q_k.sum(-1)).clamp_min(_EPS)
    # 0 * log 0 = 0: positions with zero teacher mass contribute nothing.
    kl_k = torch.where(p_k > 0, p_k * (torch.log(p_k.clamp_min(_EPS)) - logq_k), torch.zeros_like(p_k)).sum(-1)
    kl_rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(_EPS)) - torch.log(q_rest)), torch.zeros_like(p_rest))
    tvd = 0.5 * ((p_k - q_k).abs().sum(-1) + (p_rest - q_rest).abs())
    return kl_k + kl_rest, tvd


def per_token_loss(kind: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss per predicted position, [B, L-1], for loss `kind` (one of LOSSES)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    logits = logits[:, :-1]
    ce = token_ce(logits, batch["input_ids"][:, 1:].long()) if "ce" in kind else None
    if kind == "ce":
        return ce
    if "topk_ids" not in batch:
        raise ValueError(f"loss '{kind}' needs the target's top-k log-probs (generate.store_topk > 0)")
    kl, tvd = sparse_kd(logits, batch["topk_ids"][:, 1:], batch["topk_logprobs"][:, 1:])
    kd = kl if "kl" in kind else tvd
    return kd if ce is None else 0.5 * ce + 0.5 * kd
