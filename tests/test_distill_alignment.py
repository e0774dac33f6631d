"""Distillation (issue 6): response-only loss mask, packing, token-level KD losses, and a real Ray Train run
that makes a tiny draft agree with its tiny target more often on held-out prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdraft.checkpoint import read_metadata
from fastdraft.config import recipe_from_dict
from fastdraft.errors import FastdraftError, TokenizerMismatchError
from fastdraft.training.distill import pack_examples, split_heldout
from fastdraft.training.losses import per_token_loss, sparse_kd
from fastdraft.training.loop import loss_weights, read_log, to_tensors
from train_fixtures import write_alignment

PAD = 0


def ex(prompt, response, k=0):
    out = {"prompt_ids": prompt, "response_ids": response}
    if k:
        out["topk_ids"] = [[t] + [1] * (k - 1) for t in response]
        out["topk_logprobs"] = [[-0.1] * k for _ in response]
    return out


# ---------------------------------------------------------------------------------------------
# Loss mask and packing
# ---------------------------------------------------------------------------------------------
def test_prompt_tokens_get_no_loss_and_the_first_response_token_does():
    packed, dropped = pack_examples([ex([5, 6, 7], [8, 9]), ex([10, 11], [12, 13, 14])], seq_len=12, pad_id=PAD)
    assert dropped == 0 and packed["input_ids"].shape == (1, 12)  # both samples share one row
    assert packed["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, PAD, PAD]
    assert packed["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    w = loss_weights(to_tensors(packed, torch.device("cpu")), None)[0]
    # weight at t-1 scores token t: token 8 (first response token, predicted from prompt token 7) counts,
    # token 10 (next sample's prompt, predicted across the boundary) does not
    assert w.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0]


def test_prompt_predictions_do_not_move_the_loss():
    packed, _ = pack_examples([ex([5, 6, 7], [8, 9])], seq_len=6, pad_id=PAD)
    batch = to_tensors(packed, torch.device("cpu"))
    logits = torch.randn(1, 6, 32, requires_grad=True)
    (per_token_loss("ce", logits, batch) * loss_weights(batch, None)).sum().backward()
    # logits at positions 0, 1 predict prompt tokens 6, 7; 2 and 3 predict the response; 4+ predict padding
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 4:].abs().sum() == 0
    assert (logits.grad[0, 2:4].abs().sum(-1) > 0).all()


def test_without_packing_each_sample_gets_its_own_padded_row_and_overlong_ones_are_cut_or_dropped():
    packed, dropped = pack_examples([ex([1, 2], [3]), ex([4], [5, 6, 7, 8, 9]), ex([1] * 6, [2])], seq_len=5, pad_id=PAD, packing=False)
    assert dropped == 1  # its prompt alone fills the row
    assert packed["input_ids"].tolist() == [[1, 2, 3, PAD, PAD], [4, 5, 6, 7, 8]]
    assert packed["loss_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]


def test_stored_topk_lands_on_the_response_positions():
    packed, _ = pack_examples([ex([5, 6], [8, 9], k=2)], seq_len=5, pad_id=PAD, topk=2)
    assert packed["topk_ids"][0, :, 0].tolist() == [-1, -1, 8, 9, -1]
    assert np.allclose(packed["topk_logprobs"][0, 2:4], -0.1)


def test_heldout_prompts_are_stable_and_whole():
    ids = [f"p{i}" for i in range(20) for _ in range(3)]
    held = split_heldout(ids, 4)
    assert len(held) == 4 and held == split_heldout(list(reversed(ids)), 4)
    with pytest.raises(FastdraftError, match="would leave none to train on"):
        split_heldout(ids, 20)


# ---------------------------------------------------------------------------------------------
# Token-level KD losses against hand-computed values
# ---------------------------------------------------------------------------------------------
def test_kd_with_the_full_vocabulary_equals_exact_kl_and_tvd():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    logp = torch.log_softmax(teacher, -1)
    ids = torch.arange(5).expand(2, 3, 5)
    kl, tvd = sparse_kd(student, ids, logp)
    q = torch.softmax(student, -1)
    assert torch.allclose(kl, (logp.exp() * (logp - q.log())).sum(-1), atol=1e-5)
    assert torch.allclose(tvd, 0.5 * (logp.exp() - q).abs().sum(-1), atol=1e-6)


def test_kd_with_top1_uses_a_rest_bucket():
    # student uniform over 4 tokens; teacher puts 0.7 on token 2 (the rest, 0.3, is one bucket)
    student = torch.zeros(1, 1, 4)
    kl, tvd = sparse_kd(student, torch.tensor([[[2]]]), torch.log(torch.tensor([[[0.7]]])))
    expected_kl = 0.7 * np.log(0.7 / 0.25) + 0.3 * np.log(0.3 / 0.75)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)
    assert tvd.item() == pytest.approx(0.5 * (abs(0.7 - 0.25) + abs(0.3 - 0.75)), abs=1e-6)


def test_the_papers_mixes_are_half_ce_half_kd():
    packed, _ = pack_examples([ex([5, 6], [8, 9], k=3)], seq_len=5, pad_id=PAD, topk=3)
    batch = to_tensors(packed, torch.device("cpu"))
    logits = torch.randn(1, 5, 16)
    ce, kl, tvd = (per_token_loss(k, logits, batch) for k in ("ce", "kl", "tvd"))
    assert torch.allclose(per_token_loss("ce+kl", logits, batch), 0.5 * ce + 0.5 * kl)
    assert torch.allclose(per_token_loss("ce+tvd", logits, batch), 0.5 * ce + 0.5 * tvd)
    with pytest.raises(ValueError, match="store_topk"):
        per_token_loss("kl", logits, {"input_ids": batch["input_ids"]})


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def distill_recipe(run_dir, target_dir, draft_dir, **distill):
    base = {"init": str(draft_dir), "loss": "ce", "epochs": 6, "seq_len": 64, "micro_batch_size": 4,
            "optim": {"lr": 1e-2, "warmup_steps": 2}, "compute": {"num_workers": 1, "cpus_per_worker": 0.5},
            "eval_every": 10, "ckpt_every": 10, "eval_prompts": 8}
    base.update(distill)
    return recipe_from_dict({"name": "d", "workdir": str(run_dir), "target": {"model": str(target_dir)}, "distill": base})


def test_an_alignment_set_from_another_tokenizer_is_refused(tmp_path, tiny_target_dir, tiny_draft_dir):
    from fastdraft.training.distill import run_distill

    write_alignment(tmp_path / "run/alignment", tiny_target_dir, prompts=4, new_tokens=2, fingerprint="tok-other")
    with pytest.raises(TokenizerMismatchError, match="tok-other"):
        run_distill(distill_recipe(tmp_path / "run", tiny_target_dir, tiny_draft_dir))


def test_token_kd_without_stored_topk_is_refused(tmp_path, tiny_target_dir, tiny_draft_dir):
    from fastdraft.training.distill import run_distill

    write_alignment(tmp_path / "run/alignment", tiny_target_dir, prompts=4, new_tokens=2)
    with pytest.raises(FastdraftError, match="store_topk > 0"):
        run_distill(distill_recipe(tmp_path / "run", tiny_target_dir, tiny_draft_dir, loss="ce+kl"))


@pytest.fixture(scope="module")
def swap_target_dir(tmp_path_factory, tiny_target_dir):
    """The tiny target with an untied output head that swaps token pairs (2k <-> 2k+1).

    Random models with tied embeddings predict "repeat the last token", and so would an untrained draft; this
    target instead answers with alternating pairs that depend on its context, which a draft has to learn.
    """
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("swap") / "target"
    base = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_target_dir, tie_word_embeddings=False))
    model.load_state_dict(base.state_dict(), strict=False)
    emb = base.get_input_embeddings().weight.data
    model.lm_head.weight.data = emb[torch.arange(emb.shape[0]) ^ 1].clone()
    model.save_pretrained(out)
    for f in tiny_target_dir.iterdir():
        if "token" in f.name or "template" in f.name:
            shutil.copy2(f, out / f.name)
    return out


@pytest.mark.timeout(600)
def test_distillation_raises_agreement_with_the_target_on_heldout_prompts(tmp_path, swap_target_dir, tiny_draft_dir, ray_session):
    from fastdraft.training.distill import run_distill

    # held-out prompts are other texts ending in the same few tokens as training prompts
    write_alignment(tmp_path / "run/alignment", swap_target_dir, prompts=48, new_tokens=12, endings=[100, 102, 104, 106])
    summary = run_distill(distill_recipe(tmp_path / "run", swap_target_dir, tiny_draft_dir))
    assert summary["agreement_after"] >= summary["agreement_before"] + 0.1
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.5
    log = read_log(summary["log"])
    assert summary["agreement_after"] == max(r["val_agreement"] for r in log)  # the best checkpoint is kept
    meta = read_metadata(summary["out"])
    assert meta.stages[-1] == "FT" and meta.extra["metrics"]["FT"]["selected_step"] == summary["selected_step"]


def test_the_targets_heldout_argmax_without_a_stored_top_k_is_its_next_token_argmax(tiny_target_dir):
    """Without stored top-k, held-out agreement is scored against the target's own argmax (teacher forcing,
    packed rows with restarting positions): position t holds the argmax for token t, -1 outside the responses."""
    import numpy as np
    import torch

    from fastdraft.checkpoint import load_model
    from fastdraft.training.distill import pack_examples, target_argmax

    rng = np.random.default_rng(0)
    examples = [{"prompt_ids": rng.integers(3, 200, 5).tolist(), "response_ids": rng.integers(3, 200, n).tolist()} for n in (6, 9, 4)]
    packed, _ = pack_examples(examples, 32, 0)
    got = target_argmax(str(tiny_target_dir), packed)
    model = load_model(tiny_target_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(packed["input_ids"], dtype=torch.long),
                       position_ids=torch.as_tensor(packed["position_ids"], dtype=torch.long)).logits
    want = np.full(packed["input_ids"].shape, -1)
    want[:, 1:] = logits.argmax(-1)[:, :-1].numpy()
    assert (packed["loss_mask"] > 0).sum() == 19
    assert np.array_equal(got, np.where(packed["loss_mask"] > 0, want, -1))
