"""int8 draft weights: the native kernel streams per-row int8 matrices and gives the numbers of the same model
rounded to that grid, in float; the engine stays lossless with them (greedy here and in
test_speculative_engine.py, sampling in test_speculative_sampling.py); c counts a byte per weight.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastdraft.errors import FastdraftError
from fastdraft.evaluation.metrics import CostRatio, read_size
from fastdraft.quantize import quantize_int8, round_model_to_int8_, round_to_int8
from fastdraft.speculative import native
from fastdraft.speculative.decoders import NATIVE_PASS_ROWS, LeanDecoder, make_decoder, resolve_weights
from fastdraft.speculative.pairs import agreeing_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def f32_pair():
    return agreeing_pair(vocab_size=512, hidden=128, layers=4, draft_layers=2, heads=4, kv_heads=2, intermediate=352,
                         seed=5, dtype=torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_linear_matches_the_dequantized_weights_in_float64(threads):
    """Rows 1..MAX_ROWS + 1 (past it: F.linear on the dequantized weights), ragged N and K, with and without bias."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for n, k in [(1, 16), (37, 100), (1000, 768), (5, 17), (64, 2048)]:
            w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            qw = quantize_int8(w)
            assert qw.q.dtype == torch.int8 and qw.scale.shape == (n,)
            for m in (1, 2, 5, 6, 7, 13, native.MAX_ROWS, native.MAX_ROWS + 1):
                x = torch.randn(m, k, generator=g)
                for bias in (None, b):
                    ref = F.linear(x.double(), qw.dequantize().double(), None if bias is None else bias.double())
                    ours = native.linear(x, qw, bias)
                    err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 1e-5, f"m={m} n={n} k={k} bias={bias is not None}: relative error {err:.2e}"
    finally:
        torch.set_num_threads(before)


def test_int8_rounding_is_per_row_symmetric_and_idempotent():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    w[3] = 0  # an all-zero row stays zero
    q = quantize_int8(w)
    assert q.q.abs().max() == 127 and (q.q[3] == 0).all()
    rounded = round_to_int8(w)
    assert ((rounded - w).abs() <= q.scale[:, None] / 2 + 1e-12).all()  # within half a step of its row
    again = quantize_int8(rounded)
    assert torch.equal(again.q, q.q) and torch.allclose(again.dequantize(), rounded, rtol=1e-6, atol=0)


def test_int8_lean_decoder_gives_transformers_logits_of_the_rounded_model(f32_pair):
    """Short passes (the native decoder layers) and a prefill past NATIVE_PASS_ROWS (torch ops around the int8 linear)."""
    _, draft = f32_pair
    rounded = round_model_to_int8_(copy.deepcopy(draft))
    assert not torch.equal(rounded.lm_head.weight, draft.lm_head.weight)  # it did round
    lean = LeanDecoder(rounded, weights="int8")
    assert lean.kernels == "native" and lean.weights == "int8"
    ids = torch.randint(3, 512, (1, NATIVE_PASS_ROWS + 20), generator=torch.Generator().manual_seed(1))
    cut = NATIVE_PASS_ROWS + 8
    with torch.inference_mode():
        cache = lean.new_cache(1, ids.shape[1])
        ours = torch.cat([lean.forward(cache, ids[:, :cut], [0], "all"),   # long prefill
                          lean.forward(cache, ids[:, cut:cut + 6], [cut], "all"),  # a 6-token verification
                          lean.forward(cache, ids[:, cut + 6:], [cut + 6], "all")], dim=1)
        ref = rounded(ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"int8 lean vs transformers on the rounded model: max abs logit difference {diff:.2e}")
    assert diff < 1e-4


def test_int8_weights_run_on_the_native_kernel_or_are_refused(f32_pair):
    _, draft = f32_pair
    assert resolve_weights(draft, "auto") == "int8"
    assert resolve_weights(copy.deepcopy(draft).double(), "auto") == "float"  # the native kernel runs float32 only
    assert resolve_weights(draft, "auto", backend="hf") == "float"
    with pytest.raises(FastdraftError, match="int8 weights run on the native kernels only"):
        LeanDecoder(draft, kernels="onednn", weights="int8")
    with pytest.raises(FastdraftError, match="int8 weights run on the lean decoder's native kernel"):
        make_decoder(draft, backend="hf", weights="int8")
    with pytest.raises(FastdraftError, match="unknown weights 'int4'"):
        make_decoder(draft, weights="int4")


def test_an_int8_draft_reads_a_byte_per_weight(f32_pair):
    target, draft = f32_pair
    params, fp32_bytes = read_size(draft)
    _, int8_bytes = read_size(draft, "int8")
    assert draft.lm_head.weight is draft.get_input_embeddings().weight  # tied: the head reads the whole table
    rows = sum(p.shape[0] for p in draft.parameters() if p.dim() == 2)  # a float32 scale per row
    vectors = sum(p.numel() for p in draft.parameters() if p.dim() == 1)
    assert fp32_bytes == 4 * params
    assert int8_bytes == (params - vectors) + 4 * rows + 4 * vectors
    c = CostRatio.of(draft, target, "int8")
    assert c.params == pytest.approx(CostRatio.of(draft, target).params) and c.bytes < 0.3 * c.params
