"""Forward passes the engine drives: a lean decoder over a model's own weights, or transformers itself.

`LeanDecoder` runs Llama-family models (llama, mistral, qwen2, qwen3, phi3) with the same weights and
the same arithmetic as transformers, minus the per-module Python overhead: fused QKV and gate/up
projections, a rope table computed once by the model's own rotary module, a preallocated KV cache with
one length per sequence (`StaticKVCache`), so a batch whose rows accepted different numbers of tokens
runs in one pass. On CPU float32, passes of a few rows (decode, verification, short prefills) run all layers
in one call of fastdraft's native library (`native/`); longer ones, and other dtypes and devices, run the
same layers as torch ops. With `weights="int8"` (a draft) the native kernel streams int8 matrices with per-row
scales (`fastdraft.quantize`), a quarter of the bytes; its logits then match transformers' on the same model
rounded to that grid (`round_model_to_int8_`). Its logits are checked against transformers' in the tests (max abs difference).

`HFDecoder` is the fallback for anything else: the model's own forward with a `DynamicCache`, cropped
on rejection; it runs one sequence at a time.

Both expose: `new_cache(batch, capacity)`, `forward(cache, ids [B, T], offsets, logits_at)`, where
`offsets[b]` is the number of valid cached tokens of row b (earlier entries past it are discarded),
and `logits_at` is None (fill the cache only), "all" ([B, T, V]) or one position per row ([B, V]).
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from fastdraft.errors import FastdraftError
from fastdraft.models import head_token_ids, scatter_to_vocab
from fastdraft.quantize import WEIGHTS, QuantizedWeight, quantize_int8
from fastdraft.speculative import native
from fastdraft.speculative.kvcache import StaticKVCache

LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # tables that do not depend on the sequence length

LogitsAt = str | list[int] | None
# Passes of up to this many rows (batch x tokens) run through the native decoder layers in one call (one read of
# the weights); longer prefills go to torch's kernels, which win at scale. Measured on 2 cores (82M target, prefill
# ms, torch / native in calls of 24 rows): 31 rows 126 / 78, 64 rows 155 / 139, 80 rows 164 / 173, 200 rows 343 / 470;
# in one call (AMD Zen 3): 31 rows 47 against 53 in calls of 24, 64 rows 99 against 105.
NATIVE_PASS_ROWS = 64
# Kernels "hybrid" (batched generation): passes of up to this many rows run natively, wider ones on oneDNN's packed
# weights. One decode step of SmolLM2 on 2 cores of an AMD Zen 3, ms, native / oneDNN: 16 rows 72 / 95, 24 90 / 127,
# 32 149 / 146, 48 178 / 192, 64 248 / 223, 96 443 / 310, 128 553 / 388 (torch's F.linear, which passes wider than
# NATIVE_PASS_ROWS took before: 128 rows 603).
HYBRID_NATIVE_ROWS = 48


class Decoder(Protocol):
    ragged: bool
    vocab_size: int
    num_params: int

    def new_cache(self, batch: int, capacity: int): ...

    def forward(self, cache, ids: torch.Tensor, offsets: list[int], logits_at: LogitsAt) -> torch.Tensor | None: ...


def right_pad(seqs: list[list[int]], device: torch.device | str) -> torch.Tensor:
    """Right-pad token lists into [B, T] (padding positions are past each row's length: never attended)."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def count_params(model: PreTrainedModel) -> int:
    """Parameters a forward reads per token, the `c` of MBSU (definition: `fastdraft.evaluation.metrics`)."""
    from fastdraft.evaluation.metrics import read_size

    return read_size(model)[0]


def lean_unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why `LeanDecoder` cannot run `model` exactly like transformers, or None when it can."""
    cfg = model.config
    if cfg.model_type not in LEAN_FAMILIES:
        return f"model type {cfg.model_type!r} (lean families: {', '.join(LEAN_FAMILIES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE:
        return f"rope type {rope_type!r} depends on the sequence length"
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    return None


def sliding_windows(cfg) -> list[int | None]:
    """Each layer's attention window, as transformers masks it: query position p sees keys p - W < j <= p
    (`masking_utils.sliding_window_overlay`), or None for full causal attention. Mistral and Phi-3 slide in every
    layer when `sliding_window` is set; Qwen2/3 list the sliding layers in `layer_types` (their config already sets
    `sliding_window` to None without `use_sliding_window`)."""
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
        window = None
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * cfg.num_hidden_layers


class _Layer:
    """One decoder layer's weights, in the layout the lean forward wants."""

    def __init__(self, layer: torch.nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "qkv_proj"):  # phi3 already fuses them
            self.wqkv, self.bqkv = attn.qkv_proj.weight, attn.qkv_proj.bias
        else:
            self.wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous()
            self.bqkv = (torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
                         if attn.q_proj.bias is not None else None)
        self.wo, self.bo = attn.o_proj.weight, attn.o_proj.bias
        if hasattr(mlp, "gate_up_proj"):
            self.wgu = mlp.gate_up_proj.weight
        else:
            self.wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
        self.wd = mlp.down_proj.weight
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.q_norm = attn.q_norm.weight if hasattr(attn, "q_norm") else None  # qwen3
        self.k_norm = attn.k_norm.weight if hasattr(attn, "k_norm") else None


def onednn_available(weight: torch.Tensor) -> bool:
    """oneDNN's pre-packed fp32 linear: CPU float32 weights, a PyTorch built with mkldnn."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # Weights reordered once into oneDNN's blocked layout: a pass over a few tokens (verification)
    # then costs about one weight read, where the default kernels re-read them per row block.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _packed(layer: _Layer) -> _Layer:
    """A copy of `layer` whose matrices are in oneDNN's packed layout (norms and biases shared)."""
    wide = copy.copy(layer)
    wide.wqkv, wide.wo, wide.wgu, wide.wd = (_pack(w) for w in (layer.wqkv, layer.wo, layer.wgu, layer.wd))
    return wide


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' arithmetic exactly: normalize in float32 (even a float64 model), scale in the model dtype.
    # In float32 torch's fused rms_norm gives the same bits (checked in the tests) in one op instead of six.
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * (h if h.dtype == x.dtype else h.to(x.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # transformers' x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) written as
    # roll(x) * (-sin1, sin2): the same products (a sign flip is exact), three ops instead of seven.
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


KERNELS = ("auto", "native", "onednn", "torch", "hybrid")


def choose_kernels(kernels: str, weight: torch.Tensor) -> str:
    """The linear kernels for weights like `weight`: "auto" takes native, else oneDNN, else torch's F.linear.
    "hybrid" (native for narrow passes, oneDNN for wide ones) needs both, else it is "auto"."""
    if kernels not in KERNELS:
        raise FastdraftError(f"unknown kernels {kernels!r} (expected one of {', '.join(KERNELS)})")
    if kernels == "hybrid":
        if native.unavailable_reason(weight) is None and onednn_available(weight):
            return "hybrid"
        kernels = "auto"
    if kernels in ("auto", "native"):  # fastdraft's own small-batch fp32 CPU linear (`native/`), built on first use
        reason = native.unavailable_reason(weight)
        if reason is None:
            return "native"
        if kernels == "native":
            raise FastdraftError(f"the native kernels cannot run here: {reason}")
    if kernels == "onednn" and not onednn_available(weight):
        raise FastdraftError("oneDNN kernels need float32 weights on CPU and a PyTorch built with mkldnn")
    if kernels != "auto":
        return kernels
    return "onednn" if onednn_available(weight) else "torch"


def _plain_linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, an int8 weight dequantized for the call (as `native.linear` does past its rows)."""
    return F.linear(x, weight.dequantize() if isinstance(weight, QuantizedWeight) else weight, bias)


class LeanDecoder:
    """A Llama-family forward over an HF model's weights, with a per-sequence-length static KV cache."""

    ragged = True

    def __init__(self, model: PreTrainedModel, kernels: str = "auto", weights: str = "float"):
        weights = resolve_weights(model, weights, "lean", kernels)
        if weights == "int8" and kernels not in ("auto", "native"):
            raise FastdraftError(f"int8 weights run on the native kernels only (got kernels {kernels!r})")
        reason = lean_unsupported_reason(model)
        if reason:
            raise FastdraftError(f"the lean decoder cannot run this model: {reason}; use backend='hf'")
        cfg, base = model.config, model.model
        weight = base.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.vocab_size = model.lm_head.weight.shape[0]
        self.num_params = count_params(model)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = base.layers[0].self_attn.scaling
        self.eps = base.norm.variance_epsilon
        with torch.no_grad():
            self.layers = [_Layer(layer) for layer in base.layers]
        self.windows = sliding_windows(cfg)
        self.embed, self.norm, self.head = weight, base.norm.weight, model.lm_head.weight
        # A draft whose output layer covers part of the vocabulary reads those rows only; its logits are scattered
        # into the full vocabulary (-inf elsewhere: never proposed), so the engine's sampling stays exact.
        self.head_ids = head_token_ids(model)
        if self.head_ids is not None:
            self.head = self.head[self.head_ids].contiguous()
        self.rotary = base.rotary_emb
        self.kernels = choose_kernels("native" if weights == "int8" else kernels, weight)
        self.weights = weights
        self.linear = {"native": native.linear, "hybrid": native.linear, "onednn": _onednn_linear, "torch": F.linear}[self.kernels]
        # oneDNN's packed weights take its own kernel at every size; plain (and int8) weights take F.linear.
        self.torch_linear = _onednn_linear if self.kernels == "onednn" else _plain_linear
        self.native_layers = None
        self.native_rows = HYBRID_NATIVE_ROWS if self.kernels == "hybrid" else NATIVE_PASS_ROWS
        # "hybrid": a second copy of the layers and head in oneDNN's packed layout, for passes wider than native_rows.
        self.wide_layers, self.wide_head = None, None
        if self.kernels == "hybrid":
            self.wide_layers = [_packed(layer) for layer in self.layers]
            self.wide_head = _pack(self.head)
        if self.kernels in ("native", "hybrid"):  # the kernels read plain row-major weights: make sure they are
            store = quantize_int8 if weights == "int8" else torch.Tensor.contiguous
            for layer in self.layers:
                layer.wqkv, layer.wo, layer.wgu, layer.wd = (store(w) for w in (layer.wqkv, layer.wo, layer.wgu, layer.wd))
            self.head = store(self.head)
            # Passes of up to NATIVE_PASS_ROWS rows (decode, verification, short prefills) run natively.
            self.native_layers = native.DecoderLayers(self.layers, self.embed.contiguous(), self.norm.contiguous(), self.heads,
                                                      self.kv_heads, self.head_dim, self.eps, self.scale)
        if self.kernels == "onednn":
            for layer in self.layers:
                layer.wqkv, layer.wo, layer.wgu, layer.wd = (_pack(w) for w in (layer.wqkv, layer.wo, layer.wgu, layer.wd))
            self.head = _pack(self.head)
        self.cos = self.sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)

    def new_cache(self, batch: int, capacity: int) -> StaticKVCache:
        self._ensure_rope(capacity)
        return StaticKVCache(len(self.layers), batch, self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    def _ensure_rope(self, length: int) -> None:
        """cos/sin for positions [0, length), from the model's own rotary module (same numbers as transformers)."""
        if self.cos.shape[0] >= length:
            return
        n = 1 << max(8, (length - 1).bit_length())
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = self.rotary(probe, torch.arange(n, device=self.device)[None])
        half = self.head_dim // 2
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # see _rotate

    def _window_binds(self, window: int | None, kv_len: int) -> bool:
        """Whether a layer's window hides any key in a pass whose keys end at `kv_len` (p - W < 0 otherwise)."""
        return window is not None and kv_len > window

    def _mask(self, offsets: list[int], t: int, kv_len: int, pos: torch.Tensor, window: int | None = None) -> torch.Tensor | None:
        """Additive mask [B or 1, 1, T, kv_len]: key j is visible to query i of row b iff j <= offsets[b] + i (and,
        in a sliding-window layer, j > offsets[b] + i - window).

        Additive (0 / -inf) rather than boolean: attention would convert a boolean mask in every layer."""
        first = offsets[0]
        uniform = all(o == first for o in offsets)
        window = window if self._window_binds(window, kv_len) else None
        if uniform and t == 1 and window is None:
            return None  # a single query sees every valid key
        keys = torch.arange(kv_len, device=self.device)[None, None, :]
        query = (pos[:1] if uniform else pos)[:, :, None]
        hidden = keys > query  # [B or 1, T, kv_len]
        if window is not None:
            hidden |= keys <= query - window
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
        return mask[:, None]

    def forward(self, cache: StaticKVCache, ids: torch.Tensor, offsets: list[int], logits_at: LogitsAt,
                torch_ops: bool = False) -> torch.Tensor | None:
        """One pass: ids [B, T] written at `offsets`; logits at `logits_at` (None: none, "all", or one position per row).

        `torch_ops`: take torch's ops and F.linear however few rows the pass has (the path passes of more than
        NATIVE_PASS_ROWS rows take anyway). Prefills that group prompts differently then run each prompt on the same
        kernels: the native ones round differently, enough to flip a near-tied choice of the next token."""
        b, t = ids.shape
        kv_len = max(offsets) + t
        if kv_len > cache.capacity:
            raise FastdraftError(f"KV cache overflow: {kv_len} positions > capacity {cache.capacity}")
        self._ensure_rope(kv_len)
        # The native kernel attends to every cached key: a pass that reaches past a sliding window takes torch's ops.
        windowed = any(self._window_binds(w, kv_len) for w in self.windows)
        linear = self.torch_linear if torch_ops else self.linear
        head = self.head
        if self.native_layers is not None and b * t <= self.native_rows and not windowed and not torch_ops:
            x = self.native_layers(ids.contiguous(), offsets, self.cos, self.sin, cache.k, cache.v)
        elif self.wide_layers is not None and not torch_ops:
            x = self._layers_forward(cache, F.embedding(ids, self.embed), offsets, _onednn_linear, self.wide_layers)
            linear, head = _onednn_linear, self.wide_head
        else:
            x = self._layers_forward(cache, F.embedding(ids, self.embed), offsets, linear, self.layers)
        if logits_at is None:
            return None
        if logits_at != "all":
            at = logits_at[0]
            if all(i == at for i in logits_at):  # one position for every row (a decode step): a view
                x = x[:, at]
            else:
                x = x[torch.arange(b, device=self.device), torch.tensor(logits_at, device=self.device)]
        logits = linear(x, head, None)
        return logits if self.head_ids is None else scatter_to_vocab(logits, self.head_ids, self.vocab_size)

    def _layers_forward(self, cache: StaticKVCache, x: torch.Tensor, offsets: list[int], linear,
                        layers: list[_Layer]) -> torch.Tensor:
        """The decoder layers and the final norm as torch ops (every kernel choice, any number of rows) with `linear`
        over `layers`' weights: embeddings x [B, T, hidden] in, final-normed hidden states out."""
        b, t = x.shape[:2]
        kv_len = max(offsets) + t
        pos = torch.tensor(offsets, device=self.device)[:, None] + torch.arange(t, device=self.device)
        first = offsets[0]
        if all(o == first for o in offsets):  # aligned rows (batch 1 always): views, no gather
            cos, sin = self.cos[first:first + t][None, :, None], self.sin[first:first + t][None, :, None]
        else:
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # [B, T, 1, head_dim]
        masks = {w: self._mask(offsets, t, kv_len, pos, w) for w in set(self.windows)}
        nq, nkv = self.heads, self.kv_heads
        for i, layer in enumerate(layers):
            h = _rms_norm(x, layer.ln1, self.eps)
            qkv = linear(h, layer.wqkv, layer.bqkv).view(b, t, nq + 2 * nkv, self.head_dim)
            if layer.q_norm is None:  # rotate q and k in one go: [B, T, heads + kv_heads, head_dim]
                qk = _rotate(qkv[:, :, :nq + nkv], cos, sin)
                q, k = qk[:, :, :nq], qk[:, :, nq:]
            else:
                q = _rotate(_rms_norm(qkv[:, :, :nq], layer.q_norm, self.eps), cos, sin)
                k = _rotate(_rms_norm(qkv[:, :, nq:nq + nkv], layer.k_norm, self.eps), cos, sin)
            cache.write(i, k.transpose(1, 2), qkv[:, :, nq + nkv:].transpose(1, 2), offsets, pos)
            keys, values = cache.view(i, kv_len)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=masks[self.windows[i]], scale=self.scale,
                                               enable_gqa=nkv != nq)
            x = x + linear(a.transpose(1, 2).reshape(b, t, nq * self.head_dim), layer.wo, layer.bo)
            h = _rms_norm(x, layer.ln2, self.eps)
            gate, up = linear(h, layer.wgu, None).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.wd, None)
        return _rms_norm(x, self.norm, self.eps)


class HFDecoder:
    """transformers' own forward with a `DynamicCache` cropped on rejection; one sequence at a time."""

    ragged = False

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.num_params = count_params(model)
        self.device = next(model.parameters()).device

    def new_cache(self, batch: int, capacity: int) -> DynamicCache:
        if batch != 1:
            raise FastdraftError("the transformers decoder runs one sequence at a time")
        return DynamicCache(config=self.model.config)

    def forward(self, cache: DynamicCache, ids: torch.Tensor, offsets: list[int], logits_at: LogitsAt) -> torch.Tensor | None:
        extra = cache.get_seq_length() - offsets[0]
        if extra > 0:
            cache.crop(-extra)  # roll back: forget the rejected tokens' keys and values (transformers 5: n < 0)
        keep = 0 if logits_at == "all" else 1
        if isinstance(logits_at, list):
            keep = ids.shape[1] - logits_at[0]
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        if logits_at is None:
            return None
        return out.logits if logits_at == "all" else out.logits[:, 0]


def resolve_weights(model: PreTrainedModel, weights: str, backend: str = "auto", kernels: str = "auto") -> str:
    """"float" or "int8" for `weights` ("auto": int8 where the lean decoder's native kernels would run `model`)."""
    if weights not in WEIGHTS:
        raise FastdraftError(f"unknown weights {weights!r} (expected one of {', '.join(WEIGHTS)})")
    if weights != "auto":
        return weights
    native_runs = (backend != "hf" and kernels in ("auto", "native") and lean_unsupported_reason(model) is None
                   and native.unavailable_reason(next(model.parameters())) is None)
    return "int8" if native_runs else "float"


def make_decoder(model: PreTrainedModel, backend: str = "auto", kernels: str = "auto", weights: str = "float") -> Decoder:
    """`backend`: "lean" (fast, Llama family), "hf" (any causal LM), "auto" (lean where it applies).

    `kernels` (lean only): "native" (fastdraft's small-batch fp32 CPU kernel), "onednn" (pre-packed fp32 CPU
    linears), "torch" (F.linear), "auto" (native, else oneDNN, where they apply).
    `weights` (lean, native kernels): "float" (the model's own), "int8" (per-row int8 matrices, see `fastdraft.quantize`)
    or "auto" (`resolve_weights`).
    """
    if backend not in ("auto", "lean", "hf"):
        raise FastdraftError(f"unknown decoder backend {backend!r} (expected 'auto', 'lean' or 'hf')")
    weights = resolve_weights(model, weights, backend, kernels)
    if backend == "hf" or (backend == "auto" and lean_unsupported_reason(model)):
        if weights != "float":
            raise FastdraftError(f"{weights} weights run on the lean decoder's native kernel, which cannot run this "
                                 f"model: {lean_unsupported_reason(model) or 'backend hf'}; use float weights")
        return HFDecoder(model)
    return LeanDecoder(model, kernels, weights)
