"""The native CPU kernels: the small-batch linear gives F.linear's numbers, the one-call decoder layers give
transformers' logits for every lean family, on ragged batches.

They are what the lean decoder runs on CPU float32 by default (`kernels="auto"`). The engine's lossless greedy
test runs them in the loop on float32 pairs (test_speculative_engine.py); here: their numbers, their logits,
and without a C compiler the decoder says so and falls back to oneDNN.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from fastdraft.errors import FastdraftError
from fastdraft.speculative import native
from fastdraft.speculative.decoders import HYBRID_NATIVE_ROWS, NATIVE_PASS_ROWS, LeanDecoder, right_pad
from fastdraft.speculative.pairs import agreeing_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_kernel_builds_here():
    """CI machines have a C compiler: the default path must be the native one, not a silent fallback."""
    assert native.unavailable_reason() is None


@pytest.mark.parametrize("threads", [1, 2])
def test_native_linear_matches_float64_reference(threads):
    """Rows 1..MAX_ROWS + 1 (past MAX_ROWS it hands over to F.linear), ragged N and K (tails), with and without bias."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for n, k in [(1, 16), (37, 100), (1000, 768), (5, 17), (64, 2048)]:
            w = torch.randn(n, k, generator=g)
            b = torch.randn(n, generator=g)
            for m in (1, 2, 5, 6, 7, 9, 12, 13, 16, native.MAX_ROWS, native.MAX_ROWS + 1):
                x = torch.randn(3, m, k, generator=g)[1]  # a view into a larger tensor
                for bias in (None, b):
                    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
                    ours = native.linear(x, w, bias)
                    assert ours.shape == (m, n) and ours.dtype == torch.float32
                    err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 1e-5, f"m={m} n={n} k={k} bias={bias is not None}: relative error {err:.2e}"
    finally:
        torch.set_num_threads(before)


def test_native_lean_forward_matches_transformers_logits():
    target, _ = agreeing_pair(vocab_size=512, hidden=128, layers=4, draft_layers=2, heads=4, kv_heads=2,
                              intermediate=352, seed=5, dtype=torch.float32)
    lean = LeanDecoder(target)
    assert lean.kernels == "native"
    ids = torch.arange(5, 25)[None]
    with torch.inference_mode():
        ours = torch.cat([lean.forward(cache := lean.new_cache(1, 64), ids[:, :12], [0], "all"),
                          lean.forward(cache, ids[:, 12:], [12], "all")], dim=1)  # prefill, then a 8-token verify
        ref = target(ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"native lean vs transformers, float32: max abs logit difference {diff:.2e}")
    assert diff < 1e-4


SMALL = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
FAMILIES = {  # what each one adds to the native path: plain GQA, biases on q|k|v, per-head q/k norms, fused weights
    "llama": lambda: LlamaConfig(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=32),
    "phi3": lambda: Phi3Config(**{**SMALL, "num_key_value_heads": 6}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_native_decoder_layers_match_transformers_on_ragged_batches(family):
    """Prefill three prompts of different lengths, then verify 4 tokens per row and decode 1, rows at different
    positions; and one long prompt through torch's ops, then a native verification: every logit within 1e-4 of
    transformers' own forward over each row's whole sequence."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()
    with torch.no_grad():  # make biases and norm weights non-trivial, so that a skipped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    lean = LeanDecoder(model)
    assert lean.native_layers is not None
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 5, 12)]
    cache = lean.new_cache(3, 64)
    with torch.inference_mode():
        lean.forward(cache, right_pad(rows, "cpu"), [0, 0, 0], None)  # 36 rows: native
        steps = []
        for width in (4, 1):  # 12 rows, then 3: the native path, ragged offsets
            new = torch.randint(3, 300, (3, width), generator=g)
            logits = lean.forward(cache, new, [len(r) for r in rows], "all")
            rows = [r + n for r, n in zip(rows, new.tolist())]
            steps.append((width, logits))
        diff = 0.0
        for width, logits in steps:
            for b, r in enumerate(rows):
                upto = len(r) - (1 if width == 4 else 0)  # the 4-wide step ended one token before the end
                ref = model(torch.tensor([r[:upto]])).logits[0, -width:]
                diff = max(diff, (logits[b] - ref).abs().max().item())
        # one row: a prefill past NATIVE_PASS_ROWS (torch's ops fill the cache), then a native 4-token verification
        long = torch.randint(3, 300, (1, NATIVE_PASS_ROWS + 10), generator=g)
        single = lean.new_cache(1, 128)
        ours = torch.cat([lean.forward(single, long[:, :-4], [0], "all"),
                          lean.forward(single, long[:, -4:], [long.shape[1] - 4], "all")], dim=1)
        diff = max(diff, (ours - model(long).logits).abs().max().item())
    print(f"{family}: native decoder layers vs transformers, float32, max abs logit difference {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("kernels", ["auto", "hybrid"])
def test_native_decoder_layers_take_wide_ragged_batches(kernels):
    """30 sequences at different positions (a generation batch): 60 rows, then 30. With "auto" each pass is one native
    call; with "hybrid" (batched generation) the 60-row pass, wider than HYBRID_NATIVE_ROWS, reads a oneDNN-packed copy
    of the weights and the 30-row one the native layers. Every logit matches transformers'."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"](), dtype=torch.float32).eval()
    lean = LeanDecoder(model, kernels=kernels)
    assert lean.native_layers is not None and (lean.wide_layers is not None) == (kernels == "hybrid")
    assert 30 <= HYBRID_NATIVE_ROWS < 60 <= NATIVE_PASS_ROWS
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (30,), generator=g)]
    cache = lean.new_cache(len(rows), 32)
    with torch.inference_mode():
        lean.forward(cache, right_pad(rows, "cpu"), [0] * len(rows), None)  # past NATIVE_PASS_ROWS: torch's ops
        for width in (2, 1):  # 60 rows, then 30
            new = torch.randint(3, 300, (len(rows), width), generator=g)
            logits = lean.forward(cache, new, [len(r) for r in rows], "all")
            rows = [r + n for r, n in zip(rows, new.tolist())]
            diff = max((logits[b] - model(torch.tensor([r])).logits[0, -width:]).abs().max().item()
                       for b, r in enumerate(rows))
            assert diff < 1e-4, f"width {width}: max abs logit difference {diff:.2e}"
    if kernels == "hybrid":
        assert lean.kernels == "hybrid"
        with pytest.raises(FastdraftError, match="int8 weights run on the native kernels only"):
            LeanDecoder(model, kernels="hybrid", weights="int8")


def test_without_a_compiler_the_decoder_says_why_and_uses_onednn(tmp_path):
    """No C compiler (and nothing built yet): 'auto' falls back to oneDNN, 'native' is refused with the reason."""
    code = (
        "import torch\n"
        "from fastdraft.speculative import native\n"
        "from fastdraft.speculative.decoders import LeanDecoder\n"
        "from fastdraft.speculative.pairs import agreeing_pair\n"
        "from fastdraft.errors import FastdraftError\n"
        "t, _ = agreeing_pair(vocab_size=64, hidden=64, layers=1, heads=1, kv_heads=1, intermediate=64)\n"
        "print('reason:', native.unavailable_reason())\n"
        "print('auto:', LeanDecoder(t).kernels)\n"
        "try:\n"
        "    LeanDecoder(t, 'native')\n"
        "except FastdraftError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {**os.environ, "CC": "no-such-compiler-cc", "FASTDRAFT_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reason: no C compiler ('no-such-compiler-cc' not on PATH; set $CC)" in out.stdout
    assert "auto: onednn" in out.stdout
    assert "refused: the native kernels cannot run here: no C compiler" in out.stdout


def test_native_kernels_refuse_other_dtypes():
    target, _ = agreeing_pair(vocab_size=64, hidden=64, layers=1, heads=1, kv_heads=1, intermediate=64,
                              dtype=torch.float64)
    assert LeanDecoder(target).kernels == "torch"
    with pytest.raises(FastdraftError, match="float32 on CPU"):
        LeanDecoder(target, "native")


def test_float32_rms_norm_is_bit_identical_to_transformers():
    """The lean decoder's float32 norm is torch's fused rms_norm: the same bits as transformers' LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fastdraft.speculative.decoders import _rms_norm

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 768), (2, 7, 576), (3, 64)]:
        norm = LlamaRMSNorm(shape[-1], eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=g))
            x = 3 * torch.randn(shape, generator=g)
            assert torch.equal(_rms_norm(x, norm.weight, 1e-5), norm(x))


def test_native_forward_refuses_token_ids_outside_the_embedding_table():
    """A draft whose table is smaller than the ids it is fed (tables padded differently) gets F.embedding's error,
    never a read past the table."""
    target, _ = agreeing_pair(vocab_size=64, hidden=64, layers=1, heads=1, kv_heads=1, intermediate=64)
    lean = LeanDecoder(target)
    assert lean.native_layers is not None
    with torch.inference_mode(), pytest.raises(IndexError, match=r"token id 64 is outside the embedding table \(64 rows\)"):
        lean.forward(lean.new_cache(1, 8), torch.tensor([[3, 64]]), [0], "all")


SLIDING = {  # a window of 8 keys, so that short sequences already reach past it
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=8),
    "phi3": lambda: Phi3Config(**{**SMALL, "num_key_value_heads": 6}, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1),  # layer 1 slides
}


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_attention_matches_transformers_past_the_window(family):
    """Phi-3, Mistral and Qwen2 with a sliding window run in the lean decoder (no fallback): a ragged prefill,
    then verification and decode steps past the window, every logit within 1e-4 of transformers' forward over each
    row's whole sequence; and the speculative engine's greedy output equals transformers' generate."""
    from fastdraft.speculative.decoders import sliding_windows
    from fastdraft.speculative.engine import SpeculativeEngine
    from fastdraft.speculative.pairs import truncated_copy
    from fastdraft.speculative.types import SamplingParams

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SLIDING[family](), dtype=torch.float32).eval()
    windows = sliding_windows(model.config)
    assert windows == ([None, 8] if family == "qwen2" else [8, 8])
    lean = LeanDecoder(model)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (11, 5, 7)]
    cache = lean.new_cache(3, 64)
    diff = 0.0
    with torch.inference_mode():
        lean.forward(cache, right_pad(rows, "cpu"), [0, 0, 0], None)
        for width in (4, 1, 4):
            new = torch.randint(3, 300, (3, width), generator=g)
            logits = lean.forward(cache, new, [len(r) for r in rows], "all")
            rows = [r + n for r, n in zip(rows, new.tolist())]
            for b, r in enumerate(rows):
                ref = model(torch.tensor([r])).logits[0, -width:]
                diff = max(diff, (logits[b] - ref).abs().max().item())
    print(f"{family}: sliding window 8, lean vs transformers, max abs logit difference {diff:.2e}")
    assert diff < 1e-4

    draft = truncated_copy(model, 1)
    engine = SpeculativeEngine(model, draft, gamma=3)
    assert engine.target.__class__ is LeanDecoder and engine.draft.__class__ is LeanDecoder
    prompt = torch.randint(3, 300, (1, 6), generator=g)
    model.generation_config.eos_token_id = None
    want = model.generate(prompt, do_sample=False, max_new_tokens=30, pad_token_id=0)[0, 6:].tolist()
    [got] = engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=30))
    assert got.token_ids == want
