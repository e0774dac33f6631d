"""Offline acceptance measurement: exact for greedy (checked against a naive speculative loop), expected for sampling."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdraft.evaluation.acceptance import acceptance_probs, offline_sweep, target_continuations
from fastdraft.evaluation.tasks import EvalPrompt, EvalTask
from fastdraft.speculative.types import SamplingParams, SpecStats
from eval_fixtures import eval_pair  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEVER = 511  # a token id the tiny target does not produce in these tests: "no stop token"


def naive_greedy_speculative(target, draft, prompt: list[int], gamma: int, max_new: int) -> tuple[list[int], SpecStats]:
    """Reference: draft k = min(gamma, tokens left - 1) greedy tokens, verify with one full target pass, no caches."""
    out, s = [], SpecStats(per_position_drafted=[0] * gamma, per_position_accepted=[0] * gamma)
    with torch.no_grad():
        while len(out) < max_new:
            ctx = prompt + out
            k = min(gamma, max_new - len(out) - 1)
            proposal = []
            for _ in range(k):
                proposal.append(int(draft(torch.tensor([ctx + proposal])).logits[0, -1].argmax()))
            preds = target(torch.tensor([ctx + proposal])).logits[0, len(ctx) - 1:].argmax(-1).tolist()
            j = 0
            while j < k and proposal[j] == preds[j]:
                j += 1
            out += proposal[:j] + [preds[j]]
            s.drafted, s.accepted, s.target_passes, s.emitted = s.drafted + k, s.accepted + j, s.target_passes + 1, s.emitted + j + 1
            for i in range(k):
                s.per_position_drafted[i] += 1
                s.per_position_accepted[i] += int(i < j)
    return out, s


@pytest.fixture(scope="module")
def models(eval_pair):  # noqa: F811
    target_dir, draft_dir = eval_pair
    return AutoModelForCausalLM.from_pretrained(target_dir).eval(), AutoModelForCausalLM.from_pretrained(draft_dir).eval()


def make_task(n_prompts=4, max_new=24, seed=0) -> EvalTask:
    g = torch.Generator().manual_seed(seed)
    prompts = [EvalPrompt(f"p{i}", "", torch.randint(3, 500, (8,), generator=g).tolist()) for i in range(n_prompts)]
    return EvalTask("rand", "jsonl", prompts, max_new, chat=False)


def test_greedy_offline_counters_equal_a_real_speculative_loop(models):
    target, draft = models
    task = make_task()
    greedy = SamplingParams(temperature=0.0, stop_token_ids=(NEVER,))
    conts = target_continuations(target, task, greedy)
    sweep = offline_sweep(target, draft, conts, greedy, gammas=[1, 3, 5])
    for gamma in (1, 3, 5):
        ref = SpecStats()
        for prompt, cont in zip(task.prompts, conts):
            out, s = naive_greedy_speculative(target, draft, prompt.ids, gamma, task.max_new_tokens)
            assert out == cont.ids  # lossless, and the continuation the offline method replays
            ref += s
        got = sweep[gamma]
        assert (got.drafted, got.accepted, got.target_passes, got.emitted) == \
               (ref.drafted, ref.accepted, ref.target_passes, ref.emitted)
        assert got.per_position_accepted == ref.per_position_accepted
    assert 0.1 < sweep[3].acceptance_rate < 0.95  # the pair agrees partially: the test can tell counts apart


def test_a_draft_identical_to_the_target_is_always_accepted(models):
    target, _ = models
    task = make_task(n_prompts=2, max_new=12)
    for params in (SamplingParams(temperature=0.0, stop_token_ids=(NEVER,)),
                   SamplingParams(temperature=0.6, top_p=0.9, stop_token_ids=(NEVER,))):
        s = offline_sweep(target, target, target_continuations(target, task, params), params, gammas=[3])[3]
        assert s.acceptance_rate == pytest.approx(1.0)
        assert s.tau == pytest.approx(4.0, rel=0.1)  # gamma + 1, less a short last block


def test_sampled_acceptance_is_the_overlap_of_the_two_distributions():
    p = torch.log(torch.tensor([[0.6, 0.4, 1e-12]]))
    q = torch.log(torch.tensor([[0.1, 0.5, 0.4]]))
    # sum_x min(p, q) = 0.1 + 0.4 + 0 = 0.5
    assert acceptance_probs(p, q, SamplingParams(temperature=1.0)) == pytest.approx([0.5], abs=1e-6)
    # greedy: the target's token is 0, the draft's argmax is 1: rejected
    assert acceptance_probs(p, q, SamplingParams(temperature=0.0), continuation=[0]) == [0.0]


def test_sampled_offline_acceptance_is_a_probability_and_conserves_tokens(models):
    target, draft = models
    task = make_task(n_prompts=3, max_new=16)
    params = SamplingParams(temperature=0.6, stop_token_ids=(NEVER,))
    conts = target_continuations(target, task, params, seed=3)
    s = offline_sweep(target, draft, conts, params, gammas=[1, 3])
    assert 0.0 < s[3].acceptance_rate < 1.0
    assert s[3].emitted == pytest.approx(sum(len(c.ids) for c in conts))  # every generated token counted once
    assert s[3].per_position_accepted[0] / s[3].per_position_drafted[0] >= \
        s[3].per_position_accepted[2] / s[3].per_position_drafted[2]  # deeper positions need all earlier accepted


@pytest.mark.timeout(120)
def test_sampled_offline_expectation_predicts_the_engines_measured_acceptance(models):
    from fastdraft.evaluation.acceptance import Continuation
    from fastdraft.speculative.engine import SpeculativeEngine

    target, draft = models
    engine = SpeculativeEngine(target, draft, gamma=3)
    g = torch.Generator().manual_seed(0)
    conts, measured = [], SpecStats()
    for i in range(20):
        prompt = torch.randint(3, 500, (8,), generator=g).tolist()
        params = SamplingParams(temperature=0.6, max_new_tokens=32, stop_token_ids=(NEVER,), seed=i)
        conts.append(Continuation(prompt, engine.generate([prompt], params, gamma=0)[0].token_ids))
        measured += engine.generate([prompt], params)[0].stats
    expected = offline_sweep(target, draft, conts, params, [3], 32)[3]
    # ~600 drafted tokens: the engine's sampled AR has a standard error of about 0.012
    assert expected.acceptance_rate == pytest.approx(measured.acceptance_rate, abs=0.06)
    assert expected.tau == pytest.approx(measured.tau, rel=0.05)
