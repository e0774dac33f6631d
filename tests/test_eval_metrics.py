"""Metric definitions (`fastdraft.evaluation.metrics`): AR = A/D, tau = N/F, MBSU = tau/(1 + gamma*c), wall clock = t_target/t_spec.

Every expected number below is computed by hand in the comment beside it.
"""

import pytest
import torch

from fastdraft.evaluation import metrics
from fastdraft.evaluation.acceptance import simulate_blocks
from fastdraft.speculative.types import SpecStats


def test_acceptance_rate_is_accepted_over_drafted():
    assert metrics.acceptance_rate(6, 10) == pytest.approx(0.6)
    assert metrics.acceptance_rate(10, 10) == 1.0


def test_tau_is_emitted_over_target_passes():
    # 4 passes that emitted 10 tokens (6 accepted + one correction/bonus per pass)
    assert metrics.tau(10, 4) == pytest.approx(2.5)


def test_mbsu_divides_tau_by_the_cost_of_drafting():
    # tau 2.5 at gamma 3 with a draft 1/10 of the target: 2.5 / (1 + 3 * 0.1) = 1.923...
    assert metrics.mbsu(2.5, 3, 0.1) == pytest.approx(2.5 / 1.3)
    # a free draft (c = 0) makes MBSU equal tau
    assert metrics.mbsu(2.5, 3, 0.0) == 2.5


def test_wall_clock_speedup_is_target_time_over_speculative_time():
    assert metrics.wall_clock_speedup(10.0, 4.0) == pytest.approx(2.5)


def test_zero_drafted_and_zero_passes_are_undefined_not_zero():
    assert metrics.acceptance_rate(0, 0) is None
    assert metrics.tau(0, 0) is None
    assert metrics.mbsu(None, 3, 0.1) is None
    assert metrics.wall_clock_speedup(1.0, 0.0) is None
    assert metrics.format_metric(None) == "n/a"
    summary = metrics.summarize(SpecStats(), 3, metrics.CostRatio(0.1, 0.1))
    assert summary["acceptance_rate"] is None and summary["tau"] is None and summary["mbsu"] is None


def test_impossible_counts_are_rejected():
    with pytest.raises(ValueError, match="accepted"):
        metrics.acceptance_rate(5, 3)
    with pytest.raises(ValueError):
        metrics.mbsu(2.0, -1, 0.1)


def test_summary_agrees_with_spec_stats_properties():
    s = SpecStats(drafted=12, accepted=7, target_passes=5, emitted=12,
                  per_position_drafted=[5, 4, 3], per_position_accepted=[4, 2, 1])
    out = metrics.summarize(s, 3, metrics.CostRatio(params=0.1, bytes=0.05))
    assert out["acceptance_rate"] == pytest.approx(s.acceptance_rate) == pytest.approx(7 / 12)
    assert out["tau"] == pytest.approx(s.tau) == pytest.approx(12 / 5)
    assert out["mbsu"] == pytest.approx((12 / 5) / 1.3)
    assert out["mbsu_bytes"] == pytest.approx((12 / 5) / 1.15)
    assert out["per_position_acceptance"] == pytest.approx([4 / 5, 2 / 4, 1 / 3])


def test_aggregate_is_a_ratio_of_sums_not_a_mean_of_ratios():
    short = SpecStats(drafted=3, accepted=3, target_passes=1, emitted=4)    # AR 1.0
    long = SpecStats(drafted=30, accepted=0, target_passes=10, emitted=10)  # AR 0.0
    total = metrics.sum_stats([short, long])
    assert metrics.acceptance_rate(total.accepted, total.drafted) == pytest.approx(3 / 33)  # not 0.5


def test_mean_gamma_of_a_dynamic_run_is_drafted_per_pass():
    assert metrics.mean_gamma(SpecStats(drafted=9, target_passes=6)) == pytest.approx(1.5)
    assert metrics.mean_gamma(SpecStats()) is None


def test_expected_tau_iid():
    assert metrics.expected_tau_iid(1.0, 3) == 4.0          # every draft accepted: gamma + 1
    assert metrics.expected_tau_iid(0.0, 3) == 1.0          # none: one token per pass
    assert metrics.expected_tau_iid(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_cost_ratio_counts_parameters_and_bytes_with_tied_weights_once():
    target = torch.nn.Linear(4, 3)                          # 12 + 3 = 15 parameters, 60 bytes in fp32
    draft = torch.nn.Linear(2, 1).to(torch.bfloat16)        # 2 + 1 = 3 parameters, 6 bytes in bf16
    cost = metrics.CostRatio.of(draft, target)
    assert cost.params == pytest.approx(3 / 15) and cost.bytes == pytest.approx(6 / 60)
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert metrics.model_size(tied) == (40, 160)


# ---- the block process that turns per-position acceptance into D, A, F, N -------------------
def test_blocks_all_accepted_emit_gamma_plus_one_per_pass():
    # 8 tokens at gamma 3: pass 1 accepts 3 and adds a bonus (4 tokens), pass 2 the same.
    s = simulate_blocks([1.0] * 8, gamma=3)
    assert (s.drafted, s.accepted, s.target_passes, s.emitted) == (6, 6, 2, 8)
    assert metrics.tau(s.emitted, s.target_passes) == 4.0 and metrics.acceptance_rate(s.accepted, s.drafted) == 1.0


def test_blocks_none_accepted_emit_one_token_per_pass():
    # 5 tokens at gamma 2; drafts per block are capped by what can still be emitted: 2, 2, 2, 1, 0.
    s = simulate_blocks([0.0] * 5, gamma=2)
    assert (s.drafted, s.accepted, s.target_passes, s.emitted) == (7, 0, 5, 5)
    assert s.per_position_drafted == [4, 3] and s.per_position_accepted == [0, 0]


def test_blocks_mixed_greedy_matches():
    # matches 1 0 1 1 1 0 at gamma 2: [accept 1 + correction] [accept 2 + bonus] [last token, nothing to draft]
    s = simulate_blocks([1, 0, 1, 1, 1, 0], gamma=2)
    assert (s.drafted, s.accepted, s.target_passes, s.emitted) == (4, 3, 3, 6)
    assert s.per_position_drafted == [2, 2] and s.per_position_accepted == [2, 1]


def test_blocks_with_acceptance_probabilities_give_expected_counters():
    # 2 tokens at gamma 1, beta 0.5: half the time one pass emits both, half the time two passes.
    s = simulate_blocks([0.5, 0.5], gamma=1)
    assert s.target_passes == pytest.approx(1.5) and s.accepted == pytest.approx(0.5)
    assert s.drafted == 1 and s.emitted == pytest.approx(2)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_blocks_conserve_tokens_and_match_the_iid_formula(gamma):
    alpha = 0.7
    s = simulate_blocks([alpha] * 5000, gamma)
    assert s.emitted == pytest.approx(5000)                       # every token is emitted exactly once
    assert s.accepted + s.target_passes == pytest.approx(s.emitted)  # N = A + F: one extra token per pass
    assert s.tau == pytest.approx(metrics.expected_tau_iid(alpha, gamma), rel=2e-3)


def test_empty_continuation_has_no_counts():
    s = simulate_blocks([], gamma=3)
    assert (s.drafted, s.accepted, s.target_passes, s.emitted) == (0, 0, 0, 0)


def test_blocks_after_a_stop_token_draft_like_the_engine_and_emit_nothing_past_it():
    # 3 tokens, the last one EOS, budget 10, gamma 3: one pass drafts 3 (budget allows), all 3 accepted,
    # the bonus token past EOS is dropped: N = 3, and no second pass.
    s = simulate_blocks([1.0, 1.0, 1.0], gamma=3, max_new_tokens=10)
    assert (s.drafted, s.accepted, s.target_passes, s.emitted, s.truncated) == (3, 3, 1, 3, 1)
    # the draft misses the EOS: 2 accepted + EOS as the correction, still one pass
    s = simulate_blocks([1.0, 1.0, 0.0], gamma=3, max_new_tokens=10)
    assert (s.drafted, s.accepted, s.target_passes, s.emitted) == (3, 2, 1, 3)


@pytest.mark.parametrize("tied", [True, False])
def test_sizes_from_shapes_alone_equal_the_loaded_models(tmp_path, tied):
    """Evaluation counts the target's size from its config on the meta device (no weights in the driver)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fastdraft.checkpoint import load_model, load_shape
    from fastdraft.evaluation.metrics import model_size, read_size

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    shape, model = load_shape(tmp_path / "m"), load_model(tmp_path / "m")
    assert next(shape.parameters()).device.type == "meta"
    assert model_size(shape) == model_size(model) and read_size(shape) == read_size(model)
