"""Draft pre-training (issue 4): the shared loop's pieces, the recipe checks, and a real Ray Train run.

The Ray run trains a tiny draft through PT then CP on shards written directly with pyarrow (the shard
contract), on 2 workers with half a CPU each, with a crash injected mid-PT.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastdraft.checkpoint import read_metadata
from fastdraft.config import ComputeConfig, OptimConfig
from fastdraft.errors import FastdraftError, MissingDependencyError, TokenizerMismatchError
from fastdraft.training.backends import check_available, scaling_for, torch_config_for
from fastdraft.training.loop import budget_row_lengths, loss_weights, lr_at, read_log, steps_for_budget
from train_fixtures import SEQ_LEN, recipe_for, write_shards



# ---------------------------------------------------------------------------------------------
# The loop's pure pieces
# ---------------------------------------------------------------------------------------------
def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    optim = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, 20, optim) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, optim) == pytest.approx(1.0)
    assert lr_at(12, 20, optim) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(20, 20, optim) == pytest.approx(0.1)
    assert all(lr_at(s, 20, optim) >= lr_at(s + 1, 20, optim) for s in range(4, 20))


@pytest.mark.parametrize("remaining", [1, 31, 32, 33, 300, 511])
def test_the_last_step_is_cut_to_exactly_the_remaining_tokens(remaining):
    world, accum, rows = 2, 2, 4
    assert remaining < world * accum * rows * SEQ_LEN
    lengths = [budget_row_lengths(remaining, m, r, world, rows, SEQ_LEN) for m in range(accum) for r in range(world)]
    assert sum(int(x.sum()) for x in lengths) == remaining
    assert all(((x >= 0) & (x <= SEQ_LEN)).all() for x in lengths)


def test_steps_for_budget_rounds_up_to_cover_the_budget():
    assert steps_for_budget(1024, 2, 2, 4, 32) == 2
    assert steps_for_budget(1025, 2, 2, 4, 32) == 3


def test_loss_weights_follow_the_mask_and_the_budget():
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])}
    w = loss_weights(batch, np.array([6, 3]))
    # position t-1 of the weights scores token t; row 1 keeps its first 3 tokens (2 predictions)
    assert w.tolist() == [[0, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Devices: what the recipe asks for, and clear errors where it is absent
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freeze", [False, True])
def test_the_optimizer_is_fused_on_cpu_and_freeze_embeddings_keeps_the_token_embeddings(tiny_draft_dir, freeze):
    """optim.freeze_embeddings: one AdamW step moves the layers and leaves the token embeddings (and an output
    layer tied to them) exactly as they were; without it the embeddings move too."""
    from fastdraft.checkpoint import load_model
    from fastdraft.training.loop import build_optimizer

    model = load_model(tiny_draft_dir).train()
    embeddings = model.get_input_embeddings().weight
    layer = next(p for name, p in model.named_parameters() if "layers.0." in name and p.ndim == 2)
    before = embeddings.detach().clone(), layer.detach().clone()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, freeze_embeddings=freeze))
    assert optimizer.defaults["fused"] is True  # torch's fused AdamW on CPU
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(layer, before[1])
    assert torch.equal(embeddings, before[0]) == freeze
    assert embeddings.requires_grad != freeze


def test_scaling_uses_fractional_cpus_and_one_accelerator_per_worker():
    cpu = scaling_for(ComputeConfig(num_workers=2, cpus_per_worker=0.5))
    assert cpu.resources_per_worker == {"CPU": 0.5} and not cpu.use_gpu
    gpu = scaling_for(ComputeConfig(device="cuda", num_workers=4, cpus_per_worker=2))
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 2, "GPU": 1}
    hpu = scaling_for(ComputeConfig(device="hpu", num_workers=8, cpus_per_worker=1))
    assert hpu.resources_per_worker == {"CPU": 1, "HPU": 1}
    assert [torch_config_for(ComputeConfig(device=d)).backend for d in ("cpu", "cuda", "hpu")] == ["gloo", "nccl", "hccl"]


def test_cuda_without_gpus_in_the_cluster_is_refused_before_training():
    with pytest.raises(FastdraftError, match=r"compute.device is 'cuda' but the Ray cluster has 0 GPU"):
        check_available(ComputeConfig(device="cuda", num_workers=2), cluster_resources={"CPU": 4})


def test_hpu_without_habana_stack_names_the_missing_package():
    with pytest.raises(MissingDependencyError, match=r"Intel Gaudi.*habana_frameworks"):
        check_available(ComputeConfig(device="hpu"), cluster_resources={"CPU": 4, "HPU": 8})


# ---------------------------------------------------------------------------------------------
# Recipe errors stop before any training
# ---------------------------------------------------------------------------------------------
def test_shards_from_another_tokenizer_are_refused(tmp_path, tiny_target_dir, tiny_draft_dir):
    from fastdraft.training.pretrain import run_pretrain

    write_shards(tmp_path / "run/data/pt", tiny_target_dir, SEQ_LEN, 16, 4, fingerprint="tok-someoneelse")
    with pytest.raises(TokenizerMismatchError, match=r"tok-someoneelse"):
        run_pretrain(recipe_for(tmp_path / "run", tiny_target_dir, init=tiny_draft_dir))
    assert not (tmp_path / "run/train").exists()  # nothing started


def test_missing_or_incomplete_shards_are_refused(tmp_path, tiny_target_dir, tiny_draft_dir):
    from fastdraft.training.pretrain import run_pretrain

    recipe = recipe_for(tmp_path / "run", tiny_target_dir, init=tiny_draft_dir,
                        stages=[{"name": "PT", "corpus": "pt", "tokens": 100}, {"name": "CP", "corpus": "cp", "tokens": 100}])
    write_shards(tmp_path / "run/data/pt", tiny_target_dir, SEQ_LEN, 16, 4)
    with pytest.raises(FastdraftError, match=r"no packed shards at .*data/cp .*run `fastdraft prepare` first"):
        run_pretrain(recipe)
    manifest = write_shards(tmp_path / "run/data/cp", tiny_target_dir, SEQ_LEN, 16, 4)
    (tmp_path / "run/data/cp/manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(FastdraftError, match=r"data/cp/manifest.json says the shards are incomplete"):
        run_pretrain(recipe)
    assert not (tmp_path / "run/drafts/PT").exists()


# ---------------------------------------------------------------------------------------------
# A real run: PT then CP on 2 workers, crash injected mid-PT
# ---------------------------------------------------------------------------------------------
PT_TOKENS, CP_TOKENS = 4000, 1200  # 256 tokens per step: PT = 15 full steps + 160 tokens, CP = 4 + 176 (under the crash step)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_target_dir, ray_session):
    """Streamed from the shards (as a real corpus is; the demo's small ones go through memory)."""
    from fastdraft.training import pretrain

    run = tmp_path_factory.mktemp("pretrain") / "run"
    write_shards(run / "data/pt", tiny_target_dir, SEQ_LEN, 160, 8)
    write_shards(run / "data/cp", tiny_target_dir, SEQ_LEN, 64, 8, offset_docs=300)
    recipe = recipe_for(run, tiny_target_dir, crash_at_step=6, in_memory_mb=0,
                        stages=[{"name": "PT", "corpus": "pt", "tokens": PT_TOKENS}, {"name": "CP", "corpus": "cp", "tokens": CP_TOKENS}])
    return recipe, pretrain.run_pretrain(recipe)


@pytest.mark.timeout(300)
def test_small_corpora_go_through_memory_with_the_same_rows_in_the_same_order(tmp_path, tiny_target_dir, ray_session):
    from fastdraft.training import pretrain

    write_shards(tmp_path / "pt", tiny_target_dir, SEQ_LEN, 160, 8)
    in_memory = pretrain.train_dataset(tmp_path / "pt/train", in_memory_mb=64)
    streamed = pretrain.train_dataset(tmp_path / "pt/train", in_memory_mb=0)
    for ds in (in_memory, streamed):  # as Ray Train reads them (loop.fit: a resumed worker must see the same rows)
        ds.context.execution_options.preserve_order = True
    rows = [[int(t) for t in r["input_ids"]] for r in in_memory.iter_rows()]
    assert len(rows) > 8 and rows == [[int(t) for t in r["input_ids"]] for r in streamed.iter_rows()]
    assert "ReadFiles" in streamed.stats() and "ReadFiles" not in in_memory.stats()  # read tasks vs blocks in memory


@pytest.mark.timeout(600)
def test_each_stage_trains_exactly_its_token_budget_and_records_its_history(pretrained):
    recipe, summary = pretrained
    assert summary["PT"]["tokens"] == PT_TOKENS and summary["CP"]["tokens"] == CP_TOKENS
    meta = read_metadata(summary["final"])
    assert meta.stages == ["PT", "CP"]
    assert [r.tokens for r in meta.history] == [PT_TOKENS, CP_TOKENS]
    assert meta.tokens_seen == PT_TOKENS + CP_TOKENS
    assert meta.tokenizer_fingerprint == read_metadata(summary["init"]).tokenizer_fingerprint
    for stage in ("PT", "CP"):  # every final draft is a usable HF directory with the tokenizer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = recipe.run_dir / "drafts" / stage
        AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
        assert not list(d.glob("trainer_state*"))


@pytest.mark.timeout(600)
def test_validation_loss_decreases_on_two_workers(pretrained):
    _, summary = pretrained
    log = read_log(summary["PT"]["log"])
    assert {r["world_size"] for r in log} == {2}
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.2
    assert math.isclose(log[-1]["val_ppl"], math.exp(log[-1]["val_loss"]), rel_tol=1e-6)


@pytest.mark.timeout(600)
def test_a_crash_resumes_from_the_last_checkpoint_and_ends_at_the_same_token_count(pretrained):
    recipe, summary = pretrained
    log = read_log(summary["PT"]["log"])
    crash = json.loads((recipe.run_dir / "train" / f"{summary['PT']['run']}.crashed").read_text())
    assert crash["step"] == 6
    steps = [r["step"] for r in log]
    # step 4 was checkpointed before the crash at 6; the retry starts there (not from scratch) and
    # reports 8, 12, ... exactly once each
    assert steps == [4, 8, 12, 16]
    assert [r["resumed_from_step"] for r in log] == [None, 4, 4, 4]
    assert log[-1]["tokens"] == PT_TOKENS


@pytest.mark.timeout(600)
def test_cp_starts_from_the_pt_weights(pretrained):
    _, summary = pretrained
    pt, cp = read_log(summary["PT"]["log"]), read_log(summary["CP"]["log"])
    # a from-scratch draft starts near ln(vocab) = 6.2; CP's first loss is already near PT's last
    assert cp[0]["loss"] < pt[0]["loss"] - 0.3
    assert cp[-1]["resumed_from_step"] is None


@pytest.mark.timeout(120)
def test_rerunning_the_recipe_skips_finished_stages(pretrained):
    from fastdraft.training.pretrain import run_pretrain

    recipe, _ = pretrained
    again = run_pretrain(recipe)
    assert again["PT"]["skipped"] and again["CP"]["skipped"]


@pytest.fixture(scope="module")
def sharp_target_dir(tmp_path_factory, tiny_target_dir):
    """The tiny target with its final norm scaled 20x: logits 20x larger, so its next-token distribution is peaked
    (a random tiny model's is near uniform, nothing a draft could learn)."""
    from fastdraft.checkpoint import load_model

    out = tmp_path_factory.mktemp("sharp") / "target"
    model = load_model(tiny_target_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(20)
    model.save_pretrained(out)
    for f in tiny_target_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.timeout(600)
def test_pretraining_on_the_targets_top_k_teaches_the_draft_the_targets_next_token(tmp_path, sharp_target_dir, ray_session):
    """`pretrain.loss: kl`: each micro-batch goes through the target in the worker, and the draft learns its top-k
    distribution on the corpus: the KL falls, and validation reports agreement with the target's top token (greedy
    acceptance at gamma 1; the demo's draft reaches 0.19 on the target's answers from prose alone). A CE stage keeps the key it had before the KD settings existed."""
    from fastdraft.training.pretrain import run_pretrain, stage_key

    run = tmp_path / "run"
    write_shards(run / "data/pt", sharp_target_dir, SEQ_LEN, 160, 8)
    recipe = recipe_for(run, sharp_target_dir, loss="kl", teacher_topk=16, compute={"num_workers": 1, "cpus_per_worker": 0.5},
                        optim={"lr": 1e-2, "warmup_steps": 2}, eval_every=8, ckpt_every=8,
                        stages=[{"name": "PT", "corpus": "pt", "tokens": 6144}])
    summary = run_pretrain(recipe)
    log = read_log(summary["PT"]["log"])
    assert all("val_agreement" in r for r in log) and log[-1]["tokens"] == 6144
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]  # the KL to the target's top-k (+ rest)
    assert all(0 <= r["val_agreement"] <= 1 for r in log)
    start, manifest, stage = read_metadata(summary["init"]), {"section_hash": "x"}, recipe.pretrain.stages[0]
    key = lambda **change: stage_key(recipe.pretrain.model_copy(update=change), stage, start, manifest)  # noqa: E731
    assert key(loss="ce") != key(loss="kl") != key(loss="kl", teacher_topk=8)
    assert key(loss="ce") == key(loss="ce", teacher_topk=8, teacher_dtype="bfloat16")  # a CE stage's key does not see the KD settings
