"""Drafts built from the target, and output layers over part of the vocabulary.

`draft.init: target` keeps the target's first layers, embeddings, final norm and head; `draft.head_tokens`
limits the output layer to the most frequent tokens (`SubsetHead`): logits are -inf elsewhere, so every
consumer of full logits (the losses, transformers' generate, the engine) sees a draft that never proposes
them. The engine's losslessness with such drafts is tested in test_speculative_engine / _sampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdraft.checkpoint import load_model, read_metadata, write_metadata
from fastdraft.errors import FastdraftError
from fastdraft.evaluation.metrics import CostRatio, model_size, read_size
from fastdraft.models import HEAD_TOKENS_KEY, SubsetHead, frequent_tokens, make_draft, restrict_head, top_tokens
from fastdraft.training.losses import per_token_loss, sparse_kd, token_ce


def test_frequent_tokens_ranks_by_count_then_id_and_keeps_special_tokens():
    arrays = [np.array([5, 5, 5, 7, 7, 9]), np.array([7, 3, 3, 11])]
    assert frequent_tokens(arrays, 3, 16) == [3, 5, 7]  # 7: 3x, 5: 3x, 3: 2x
    assert frequent_tokens(arrays, 3, 16, always=[0, 1]) == [0, 1, 5]  # the special ids take two of the three
    assert top_tokens(np.array([0, 2, 2, 1]), 2) == [1, 2]  # a tie goes to the lower id


def test_target_init_keeps_the_targets_first_layers(tiny_target_dir, tmp_path):
    out, summary = make_draft(tiny_target_dir, tmp_path / "d", layers=1, init="target")
    target, draft = load_model(tiny_target_dir), load_model(out)
    assert draft.config.num_hidden_layers == 1 and draft.config.hidden_size == target.config.hidden_size
    for name, weight in draft.state_dict().items():
        torch.testing.assert_close(weight, target.state_dict()[name], rtol=0, atol=0, msg=name)
    assert read_metadata(out).extra["init"] == "target-layers" and "1 layers" in summary
    with pytest.raises(FastdraftError, match="needs draft.layers"):
        make_draft(tiny_target_dir, tmp_path / "e", init="target")
    with pytest.raises(FastdraftError, match="keeps the target's width"):
        make_draft(tiny_target_dir, tmp_path / "e", layers=1, hidden=16, init="target")
    with pytest.raises(FastdraftError, match="unknown draft init"):
        make_draft(tiny_target_dir, tmp_path / "e", layers=1, init="pruned")
    assert not (tmp_path / "e").exists()


def test_a_drafts_metadata_head_tokens_give_it_a_subset_head(tiny_draft_dir, copy_dir):
    d = copy_dir(tiny_draft_dir)
    meta = read_metadata(d)
    meta.extra[HEAD_TOKENS_KEY] = [0, 2, 5, 9]
    write_metadata(d, meta)
    full, subset = load_model(tiny_draft_dir), load_model(d)
    assert isinstance(subset.lm_head, SubsetHead)
    ids = torch.tensor([[1, 4, 6, 8]])
    a, b = full(ids).logits, subset(ids).logits
    assert b.shape == a.shape
    torch.testing.assert_close(b[..., [0, 2, 5, 9]], a[..., [0, 2, 5, 9]])
    others = torch.ones(a.shape[-1], dtype=torch.bool)
    others[[0, 2, 5, 9]] = False
    assert torch.isneginf(b[..., others]).all()
    subset.save_pretrained(d / "resaved")  # still a plain HF checkpoint: the head stays tied, full size
    assert load_model(d / "resaved").lm_head.weight.shape == full.lm_head.weight.shape


def test_cost_ratio_counts_the_weights_a_pass_reads(tiny_target_dir, tiny_draft_dir):
    target, draft = load_model(tiny_target_dir), load_model(tiny_draft_dir)
    vocab, width = draft.lm_head.weight.shape
    assert read_size(draft) == model_size(draft)  # tied: the head reads the whole table
    before = CostRatio.of(draft, target).params
    restrict_head(draft, list(range(vocab // 4)))
    assert read_size(draft)[0] == model_size(draft)[0] - (vocab - vocab // 4) * width
    assert CostRatio.of(draft, target).params < before


def test_losses_skip_what_the_draft_cannot_emit():
    """CE on a label outside the head, and KL on teacher mass outside it, stay finite (and have gradients)."""
    logits = torch.tensor([[[0.5, float("-inf"), 1.0, 0.0]] * 3], requires_grad=True)
    labels = torch.tensor([[2, 1, 0]])
    ce = token_ce(logits, labels)
    assert ce[0, 1] == 0 and torch.isfinite(ce).all() and ce[0, 0] > 0
    kl, tvd = sparse_kd(logits, torch.tensor([[[1, 2]] * 3]), torch.log(torch.tensor([[[0.5, 0.4]] * 3])))
    assert torch.isfinite(kl).all() and torch.isfinite(tvd).all()
    batch = {"input_ids": torch.tensor([[0, 2, 1, 0]]), "topk_ids": torch.tensor([[[1, 2]] * 4]),
             "topk_logprobs": torch.log(torch.tensor([[[0.5, 0.4]] * 4]))}
    per_token_loss("ce+kl", torch.cat([logits, logits[:, :1]], 1), batch).sum().backward()
    assert torch.isfinite(logits.grad).all()
