"""The speculative engine is lossless, counts exactly, and handles batches, stops and bad input.

Oracle: transformers' own `generate`. Tiny models run in float64 so that a near-tie in the logits can
never make two correct implementations disagree; SmolLM2 runs in float32 as users run it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fastdraft.checkpoint import load_model
from fastdraft.errors import FastdraftError, TokenizerMismatchError
from fastdraft.models import restrict_head
from fastdraft.quantize import round_model_to_int8_
from fastdraft.speculative.decoders import HFDecoder, LeanDecoder
from fastdraft.speculative.engine import SpeculativeEngine
from fastdraft.speculative.pairs import agreeing_pair, disagreeing_copy
from fastdraft.speculative.types import SamplingParams, SpecStats
from spec_fixtures import check_counters, hf_greedy, make_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models gain nothing from two threads

F64 = torch.float64


def random_llama(vocab: int, hidden: int, layers: int, seed: int, dtype=F64, head_scale: float = 1.0):
    """A random Llama with an untied head (a tied random head mostly repeats its input token)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, tie_word_embeddings=False,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def tiny_target(tiny_target_dir):
    return load_model(tiny_target_dir, dtype=F64)


@pytest.fixture(scope="module")
def pairs(tiny_target, tiny_draft_dir):
    """name -> (target, draft): a random draft (mostly rejections), the factory's untrained draft,
    and an agreeing pair (mostly acceptances); the "-float32" pairs run the native CPU kernel in the loop, the
    "-int8" pair its int8 draft weights."""
    agree_t, agree_d = agreeing_pair(vocab_size=512, hidden=128, layers=4, draft_layers=2, heads=4, kv_heads=2,
                                     intermediate=256, seed=3, dtype=F64)
    f32_t, f32_d = agreeing_pair(vocab_size=512, hidden=128, layers=4, draft_layers=2, heads=4, kv_heads=2,
                                 intermediate=352, seed=5, dtype=torch.float32)
    # The agreeing draft with an output layer over part of the vocabulary: it can propose only those tokens.
    subset_t, subset_d = agreeing_pair(vocab_size=512, hidden=128, layers=4, draft_layers=2, heads=4, kv_heads=2,
                                       intermediate=352, seed=5, dtype=torch.float32)
    restrict_head(subset_d, subset_head_ids(subset_t))
    int8_t, int8_d = agreeing_pair(vocab_size=512, hidden=128, layers=4, draft_layers=2, heads=4, kv_heads=2,
                                   intermediate=352, seed=5, dtype=torch.float32)
    return {
        "agreeing-int8": (int8_t, round_model_to_int8_(int8_d)),  # run with draft_weights="int8"
        "subset-float32": (subset_t, subset_d),
        "random": (tiny_target, random_llama(tiny_target.config.vocab_size, 64, 1, seed=7)),
        "factory": (tiny_target, load_model(tiny_draft_dir, dtype=F64)),
        "agreeing": (agree_t, agree_d),
        "agreeing-float32": (f32_t, f32_d),
        "random-float32": (f32_t, disagreeing_copy(f32_d)),
    }


def subset_head_ids(target) -> list[int]:
    """The tokens the target emits greedily on the first 4 test prompts, and every even id: the target's outputs
    on the other prompts include tokens the draft cannot propose."""
    emitted = {t for p in make_prompts(8, seed=1)[:4] for t in hf_greedy(target, p, 37, stop=2)}
    return sorted(emitted | set(range(0, target.config.vocab_size, 2)))


def test_lean_forward_matches_transformers_logits(tiny_target, pairs):
    """Max abs logit difference vs transformers, in float64 (tiny target) and on a ragged batch."""
    ids = torch.arange(5, 17).repeat(2, 1)
    for model in (tiny_target, pairs["agreeing"][0]):
        lean = LeanDecoder(model)
        cache = lean.new_cache(2, 64)
        with torch.inference_mode():
            ours, ref = lean.forward(cache, ids, [0, 0], "all"), model(ids).logits
            # continue ragged: row 0 from position 12, row 1 rolled back to position 7
            ours2 = lean.forward(cache, torch.tensor([[20, 21], [22, 23]]), [12, 7], "all")
            ref2 = torch.stack([model(torch.cat([ids[0], torch.tensor([20, 21])])[None]).logits[0, -2:],
                                model(torch.cat([ids[1, :7], torch.tensor([22, 23])])[None]).logits[0, -2:]])
        diff = max((ours - ref).abs().max().item(), (ours2 - ref2).abs().max().item())
        print(f"lean vs transformers, float64: max abs logit difference {diff:.2e}")
        assert diff < 1e-9


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair", ["random", "agreeing", "random-float32", "agreeing-float32", "subset-float32",
                                  "agreeing-int8"])
def test_greedy_equals_transformers_generate(pairs, pair):
    """Token for token equal to the target's greedy `generate`, gamma 1..8, batch 1 and 8, stops mid-block.
    "subset": the draft's output layer covers part of the vocabulary (`SubsetHead`), and the target's greedy
    output has tokens outside it: the draft never proposes them, the target's correction emits them.
    "int8": the draft's matrices streamed as int8 (`draft_weights="int8"`)."""
    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft, draft_weights="int8" if pair.endswith("int8") else "float")
    assert engine.target.kernels == ("torch" if pair in ("random", "agreeing") else "native")
    assert engine.draft.weights == ("int8" if pair.endswith("int8") else "float")
    prompts = make_prompts(8, seed=1)
    free = [hf_greedy(target, p, 37, stop=2) for p in prompts]
    stop = free[0][9]  # a token the target emits mid-output: stops land inside draft blocks
    stopped = [hf_greedy(target, p, 37, stop=stop) for p in prompts]
    assert any(len(s) < 37 for s in stopped)
    checked, acceptance = 0, []
    for gamma in range(1, 9):
        for stop_id, refs in ((2, free), (stop, stopped)):
            params = SamplingParams(max_new_tokens=37, stop_token_ids=(stop_id,))
            results = engine.generate(prompts, params, gamma=gamma)
            assert [r.token_ids for r in results] == refs, f"gamma {gamma}, stop {stop_id}"
            assert [r.finish_reason for r in results] == ["stop" if ref[-1] == stop_id else "length" for ref in refs]
            check_counters(results, engine)
            acceptance.append(engine.last_stats.acceptance_rate)
            checked += len(prompts)
        if gamma in (1, 4, 8):
            for p, ref in zip(prompts[:3], stopped[:3]):
                [r] = engine.generate([p], SamplingParams(max_new_tokens=37, stop_token_ids=(stop,)), gamma=gamma)
                assert r.token_ids == ref
                checked += 1
    assert checked >= 100
    mean = sum(acceptance) / len(acceptance)
    if pair.startswith("subset"):  # what it can propose it proposes right; the rest it cannot
        outside = sum(t not in set(draft.lm_head.ids.tolist()) for ref in free for t in ref)
        assert outside > 0 and 0.5 < mean < 0.99, f"{pair}: {outside} target tokens outside the head, acceptance {mean:.2f}"
    else:
        assert mean < 0.3 if pair.startswith("random") else mean > 0.9, f"{pair} draft acceptance {mean:.2f}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair", ["random-float32", "agreeing-float32", "agreeing-int8"])
def test_context_lookup_is_lossless_greedy_and_counted_apart_from_the_draft(pairs, pair):
    """With `lookup_tokens`, rows whose last tokens occurred earlier propose the tokens that followed (copied from
    the context); the others the draft's. Prompts that repeat themselves make both happen in one batch, round after
    round. Output: token for token the target's greedy `generate`, gamma 1 and 3, with stops inside the blocks.
    Copied proposals are counted as looked up, not drafted: AR stays the draft model's."""
    target, draft = pairs[pair]
    weights = "int8" if pair.endswith("int8") else "float"
    engine = SpeculativeEngine(target, draft, draft_weights=weights, lookup_tokens=5, lookup_ngram=(1, 2))
    prompts = [p + p[: len(p) // 2] for p in make_prompts(8, seed=4)]  # a repeat: lookups from the first token on
    free = [hf_greedy(target, p, 37, stop=2) for p in prompts]
    stop = free[0][9]
    stopped = [hf_greedy(target, p, 37, stop=stop) for p in prompts]
    for gamma in (1, 3):
        for stop_id, refs in ((2, free), (stop, stopped)):
            results = engine.generate(prompts, SamplingParams(max_new_tokens=37, stop_token_ids=(stop_id,)), gamma=gamma)
            assert [r.token_ids for r in results] == refs, f"gamma {gamma}, stop {stop_id}"
            check_counters(results, engine)
            s = engine.last_stats
            assert s.looked_up > 0 and s.drafted > 0, "both kinds of proposal ran"
            assert 0 < s.looked_up_accepted < s.looked_up
            # 8 rows share the 5 copied tokens a round: max(5 // 8, gamma) = gamma a row (a wide pass is compute-bound)
            assert all(r.stats.looked_up <= gamma * r.stats.target_passes for r in results)
        [one] = engine.generate(prompts[:1], SamplingParams(max_new_tokens=37, stop_token_ids=(2,)), gamma=gamma)
        assert one.token_ids == free[0]
    without = SpeculativeEngine(target, draft, draft_weights=weights)
    assert without.generate(prompts[:2], SamplingParams(max_new_tokens=37))[0].stats.looked_up == 0  # off by default


def test_ngram_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    from fastdraft.speculative.lookup import NgramLookup

    seq = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    lookup = NgramLookup(min_ngram=2, max_ngram=3)
    assert lookup.propose(seq, 3) == [5, 6, 2]         # (2, 3) last occurred before 5, 6
    seq += [5]
    assert lookup.propose(seq, 2) == [6, 2]            # the longest match first: (2, 3, 5) -> 6
    assert lookup.propose(seq + [7, 8], 4) == []       # (5, 7, 8), (7, 8): never seen before
    assert NgramLookup(2, 3).propose([5, 5, 5, 5], 4) == [5]  # copies only what exists: never its own suffix
    assert lookup.propose(seq, 0) == []
    with pytest.raises(FastdraftError, match=r"1 <= min_ngram <= max_ngram, got 0, 2"):
        NgramLookup(0, 2)
    with pytest.raises(FastdraftError, match=r"got 3, 2"):  # the engine refuses it when built, not at a request
        SpeculativeEngine(random_llama(64, 32, 1, seed=1), random_llama(64, 32, 1, seed=2), lookup_tokens=4,
                          lookup_ngram=(3, 2))


def test_target_alone_same_loop(pairs):
    """gamma 0 and no draft run the target alone through the same loop: tau 1, nothing drafted."""
    target, draft = pairs["factory"]
    prompts = make_prompts(4, seed=2)
    refs = [hf_greedy(target, p, 20, stop=2) for p in prompts]
    for engine, gamma in ((SpeculativeEngine(target, draft), 0), (SpeculativeEngine(target, None, gamma=3), None)):
        results = engine.generate(prompts, SamplingParams(max_new_tokens=20, stop_token_ids=(2,)), gamma=gamma)
        assert [r.token_ids for r in results] == refs
        assert engine.last_stats.drafted == 0 and engine.last_stats.tau == 1.0
        check_counters(results, engine)


def test_transformers_backend_is_lossless_too(pairs):
    """The fallback decoder (transformers' forward + DynamicCache cropping) gives the same tokens."""
    target, draft = pairs["factory"]
    engine = SpeculativeEngine(target, draft, gamma=4, backend="hf")
    assert isinstance(engine.target, HFDecoder)
    prompts = make_prompts(3, seed=3)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=25, stop_token_ids=(2,)))
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 25, stop=2) for p in prompts]
    check_counters(results, engine)


def test_dynamic_gamma_is_lossless_and_rides_a_good_draft(pairs):
    """Dynamic gamma changes only speed: same tokens; with an agreeing draft it drafts long blocks."""
    params = SamplingParams(max_new_tokens=60, stop_token_ids=(2,))
    prompts = make_prompts(2, seed=4)
    for name in ("random", "agreeing"):
        target, draft = pairs[name]
        engine = SpeculativeEngine(target, draft, gamma=3, dynamic_gamma=True, max_gamma=8)
        results = engine.generate(prompts, params)
        assert [r.token_ids for r in results] == [hf_greedy(target, p, 60, stop=2) for p in prompts]
        check_counters(results, engine)
        if name == "agreeing":
            # timing-driven policy: a loaded machine can make a round look slow, so the bound is loose
            assert engine.last_stats.drafted / engine.last_stats.target_passes > 2.0


def test_gamma_controller_backs_off_when_acceptance_collapses():
    """Policy on synthetic measurements: a draft at 1/5 of the target's cost; acceptance 1.0, then 0."""
    from fastdraft.speculative.gamma import GammaController

    control = GammaController(start=3, max_gamma=8, probe_every=16)
    for _ in range(20):
        g = control.next_gamma()
        control.observe(g, [g], draft_s=0.002 * g, verify_s=0.010 * (1 + 0.05 * g))
    assert g == 8  # everything accepted: the longest block pays most
    chosen = []
    for _ in range(80):
        g = control.next_gamma()
        chosen.append(g)
        control.observe(g, [0], draft_s=0.002 * g, verify_s=0.010 * (1 + 0.05 * g))
    tail = chosen[40:]
    assert tail.count(0) >= 36 and set(tail) <= {0, 1}  # target alone, with a gamma-1 probe now and then
    assert 1 in tail


@pytest.mark.parametrize("pair", ["agreeing", "random"])
def test_min_new_tokens_masks_stop_tokens_and_stays_exact(pairs, pair):
    """Stop tokens are masked until min_new_tokens are out: greedy output equals transformers'
    `generate(min_new_tokens=...)`, with stops that would have ended the text early; sampling never stops early."""
    from transformers import GenerationConfig

    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft)
    prompts = make_prompts(4, seed=11)
    free = [hf_greedy(target, p, 30, stop=2) for p in prompts]
    # The first output's first token as a stop token: without the mask it ends that text at once.
    stop = free[0][0]
    [early] = engine.generate(prompts[:1], SamplingParams(max_new_tokens=30, stop_token_ids=(stop,)), gamma=3)
    assert early.token_ids == [stop] and early.finish_reason == "stop"
    cfg = GenerationConfig(do_sample=False, max_new_tokens=30, min_new_tokens=12, eos_token_id=[2, stop], pad_token_id=0)
    with torch.inference_mode():
        refs = [target.generate(torch.tensor([p]), generation_config=cfg)[0, len(p):].tolist() for p in prompts]
    assert len(refs[0]) >= 12 and stop not in refs[0][:11]
    for gamma in (1, 3, 6):
        params = SamplingParams(max_new_tokens=30, min_new_tokens=12, stop_token_ids=(2, stop))
        results = engine.generate(prompts, params, gamma=gamma)
        assert [r.token_ids for r in results] == refs, f"gamma {gamma}"
        check_counters(results, engine)
    sampled = engine.generate(prompts * 4, SamplingParams(temperature=1.0, max_new_tokens=30, min_new_tokens=12,
                                                          stop_token_ids=(2, stop), seed=3), gamma=3)
    assert all(len(r.token_ids) >= 12 and not {2, stop} & set(r.token_ids[:11]) for r in sampled)


def reference_greedy(model, prompt: list[int], max_new: int, stops=(2,), presence=0.0, frequency=0.0, repetition=1.0,
                     bias: dict | None = None, allowed=None) -> tuple[list[int], list[float]]:
    """Plain target greedy, one full forward per token, with the penalties written out token by token (the oracle
    for penalized speculative decoding); also the log-softmax of the penalized logits at each chosen token."""
    ids, out, lps = list(prompt), [], []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
        for t, b in (bias or {}).items():
            logits[t] += b
        if allowed is not None:
            keep = logits[list(allowed)].clone()
            logits[:] = float("-inf")
            logits[list(allowed)] = keep
        for t in set(ids) if repetition != 1.0 else ():
            logits[t] = logits[t] * repetition if logits[t] < 0 else logits[t] / repetition
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        tok = int(logits.argmax())
        lps.append(float(logits.log_softmax(-1)[tok]))
        out.append(tok)
        ids.append(tok)
        if tok in stops:
            break
    return out, lps


PENALTIES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.8),
    "repetition": dict(repetition_penalty=1.6),
    "bias": dict(logit_bias=((5, 4.0), (9, -100.0), (17, 2.5))),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias=((5, 3.0),)),
}


@pytest.mark.parametrize("pair", ["agreeing", "random"])
@pytest.mark.parametrize("kind", list(PENALTIES))
def test_penalized_greedy_equals_penalized_target_greedy(pairs, pair, kind):
    """Penalties and logit_bias apply to both models' logits before acceptance, over the tokens before each
    verified position (the draft's proposals included): output equals plain target greedy under the same penalty."""
    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft)
    prompts = make_prompts(3, seed=13)
    kw = PENALTIES[kind]
    ref_kw = dict(presence=kw.get("presence_penalty", 0.0), frequency=kw.get("frequency_penalty", 0.0),
                  repetition=kw.get("repetition_penalty", 1.0), bias=dict(kw.get("logit_bias", ())))
    refs = [reference_greedy(target, p, 24, **ref_kw)[0] for p in prompts]
    plain = [hf_greedy(target, p, 24, stop=2) for p in prompts]
    assert refs != plain  # the penalty changes the text
    for gamma in (1, 4):
        results = engine.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=(2,), **kw), gamma=gamma)
        assert [r.token_ids for r in results] == refs, f"gamma {gamma}"
        check_counters(results, engine)


def test_repetition_penalty_equals_transformers_generate(pairs):
    target, draft = pairs["agreeing"]
    engine = SpeculativeEngine(target, draft)
    prompts = make_prompts(3, seed=17)
    with torch.inference_mode():
        refs = [target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, repetition_penalty=1.4,
                                eos_token_id=2, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=(2,), repetition_penalty=1.4), gamma=3)
    assert [r.token_ids for r in results] == refs


def test_allowed_token_ids_restrict_the_output_exactly(pairs):
    target, draft = pairs["random"]
    allowed = tuple(range(40, 60)) + (2,)
    prompts = make_prompts(2, seed=19)
    refs = [reference_greedy(target, p, 20, allowed=allowed)[0] for p in prompts]
    results = SpeculativeEngine(target, draft).generate(
        prompts, SamplingParams(max_new_tokens=20, stop_token_ids=(2,), allowed_token_ids=allowed), gamma=3)
    assert [r.token_ids for r in results] == refs and all(set(r) <= set(allowed) for r in refs)


@pytest.mark.parametrize("pair", ["agreeing", "random"])
def test_logprobs_are_the_targets_at_every_position(pairs, pair):
    """Accepted draft tokens and corrections alike get the target's log-probability (its penalized logits), the
    top-k the target's own ranking there; streamed with the tokens."""
    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft)
    prompts = make_prompts(2, seed=23)
    streamed: dict[int, list] = {0: [], 1: []}
    params = SamplingParams(max_new_tokens=20, stop_token_ids=(2,), frequency_penalty=0.3, logprobs=3)
    results = engine.generate(prompts, params, gamma=3, on_tokens=lambda i, ids, lps: streamed[i].extend(lps))
    for p, r, i in zip(prompts, results, range(2)):
        ref, ref_lps = reference_greedy(target, p, 20, frequency=0.3)
        assert r.token_ids == ref
        assert r.logprobs == pytest.approx(ref_lps, abs=1e-9)
        assert [e[0] for e in streamed[i]] == r.logprobs and [e[1] for e in streamed[i]] == r.top_logprobs
        for tok, lp, top in zip(r.token_ids, r.logprobs, r.top_logprobs):
            assert len(top) == 3 and top[0] == (tok, pytest.approx(lp))  # greedy: the chosen token ranks first
            assert top[0][1] >= top[1][1] >= top[2][1]
    assert results[0].stats.accepted > 0 or pair == "random"
    sampled = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, logprobs=0, seed=1), gamma=3)
    for p, r in zip(prompts, sampled):
        with torch.inference_mode():
            full = target(torch.tensor([p + r.token_ids])).logits[0].log_softmax(-1)
        want = [float(full[len(p) - 1 + j, t]) for j, t in enumerate(r.token_ids)]
        assert r.logprobs == pytest.approx(want, abs=1e-9) and r.top_logprobs == [[] for _ in r.token_ids]


@pytest.mark.parametrize("pair", ["agreeing", "factory"])  # factory: the lean decoder; agreeing: also float64
def test_prompt_logprobs_are_the_targets_from_the_prefill(pairs, pair):
    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft)
    prompts = make_prompts(3, seed=37) + [[9]]
    seen = {}
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6, prompt_logprobs=2), gamma=3,
                              on_prompt_logprobs=lambda i, e: seen.setdefault(i, e))
    assert [r.token_ids for r in results] == [hf_greedy(target, p, 6, stop=-1) for p in prompts]  # still exact
    for i, (p, r) in enumerate(zip(prompts, results)):
        assert seen[i] == r.prompt_logprobs and len(r.prompt_logprobs) == len(p) - 1
        if len(p) == 1:
            continue
        with torch.inference_mode():
            lp = target(torch.tensor([p])).logits[0, :-1].double().log_softmax(-1)
        want = lp[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        assert [e[0] for e in r.prompt_logprobs] == pytest.approx(want.tolist(), abs=1e-6)
        assert [e[1] for e in r.prompt_logprobs] == [int((row > w).sum()) + 1 for row, w in zip(lp, want)]
        assert all(len(e[2]) == 2 and e[2][0][1] >= e[2][1][1] for e in r.prompt_logprobs)


def test_should_stop_ends_one_row_within_a_round_and_the_rest_stay_exact(pairs):
    target, draft = pairs["agreeing"]
    engine = SpeculativeEngine(target, draft)
    prompts = make_prompts(3, seed=29)
    refs = [hf_greedy(target, p, 30, stop=-1) for p in prompts]
    rounds = {0: 0, 1: 0, 2: 0}

    def should_stop(i):
        rounds[i] += 1
        return "abort" if i == 1 and rounds[i] == 2 else None

    results = engine.generate(prompts, SamplingParams(max_new_tokens=30), gamma=3, should_stop=should_stop)
    assert results[1].finish_reason == "abort" and 2 <= len(results[1].token_ids) <= 8  # two rounds of at most 4
    assert results[1].token_ids == refs[1][:len(results[1].token_ids)]
    assert [results[0].token_ids, results[2].token_ids] == [refs[0], refs[2]]
    assert rounds[1] == 2  # never asked again


def test_a_continuation_counts_its_prior_output_for_penalties_and_min_tokens(pairs):
    target, draft = pairs["random"]
    engine = SpeculativeEngine(target, draft)
    [prompt] = make_prompts(1, seed=31)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=(2,), presence_penalty=2.0, frequency_penalty=0.5)
    [whole] = engine.generate([prompt], params, gamma=3)
    k = 7
    [rest] = engine.generate([prompt + whole.token_ids[:k]], SamplingParams(**{**params.__dict__, "max_new_tokens": 24 - k}),
                             gamma=3, prior_output=[k])
    assert whole.token_ids[:k] + rest.token_ids == whole.token_ids


def test_streaming_reports_every_token_in_order(pairs):
    target, draft = pairs["factory"]
    engine = SpeculativeEngine(target, draft, gamma=3)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    results = engine.generate(make_prompts(2, seed=5), SamplingParams(max_new_tokens=30),
                              on_tokens=lambda i, ids: streamed[i].extend(ids))
    assert [streamed[0], streamed[1]] == [r.token_ids for r in results]


def test_bad_input_gets_clear_errors(pairs, tiny_target_dir, tiny_draft_dir, assets_dir):
    target, draft = pairs["factory"]
    engine = SpeculativeEngine(target, draft)
    with pytest.raises(FastdraftError, match="prompt 1 is empty"):
        engine.generate([[5], []], SamplingParams())
    with pytest.raises(FastdraftError, match="outside the vocabulary"):
        engine.generate([[5, 10_000]], SamplingParams())
    with pytest.raises(FastdraftError, match="gamma must be >= 0"):
        engine.generate([[5]], SamplingParams(), gamma=-1)
    with pytest.raises(FastdraftError, match="top_p"):
        engine.generate([[5]], SamplingParams(temperature=1.0, top_p=0.0))
    with pytest.raises(FastdraftError, match="logit_bias"):
        engine.generate([[5]], SamplingParams(logit_bias=((10_000, 1.0),)))
    with pytest.raises(FastdraftError, match="min_new_tokens"):
        engine.generate([[5]], SamplingParams(max_new_tokens=4, min_new_tokens=5))
    assert engine.generate([], SamplingParams()) == []
    from fastdraft.assets import build_tiny_model, build_tiny_tokenizer

    other_tok = assets_dir / "other-tokenizer"
    build_tiny_tokenizer(other_tok, vocab_size=300)
    other = build_tiny_model(other_tok, assets_dir / "other-draft", layers=1, hidden=32, heads=2, kv_heads=1)
    assert other.config.vocab_size != target.config.vocab_size
    with pytest.raises(TokenizerMismatchError):
        SpeculativeEngine.from_dirs(tiny_target_dir, assets_dir / "other-draft")
    engine = SpeculativeEngine.from_dirs(tiny_target_dir, tiny_draft_dir, gamma=2)  # the compatible pair loads
    assert 0 < engine.param_ratio < 1


@pytest.mark.timeout(300)
def test_smollm2_greedy_equals_transformers(smollm2_dir, tmp_path):
    """The embedded SmolLM2 target with an untrained factory draft and with itself as a perfect draft."""
    from fastdraft.models import make_draft
    from fastdraft.tokenizer import load_tokenizer

    target = load_model(smollm2_dir)
    draft_dir, _ = make_draft(smollm2_dir, tmp_path / "draft", layers=1, hidden=64, seed=0)
    tok = load_tokenizer(smollm2_dir)
    texts = ["Write a Python function that reverses a string.", "List three prime numbers."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for t in texts]
    eos = tok.eos_token_id
    refs = [hf_greedy(target, p, 16, stop=eos) for p in prompts]
    lean = LeanDecoder(target)
    with torch.inference_mode():
        diff = (lean.forward(lean.new_cache(1, 64), torch.tensor([prompts[0]]), [0], "all")
                - target(torch.tensor([prompts[0]])).logits).abs().max().item()
    print(f"SmolLM2 lean ({lean.kernels} kernels) vs transformers, float32: max abs logit difference {diff:.2e}")
    assert diff < 1e-2
    params = SamplingParams(max_new_tokens=16, stop_token_ids=(eos,))
    engine = SpeculativeEngine(target, load_model(draft_dir))
    for gamma in (1, 5):
        results = engine.generate(prompts, params, gamma=gamma)
        assert [r.token_ids for r in results] == refs, f"gamma {gamma}"
        check_counters(results, engine)
    [one] = engine.generate(prompts[:1], params, gamma=2)
    assert one.token_ids == refs[0]
    perfect = SpeculativeEngine(target, target, gamma=4)
    assert [r.token_ids for r in perfect.generate(prompts, params)] == refs
    assert perfect.last_stats.acceptance_rate > 0.95


def test_draft_may_run_in_another_dtype(pairs, tiny_draft_dir):
    """dtype per model: a float32 draft with a float64 target, greedy (lossless) and sampled (seeded)."""
    target, _ = pairs["factory"]
    engine = SpeculativeEngine(target, load_model(tiny_draft_dir, dtype=torch.float32), gamma=3)
    prompts = make_prompts(2, seed=6)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=20, stop_token_ids=(2,)))
    assert [r.token_ids for r in greedy] == [hf_greedy(target, p, 20, stop=2) for p in prompts]
    sampled = engine.generate(prompts, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=20, seed=3))
    assert all(len(r.token_ids) == 20 for r in sampled)
    check_counters(sampled, engine)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair", ["agreeing", "agreeing-float32", "random-float32"])
def test_rows_join_a_running_batch_and_leave_it_at_once_each_equal_to_transformers_greedy(pairs, pair):
    """Iteration-level batching (`Run`): prompts join between rounds with their own max_new_tokens and stop tokens;
    each row's output is token for token the target's greedy `generate` with those limits, a finished row leaves the
    batch in the round it finishes, and the caches of the rows already running are untouched by a join."""
    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft, gamma=3)
    prompts = make_prompts(6, seed=4)
    limits = [(40, 2), (5, 2), (23, 2), (12, 2), (31, 2), (3, 2)]
    stop = hf_greedy(target, prompts[2], 40, stop=2)[6]  # row 2 stops on a token it emits mid-output
    limits[2] = (23, stop)
    refs = [hf_greedy(target, p, m, stop=s) for p, (m, s) in zip(prompts, limits)]
    run = engine.start(SamplingParams(max_new_tokens=1), gamma=3)
    joined = {}
    rounds = 0
    schedule = {0: [0, 1], 2: [2], 3: [3, 4], 6: [5]}  # round -> prompts that join before it
    while rounds == 0 or not run.done or any(r > rounds for r in schedule):
        for i in schedule.get(rounds, []):
            [s] = run.add([prompts[i]], max_new_tokens=[limits[i][0]], stop_token_ids=[(limits[i][1],)])
            joined[s] = i
        live = run.size  # the live rows and the queued prompts (shorter than a prefill chunk: they join this step)
        finished = run.step()
        assert len(run.batch.rows) == live - len(finished) and not run.pending  # finished rows leave in the round they finish
        rounds += 1
    for s, i in joined.items():
        assert run.results[s].token_ids == refs[i], f"prompt {i} (joined as sequence {s})"
        assert run.results[s].finish_reason == ("stop" if refs[i][-1] == limits[i][1] else "length")
    check = SpecStats()
    for r in run.results:
        assert r.stats.emitted + r.stats.truncated == r.stats.accepted + r.stats.target_passes
        check += r.stats
    assert check.emitted == sum(len(r) for r in refs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair,prefill_chunk", [("agreeing", 128), ("random-float32", 128), ("random-float32", 3)])
def test_every_row_of_a_batch_keeps_its_own_settings_and_greedy_rows_stay_exact(pairs, pair, prefill_chunk):
    """One continuous batch mixes greedy, penalized greedy, nucleus, top-k and penalized sampled rows, joining at
    different rounds: each greedy row is token for token its own target greedy (transformers', or the penalized
    oracle's), each sampled row honours its own top-k and length, and log-probabilities come only to the rows that ask,
    with each row's own k."""
    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft, gamma=3, prefill_chunk=prefill_chunk)
    prompts = make_prompts(6, seed=8)
    settings = [
        SamplingParams(max_new_tokens=30, stop_token_ids=(2,)),
        SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=20, seed=1),
        SamplingParams(max_new_tokens=24, stop_token_ids=(2,), frequency_penalty=0.3, logprobs=2),
        SamplingParams(temperature=1.0, top_k=5, max_new_tokens=16, seed=2, prompt_logprobs=1),
        SamplingParams(max_new_tokens=12, stop_token_ids=(2,)),
        SamplingParams(temperature=1.0, presence_penalty=0.5, repetition_penalty=1.2, max_new_tokens=14, seed=3),
    ]
    schedule = {0: [0, 1, 2, 3], 1: [5], 2: [4]}  # round -> rows that join before it
    run = engine.start(settings[0])
    joined, rounds = {}, 0
    while rounds == 0 or not run.done or any(r > rounds for r in schedule):
        for i in schedule.get(rounds, []):
            [s] = run.add([prompts[i]], params=[settings[i]])
            joined[i] = s
        run.step()
        rounds += 1
    result = {i: run.results[s] for i, s in joined.items()}
    for i in (0, 4):
        assert result[i].token_ids == hf_greedy(target, prompts[i], settings[i].max_new_tokens, stop=2), f"row {i}"
    ref, ref_lps = reference_greedy(target, prompts[2], 24, frequency=0.3)
    # (float32 rounding between the lean decoder and transformers' forward: 1e-5, not the float64 pairs' 1e-9)
    assert result[2].token_ids == ref and result[2].logprobs == pytest.approx(ref_lps, abs=1e-5)
    assert all(len(top) == 2 for top in result[2].top_logprobs)
    assert all(result[i].logprobs is None for i in (0, 1, 3, 4, 5))
    assert len(result[3].prompt_logprobs) == len(prompts[3]) - 1
    assert all(result[i].prompt_logprobs is None for i in (0, 1, 2, 4, 5))
    for i in (1, 3, 5):  # no stop tokens: each runs to its own length
        assert len(result[i].token_ids) == settings[i].max_new_tokens and result[i].finish_reason == "length"
    with torch.inference_mode():  # top-k 5: every token of row 3 is among the target's 5 most likely at its position
        p, out = prompts[3], result[3].token_ids
        logits = target(torch.tensor([p + out])).logits[0, len(p) - 1:-1]
    ranks = (logits > logits.gather(1, torch.tensor(out)[:, None])).sum(-1)
    assert (ranks < 5).all()
    for r in run.results:
        assert r.stats.emitted + r.stats.truncated == r.stats.accepted + r.stats.target_passes


def long_prompts(n: int, seed: int, lengths: tuple[int, int] = (20, 45), vocab: int = 512) -> list[list[int]]:
    """Prompts longer than the tests' prefill chunks."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(*lengths, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pair", ["agreeing", "agreeing-float32", "random-float32"])
def test_chunked_prefill_rows_joining_mid_flight_equal_transformers_greedy(pairs, pair):
    """Chunked prefill (`Run`, prefill_chunk 8): prompts of 20-45 tokens join a running batch a chunk per step, the
    running rows emitting a round in every one of those steps; a row joins once its prompt is in both caches, and
    each row's output is token for token the target's greedy `generate`."""
    target, draft = pairs[pair]
    engine = SpeculativeEngine(target, draft, gamma=3, prefill_chunk=8)
    prompts = long_prompts(5, seed=9)
    limits = [30, 6, 25, 12, 18]
    refs = [hf_greedy(target, p, m, stop=2) for p, m in zip(prompts, limits)]
    emitted: dict[int, int] = {}
    run = engine.start(SamplingParams(max_new_tokens=1, stop_token_ids=(2,)),
                       on_tokens=lambda s, ids: emitted.__setitem__(s, emitted.get(s, 0) + len(ids)))
    joined, added_at, joined_at, rounds = {}, {}, {}, 0
    schedule = {0: [0], 1: [1, 2], 3: [3], 4: [4]}  # round -> prompts that join before it (1 and 2: one add call)
    while rounds == 0 or not run.done or any(r > rounds for r in schedule):
        if rounds in schedule:
            group = schedule[rounds]
            seqs = run.add([prompts[i] for i in group], max_new_tokens=[limits[i] for i in group])
            joined.update(zip(seqs, group))
            added_at.update((s, rounds) for s in seqs)
        live, before, prefilling = list(run.batch.rows), dict(emitted), bool(run.pending)
        run.step()
        if live and prefilling:  # a prompt was being prefilled: the rows already running went on emitting
            assert all(emitted.get(s, 0) > before.get(s, 0) for s in live)
        for s in joined:
            if s not in joined_at and (s in run.batch.rows or run.results[s].token_ids):
                joined_at[s] = rounds
        rounds += 1
    for s, i in joined.items():
        assert run.results[s].token_ids == refs[i], f"prompt {i} (sequence {s})"
        assert run.results[s].stats.prefill_s > 0
    # The first prompt, arriving at an idle run, went in whole; the others took a step per chunk of 8 at least.
    assert joined_at[0] == added_at[0]
    for s, i in joined.items():
        if i > 0:
            assert joined_at[s] - added_at[s] >= -(-(len(prompts[i]) - 1) // 8) - 1, f"prompt {i}"


@pytest.mark.timeout(300)
def test_queued_prompts_are_fed_earliest_deadline_first_so_short_requests_pass_long_ones_that_still_get_their_turn(pairs):
    """Chunked prefill (8 tokens a step) with a row running: three 40-token prompts queued for 40 new tokens each,
    then one for 3. A prompt's deadline is its add step + its chunks + its max new tokens, so the short request
    (deadline ~8 steps away, against ~45) is fed first and joins before any long one. Short requests added every
    step after that do not hold the long ones back for ever: once the long ones' deadline is the earliest, they
    are fed first, and every short request with a later deadline joins after them. Every row is the target's
    greedy output."""
    target, draft = pairs["agreeing"]
    engine = SpeculativeEngine(target, draft, gamma=3, prefill_chunk=8)
    run = engine.start(SamplingParams(max_new_tokens=1, stop_token_ids=(2,)))
    [running] = run.add([list(range(3, 12))], max_new_tokens=[120])
    run.step()
    longs = long_prompts(3, seed=21, lengths=(41, 42))
    shorts = long_prompts(60, seed=22, lengths=(12, 20))
    long_seqs = [run.add([p], max_new_tokens=[40])[0] for p in longs]
    [first_short] = run.add([shorts[0]], max_new_tokens=[3])
    deadlines = {s: g.deadline for g in run.pending for s in g.seqs}
    added, joined_at, step = {first_short: 0}, {}, 0
    while not run.done:
        if 1 <= step < len(shorts):  # a new short request every step
            [s] = run.add([shorts[step]], max_new_tokens=[3])
            added[s] = step
            deadlines[s] = run.pending[-1].deadline
        run.step()
        step += 1
        for s in [*long_seqs, *added]:
            if s not in joined_at and (s in run.batch.rows or run.results[s].token_ids):
                joined_at[s] = run.steps
    assert joined_at[first_short] < min(joined_at[s] for s in long_seqs)
    later = [s for s in added if deadlines[s] > max(deadlines[x] for x in long_seqs)]
    assert later and all(joined_at[s] > max(joined_at[x] for x in long_seqs) for s in later)
    assert max(joined_at[x] for x in long_seqs) < max(joined_at.values())  # the longs joined while shorts still came
    for s, p in zip(long_seqs, longs):
        assert run.results[s].token_ids == hf_greedy(target, p, 40, stop=2)
    assert run.results[first_short].token_ids == hf_greedy(target, shorts[0], 3, stop=2)


def test_chunked_prefill_is_lossless_on_the_transformers_backend_and_scores_prompts_the_same(pairs):
    """The fallback decoder (one sequence, a DynamicCache) takes the prompt in chunks too; prompt logprobs from a
    chunked prefill equal those of a whole one."""
    target, draft = pairs["factory"]
    prompts = long_prompts(2, seed=10)
    params = SamplingParams(max_new_tokens=15, stop_token_ids=(2,), prompt_logprobs=2)
    for backend in ("hf", "auto"):
        chunked = SpeculativeEngine(target, draft, gamma=3, backend=backend, prefill_chunk=7).generate(prompts, params)
        whole = SpeculativeEngine(target, draft, gamma=3, backend=backend, prefill_chunk=0).generate(prompts, params)
        assert [r.token_ids for r in chunked] == [hf_greedy(target, p, 15, stop=2) for p in prompts], backend
        for c, w, p in zip(chunked, whole, prompts):
            assert len(c.prompt_logprobs) == len(p) - 1
            assert [e[1:] for e in c.prompt_logprobs] == [e[1:] for e in w.prompt_logprobs]
            assert [e[0] for e in c.prompt_logprobs] == pytest.approx([e[0] for e in w.prompt_logprobs], abs=1e-9)


def test_a_failed_prefill_drops_its_rows_alone_and_the_running_rows_stay_exact(pairs):
    """A prefill pass that raises ends `step` with `PrefillError` naming its sequences, which leave the run; the rows
    already running are untouched and go on to the target's greedy output."""
    from fastdraft.errors import PrefillError

    target, draft = pairs["agreeing"]
    engine = SpeculativeEngine(target, draft, gamma=3)
    running = list(range(3, 15))
    run = engine.start(SamplingParams(max_new_tokens=10, stop_token_ids=(2,)))
    [a] = run.add([running])
    run.step()
    [b] = run.add([[5] * 8])  # its prefill is the only pass 7 tokens wide
    forward = engine.target.forward

    def failing(cache, ids, offsets, logits_at):
        if ids.shape[1] == 7:
            raise RuntimeError("boom")
        return forward(cache, ids, offsets, logits_at)

    engine.target.forward = failing
    with pytest.raises(PrefillError) as info:
        run.step()
    assert info.value.seqs == [b] and run.sequences == [a] and isinstance(info.value.cause, RuntimeError)
    while not run.done:
        run.step()
    assert run.results[a].token_ids == hf_greedy(target, running, 10, stop=2)


def test_the_serve_default_prefill_chunk_is_the_engines():
    import inspect

    from fastdraft.config import ServeConfig
    from fastdraft.serving.app import SpeculativePair
    from fastdraft.speculative.engine import PREFILL_CHUNK

    replica = inspect.signature(SpeculativePair.func_or_class.__init__).parameters["prefill_chunk"].default
    assert ServeConfig().prefill_chunk == PREFILL_CHUNK == replica
