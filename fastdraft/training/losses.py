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
import torch.utils.checkpoint

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


def position_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None = None,
                  topk_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """The loss `kind` per position, for logits already aligned with the tokens they predict.

    Args:
        logits: [..., V] (V: the vocabulary, or an output layer's own rows; the ids below then index those rows).
        labels: [...] the predicted token ids (< 0: no loss).
        topk_ids, topk_logprobs: [..., K] the teacher's top-k for those positions (KD losses only).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    ce = token_ce(logits, labels) if "ce" in kind else None
    if kind == "ce":
        return ce
    if topk_ids is None:
        raise ValueError(f"loss '{kind}' needs the target's top-k log-probs (generate.store_topk > 0)")
    kl, tvd = sparse_kd(logits, topk_ids, topk_logprobs)
    kd = kl if "kl" in kind else tvd
    return kd if ce is None else 0.5 * ce + 0.5 * kd


def per_token_loss(kind: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss per predicted position, [B, L-1], for loss `kind` (one of LOSSES), from full logits
    [B, L, V]. The training loop uses the chunked `ChunkedLMLoss`, which gives the same values without ever
    holding [B, L, V]; this is its reference."""
    topk = batch.get("topk_ids")
    return position_loss(kind, logits[:, :-1], batch["input_ids"][:, 1:].long(),
                         topk[:, 1:] if topk is not None else None,
                         batch["topk_logprobs"][:, 1:] if topk is not None else None)


# ------------------------------------------------------------------------------------------------
# The memory-bounded LM loss: never [tokens x vocabulary] for a whole micro-batch
# ------------------------------------------------------------------------------------------------
LINEAR_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
"""Model types whose logits are exactly `lm_head(last_hidden_state)` (no soft-capping or logit scale), so the
loss may apply the output layer itself, a chunk of positions at a time."""

DEFAULT_CHUNK_TOKENS = 2048
"""Positions per logits chunk: 2,048 x 128,256 (Llama 3) x 4 bytes is 1 GB of fp32 logits, plus its gradient."""


def output_rows(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output layer's weight rows and the token ids they score (None: row i scores token i).

    A draft's `SubsetHead` scores only its own rows: the loss then works over them, never over the whole
    vocabulary (no -inf columns to soft-max over)."""
    from fastdraft.models import SubsetHead

    head = model.get_output_embeddings()
    if isinstance(head, SubsetHead):
        return head.weight[head.ids], head.ids
    if getattr(head, "bias", None) is not None:
        raise ValueError("the chunked LM loss supports output layers without a bias")
    return head.weight, None


def to_rows(ids: torch.Tensor, row_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Token ids -> indices into the output layer's rows (-1 for padding and for tokens it has no row for)."""
    if row_ids is None:
        return ids
    lookup = torch.full((vocab_size,), -1, dtype=torch.long, device=ids.device)
    lookup[row_ids] = torch.arange(len(row_ids), device=ids.device)
    return torch.where(ids >= 0, lookup[ids.clamp_min(0)], -1)


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None, k: int,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's top-`k` log-probs for every token of `input_ids` [B, L], in the layout the KD losses read:
    row t holds the teacher's top-k for token t given tokens < t (row 0 is padding, ids -1).

    The output layer runs `chunk_tokens` positions at a time, so the peak is one chunk of full-vocabulary logits
    (for the `LINEAR_HEAD_MODEL_TYPES`; other models give their whole logits)."""
    if getattr(teacher.config, "model_type", None) in LINEAR_HEAD_MODEL_TYPES:
        hidden = teacher.base_model(input_ids=input_ids, position_ids=position_ids).last_hidden_state[:, :-1]
        head = teacher.get_output_embeddings()
    else:
        hidden = teacher(input_ids=input_ids, position_ids=position_ids).logits[:, :-1]
        head = torch.nn.Identity()
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    logprobs = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    for s in range(0, flat.shape[0], chunk_tokens):
        part = torch.log_softmax(head(flat[s:s + chunk_tokens]).float(), dim=-1).topk(k, dim=-1)
        logprobs[s:s + chunk_tokens], ids[s:s + chunk_tokens] = part.values, part.indices
    B, L = input_ids.shape
    out_ids = torch.full((B, L, k), -1, dtype=torch.long, device=flat.device)
    out_lp = torch.zeros((B, L, k), dtype=torch.float32, device=flat.device)
    out_ids[:, 1:], out_lp[:, 1:] = ids.view(B, L - 1, k), logprobs.view(B, L - 1, k)
    return out_ids, out_lp


def _chunk_loss_sum(kind: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight)
    return (position_loss(kind, logits, labels, topk_ids, topk_logprobs) * w).sum()


def _liger_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """Liger Kernel's fused linear + cross-entropy (CUDA, Triton), or None where it is not installed."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")(weight, hidden, labels.where(labels >= 0, -100))


class ChunkedLMLoss(torch.nn.Module):
    """A causal LM and its training loss in one module (DDP wraps the whole forward).

    `forward(batch, weights)` returns the weighted sum of per-position losses, equal to
    `(per_token_loss(kind, model(...).logits, batch) * weights).sum()` with the same gradients, but the output
    layer runs over `chunk_tokens` positions at a time, and only over positions that carry loss (weights > 0:
    distillation's prompts cost nothing). Each chunk's logits are recomputed in backward
    (`torch.utils.checkpoint`), so at most one chunk of [positions x vocabulary] exists at any time. On CUDA with
    Liger Kernel installed, the CE loss uses its fused linear cross-entropy instead (weights must be 0/1 there).
    Models whose logits are not a plain linear output layer (`LINEAR_HEAD_MODEL_TYPES`) take the full-logits path.
    """

    def __init__(self, model: torch.nn.Module, kind: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
        self.model, self.kind, self.chunk_tokens = model, kind, chunk_tokens
        self.chunked = getattr(model.config, "model_type", None) in LINEAR_HEAD_MODEL_TYPES

    def forward(self, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        if not self.chunked:
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
            return (per_token_loss(self.kind, logits, batch) * weights).sum()
        hidden = self.model.base_model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).last_hidden_state
        keep = (weights > 0).reshape(-1).nonzero().squeeze(-1)  # predicted positions that carry loss
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
        w = weights.reshape(-1)[keep]
        weight, row_ids = output_rows(self.model)
        vocab = self.model.config.vocab_size
        labels = to_rows(batch["input_ids"][:, 1:].reshape(-1)[keep].long(), row_ids, vocab)
        topk_ids = topk_logprobs = None
        if "topk_ids" in batch and self.kind != "ce":
            k = batch["topk_ids"].shape[-1]
            topk_ids = to_rows(batch["topk_ids"][:, 1:].reshape(-1, k)[keep].long(), row_ids, vocab)
            topk_logprobs = batch["topk_logprobs"][:, 1:].reshape(-1, k)[keep]
        if self.kind == "ce" and hidden.is_cuda and bool(((w == 0) | (w == 1)).all()):
            fused = _liger_ce_sum(hidden, weight, labels)
            if fused is not None:
                return fused
        # Zero, but joined to the graph: a micro-batch without loss tokens still gives every parameter a gradient
        # (DDP waits for all of them on every worker).
        total = (hidden.sum() + weight.sum()).float() * 0.0
        for s in range(0, hidden.shape[0], self.chunk_tokens):
            part = slice(s, s + self.chunk_tokens)
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_loss_sum, self.kind, hidden[part], weight, labels[part],
                topk_ids[part] if topk_ids is not None else None,
                topk_logprobs[part] if topk_logprobs is not None else None, w[part], use_reentrant=False)
        return total
