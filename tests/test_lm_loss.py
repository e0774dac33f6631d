"""The training loop's LM loss never holds [tokens x vocabulary] for a whole micro-batch.

`ChunkedLMLoss` applies the output layer a chunk of positions at a time (recomputed in backward) and only where
the loss weights are non-zero. What goes in: a draft, a batch with loss weights and a teacher's top-k. What must
come out: the same weighted loss sum and the same parameter gradients as the plain full-logits path
(`per_token_loss`), for every loss, in fp32 and under bf16 autocast, with a full and a subset output layer.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastdraft.checkpoint import load_model
from fastdraft.models import restrict_head
from fastdraft.training.losses import LOSSES, ChunkedLMLoss, per_token_loss


def _batch(vocab: int, rows: int = 3, length: int = 17, k: int = 4, seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    topk_ids = torch.randint(0, vocab, (rows, length, k), generator=g)
    topk_ids[0, 3, -1] = -1  # padding in the teacher's columns
    topk_lp = torch.log_softmax(torch.randn(rows, length, k + 2, generator=g), -1)[..., :k]
    weights = (torch.rand(rows, length - 1, generator=g) > 0.3).float()
    weights[1] = 0.0  # a row without loss (a prompt): costs nothing, changes nothing
    return {"input_ids": ids, "topk_ids": topk_ids, "topk_logprobs": topk_lp}, weights


def _loss_and_grads(model, kind: str, batch, weights, chunked: bool, chunk: int, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if chunked:
            loss = ChunkedLMLoss(model, kind, chunk_tokens=chunk)(batch, weights)
        else:
            logits = model(input_ids=batch["input_ids"]).logits
            loss = (per_token_loss(kind, logits, batch) * weights).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["full", "subset"])
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_chunked_loss_equals_the_full_logits_loss_with_the_same_gradients(tiny_draft_dir, head, kind, bf16):
    model = load_model(tiny_draft_dir)
    vocab = model.config.vocab_size
    if head == "subset":  # every other token: labels and teacher tokens outside it get no loss / join the rest
        restrict_head(model, list(range(0, vocab, 2)))
    batch, weights = _batch(vocab)
    reference = copy.deepcopy(model)
    want, want_grads = _loss_and_grads(reference, kind, batch, weights, chunked=False, chunk=0, bf16=bf16)
    got, got_grads = _loss_and_grads(model, kind, batch, weights, chunked=True, chunk=5, bf16=bf16)
    assert got_grads.keys() == want_grads.keys()
    if not bf16:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        return
    # bf16: the two paths round in different places (one matrix product per chunk), so compare each gradient
    # as a whole: relative error of its norm-2, against bf16's 2^-8 = 0.4% per element.
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    for name in want_grads:
        error = float((got_grads[name] - want_grads[name]).norm() / want_grads[name].norm().clamp_min(1e-12))
        assert error < 2e-2, f"{name}: relative gradient error {error:.4f}"


def test_a_micro_batch_without_loss_tokens_gives_zero_loss_and_zero_gradients(tiny_draft_dir):
    model = load_model(tiny_draft_dir)
    batch, weights = _batch(model.config.vocab_size)
    loss = ChunkedLMLoss(model, "ce+kl")(batch, torch.zeros_like(weights))
    loss.backward()  # joined to the graph: DDP needs every parameter's gradient on every worker
    assert float(loss) == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_a_kd_loss_without_teacher_columns_is_refused(tiny_draft_dir):
    model = load_model(tiny_draft_dir)
    batch, weights = _batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="needs the target's top-k"):
        ChunkedLMLoss(model, "kl")({"input_ids": batch["input_ids"]}, weights)
    with pytest.raises(ValueError, match="unknown loss"):
        ChunkedLMLoss(model, "mse")


@pytest.mark.parametrize("head", ["linear", "other"])
def test_teacher_topk_is_the_teachers_log_softmax_top_k_for_the_next_token_in_chunks(tiny_target_dir, head):
    """Online KD's soft labels: row t holds the teacher's top-k for token t given tokens < t (row 0 is padding),
    the same whatever the chunk of positions the output layer runs over, and for a model type whose logits are
    not a plain linear head (read from its own logits)."""
    from fastdraft.training.losses import teacher_topk

    teacher = load_model(tiny_target_dir).eval()
    if head == "other":
        teacher.config.model_type = "not-a-linear-head"
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1).topk(5, -1)
    for chunk in (3, 2048):
        got_ids, got_lp = teacher_topk(teacher, ids, None, 5, chunk_tokens=chunk)
        assert got_ids.shape == (2, 9, 5) and (got_ids[:, 0] == -1).all() and (got_lp[:, 0] == 0).all()
        assert torch.equal(got_ids[:, 1:], want.indices[:, :-1])
        torch.testing.assert_close(got_lp[:, 1:], want.values[:, :-1], rtol=1e-5, atol=1e-5)


def test_a_draft_equal_to_its_teacher_has_zero_kd_loss_and_a_different_one_does_not(tiny_target_dir, tiny_draft_dir):
    from fastdraft.training.losses import teacher_topk

    teacher = load_model(tiny_target_dir).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    topk_ids, topk_lp = teacher_topk(teacher, ids, None, teacher.config.vocab_size)  # every token: the full KL
    batch, weights = {"input_ids": ids, "topk_ids": topk_ids, "topk_logprobs": topk_lp}, torch.ones(2, 8)
    with torch.no_grad():
        itself = ChunkedLMLoss(copy.deepcopy(teacher), "kl")(batch, weights)
        other = ChunkedLMLoss(load_model(tiny_draft_dir), "kl")(batch, weights)
    assert abs(float(itself)) < 1e-4 and float(other) > 0.1  # random tiny models: both near uniform
