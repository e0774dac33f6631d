"""Generation engines behind one interface, on the tiny target (real transformers `generate`).

- transformers: batched, left-padded greedy output equals transformers' own per-prompt greedy `generate`;
  sampling is reproducible per seed whatever the batch; top-k log-probs are the target's own.
- vLLM is not a backend: `engine: vllm` runs through Ray Data LLM (tests/test_generate_vllm_processor.py).
"""

from __future__ import annotations

import pytest
import torch

from fastdraft.generation.backends import TransformersBackend, cut_at_stop, filter_logits, make_backend
from fastdraft.speculative.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process generation on one thread
TEXTS = ["def parse(line):", "The quick brown fox", "import os\nimport sys\n\nclass Loader:", "Hello", "a = [1, 2, 3]\nfor"]



@pytest.fixture(scope="module")
def backend(tiny_target_dir):
    return TransformersBackend(tiny_target_dir)


@pytest.fixture(scope="module")
def prompts(backend):
    return [backend.tokenizer(t)["input_ids"] for t in TEXTS]


def reference_greedy(model, ids, max_new_tokens, stop_ids):
    """transformers' own greedy generate on one unpadded prompt, cut at the first stop token."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids))
    return cut_at_stop(out[0, len(ids):].tolist(), stop_ids)


def test_batched_greedy_equals_per_prompt_generate(backend, prompts):
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    outs = backend.generate([(p, SamplingParams(max_new_tokens=24)) for p in prompts])
    for ids, out in zip(prompts, outs):
        assert (out.token_ids, out.finish_reason) == reference_greedy(backend.model, ids, 24, backend.stop_ids)


def test_sampling_is_reproducible_per_seed_whatever_the_batch(backend, prompts):
    def params(seed):
        return SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=16, seed=seed)

    full = backend.generate([(p, params(i)) for i, p in enumerate(prompts)])
    alone = backend.generate([(prompts[3], params(3))])
    mixed = backend.generate([(prompts[1], params(1)), (prompts[0], SamplingParams(max_new_tokens=5)), (prompts[3], params(3))])
    assert alone[0].token_ids == full[3].token_ids == mixed[2].token_ids
    assert mixed[0].token_ids == full[1].token_ids
    other_seed = backend.generate([(prompts[3], params(99))])
    assert other_seed[0].token_ids != full[3].token_ids


def test_top_k_1_sampling_is_greedy(backend, prompts):
    greedy = backend.generate([(p, SamplingParams(max_new_tokens=12)) for p in prompts])
    sampled = backend.generate([(p, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=12, seed=5)) for p in prompts])
    assert [g.token_ids for g in greedy] == [s.token_ids for s in sampled]


def test_filter_logits_keeps_the_top_p_nucleus_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.5 + 0.3
    kept = torch.isfinite(filter_logits(logits, 1.0, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]


def test_store_topk_gives_the_targets_own_log_probs(tiny_target_dir, prompts):
    b = TransformersBackend(tiny_target_dir, store_topk=4)
    out = b.generate([(prompts[0], SamplingParams(max_new_tokens=6))])[0]
    assert len(out.topk_ids) == len(out.token_ids) == len(out.topk_logprobs)
    assert [ids[0] for ids in out.topk_ids] == out.token_ids  # greedy: the chosen token is the top-1
    with torch.inference_mode():
        logits = b.model(torch.tensor([prompts[0] + out.token_ids[:1]])).logits[0, -1]
    expected = torch.log_softmax(logits, -1).topk(4)
    assert out.topk_ids[1] == expected.indices.tolist()
    assert out.topk_logprobs[1] == pytest.approx(expected.values.tolist(), abs=1e-4)


def test_generate_dtype_auto_is_bfloat16_on_a_cpu_with_amx_else_the_targets():
    from fastdraft.generation.backends import cpu_has_amx, generation_dtype

    assert generation_dtype("auto", "float32", "cpu") == ("bfloat16" if cpu_has_amx() else "float32")
    assert generation_dtype("auto", "float16", "cuda") == "float16"
    assert generation_dtype("float32", "bfloat16", "cpu") == "float32"  # an explicit dtype is kept
    assert generation_dtype(None, "bfloat16", "cpu") == "bfloat16"  # unset: the target's
