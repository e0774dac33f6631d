"""fastdraft's own float32 CPU kernels for the few rows of a decode or verification pass, compiled once, loaded
with ctypes.

- `linear` (`skinny_linear.c`): decoding and verification multiply 1 to ~24 rows by every weight matrix, a
  stream over the weights. The kernel reads each weight once and uses it for all rows, with a register tile
  sized for the CPU's vector registers. Weights are float32, or int8 with a scale per output row
  (`QuantizedWeight`, a quarter of the bytes to stream: a draft's weights, as the paper deploys its drafts).
  Measured on 2 cores (AMD Zen 3, AVX2), a 12-layer 768-wide stack:
  18.6 ms at 1 row and 18.7 at 6 (oneDNN pre-packed: 27.7 and 34.6; MKL through F.linear: 37.3 and 74.9).
  Above `MAX_ROWS` rows (prefill, big batches) it hands over to F.linear on the same weights, so no second
  copy of them is kept.
- `DecoderLayers` (`decoder_layers.c`): a Llama-family model's body in one call per pass: the token embeddings,
  every decoder layer (norms, rope, KV-cache writes, attention and SiLU as plain loops around the same linear
  kernel) and the final norm, because at a few rows the ~25 small tensor ops of a layer cost more in dispatch
  than in arithmetic.

Both are built with the system C compiler (`$CC`, default `cc`) the first time they are used, for this CPU
(-march=native), into `$FASTDRAFT_CACHE/native/`; the file name carries a hash of the sources, the compiler
and the CPU flags, so nodes that share a home directory never load a build made for another CPU. Without a
compiler `unavailable_reason()` says why and the lean decoder uses oneDNN instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdraft.quantize import QuantizedWeight

FILES = sorted(Path(__file__).parent.glob("*.[ch]"))  # the sources and their shared header: all in the build hash
SOURCES = [f for f in FILES if f.suffix == ".c"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
MAX_ROWS = 24  # crossover with MKL: 12-16 rows on an AVX-512 Xeon; on AMD Zen 3 (AVX2) the kernel is still 2.4x MKL at 24


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([*(f.read_text() for f in FILES), compiler, version, _cpu_flags(), *FLAGS]).encode()).hexdigest()
    from fastdraft.assets import cache_dir

    out = cache_dir() / "native" / f"fastdraft_native-{key[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: concurrent builders are safe
        built = Path(tmp) / out.name
        proc = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {', '.join(f.name for f in SOURCES)}: {proc.stderr.strip()[-500:]}")
        os.replace(built, out)
    return out


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler!r} not on PATH; set $CC)"
    try:
        # torch is imported first, so the kernel's OpenMP calls land in torch's own libgomp (same threads).
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        return None, f"could not build the native kernel: {exc}"
    lib.skinny_linear_into.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
    lib.skinny_linear_into.restype = None
    lib.decoder_layers.argtypes = ([ctypes.POINTER(_CModel)] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
                                   + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 6)
    lib.decoder_layers.restype = ctypes.c_int
    return lib, None


LAYER_WEIGHTS = ("wqkv", "wo", "wgu", "wd")  # a layer's linear weights: float32 tensors or QuantizedWeight
LAYER_VECTORS = ("bqkv", "bo", "ln1", "ln2", "q_norm", "k_norm")  # float32 or None


class _CLayer(ctypes.Structure):  # decoder_layers.c: Layer
    _fields_ = [(name, ctypes.c_void_p) for name in (*LAYER_WEIGHTS, *LAYER_VECTORS, "s_qkv", "s_o", "s_gu", "s_d")]


class _CModel(ctypes.Structure):  # decoder_layers.c: Model
    _fields_ = [(name, ctypes.c_int) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                                  "vocab")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layer", ctypes.POINTER(_CLayer)),
        ("embed", ctypes.c_void_p), ("norm", ctypes.c_void_p)]


def unavailable_reason(weight: torch.Tensor | None = None) -> str | None:
    """Why the native kernel cannot serve `weight` (float32 on CPU), or None when it can."""
    if weight is not None and (weight.device.type != "cpu" or weight.dtype != torch.float32):
        return f"it runs float32 on CPU (got {weight.dtype} on {weight.device.type})"
    return _library()[1]


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for contiguous float32 CPU tensors, weight float32 or int8 (`QuantizedWeight`);
    the native kernel up to MAX_ROWS rows, F.linear beyond (an int8 weight dequantized for that call: prefills)."""
    k = x.shape[-1]
    rows = x.numel() // k
    if rows > MAX_ROWS:
        return F.linear(x, weight.dequantize() if isinstance(weight, QuantizedWeight) else weight, bias)
    x = x.contiguous()
    n = weight.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    w, scale = _weight_ptrs(weight)
    _library()[0].skinny_linear_into(x.data_ptr(), w, scale, _ptr(bias), y.data_ptr(), rows, n, k, 0)
    return y


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weight_ptrs(weight: torch.Tensor | QuantizedWeight) -> tuple[int, int | None]:
    """(weights, scales) pointers as the kernel takes them: scales NULL for float32 weights."""
    if isinstance(weight, QuantizedWeight):
        return weight.q.data_ptr(), weight.scale.data_ptr()
    return weight.data_ptr(), None


class DecoderLayers:
    """A lean decoder's body in one native call (`decoder_layers.c`): token embeddings, every decoder layer, the final
    norm, for any number of rows; the decoder sends it passes of up to `decoders.NATIVE_PASS_ROWS` rows (decode,
    verification, short prefills) and applies the head itself to the rows it wants.

    `layers` are the lean decoder's own (`decoders._Layer`: fused q|k|v and gate|up weights, row-major float32 or
    `QuantizedWeight`); they, `embed` and `norm` are referenced, not copied.
    """

    def __init__(self, layers: list, embed: torch.Tensor, norm: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                 eps: float, scale: float):
        weights = [[getattr(layer, name) for name in LAYER_WEIGHTS] for layer in layers]
        vectors = [[getattr(layer, name) for name in LAYER_VECTORS] for layer in layers] + [[embed, norm]]
        for w in [w for row in weights for w in row] + [v for row in vectors for v in row if v is not None]:
            t = w.q if isinstance(w, QuantizedWeight) else w
            if not (t.is_contiguous() and t.dtype in (torch.float32, torch.int8) and t.device.type == "cpu"):
                raise ValueError("native decoder layers need contiguous float32 (or int8) CPU weights")
        self._weights = (weights, vectors)  # referenced by the C structs: kept alive here
        self._layers = (_CLayer * len(layers))(*(
            _CLayer(*(p for p, _ in map(_weight_ptrs, w)), *map(_ptr, v), *(s for _, s in map(_weight_ptrs, w)))
            for w, v in zip(weights, vectors)))
        self.hidden, self.heads, self.kv_heads, self.head_dim = embed.shape[1], heads, kv_heads, head_dim
        self.intermediate = layers[0].wd.shape[1]
        self._model = _CModel(len(layers), self.hidden, heads, kv_heads, head_dim, self.intermediate, embed.shape[0], eps,
                              scale, self._layers, embed.data_ptr(), norm.data_ptr())

    def __call__(self, ids: torch.Tensor, offsets: list[int], cos: torch.Tensor, sin_signed: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] of ids [B, T], row b's tokens at positions offsets[b] + 0..T-1;
        their keys and values are written to the caches.

        cos / sin_signed: [positions, head_dim] rope tables; k_cache, v_cache: [layers, B, kv_heads, capacity, head_dim].
        """
        b, t = ids.shape
        if not (ids.is_contiguous() and ids.dtype == torch.long and k_cache.is_contiguous() and v_cache.is_contiguous()
                and k_cache.shape[1] == b == len(offsets) and cos.is_contiguous() and sin_signed.is_contiguous()):
            raise ValueError("native decoder layers: contiguous int64 ids [B, T] and caches [layers, B, ...] expected")
        rows, kv_len = b * t, max(offsets) + t
        empty = functools.partial(torch.empty, dtype=torch.float32)
        x, h = empty(b, t, self.hidden), empty(rows, self.hidden)
        qkv = empty(rows, (self.heads + 2 * self.kv_heads) * self.head_dim)
        att, gu, act = empty(rows, self.heads * self.head_dim), empty(rows, 2 * self.intermediate), empty(rows, self.intermediate)
        scores = empty(rows * self.heads, kv_len)
        offs = (ctypes.c_int * b)(*offsets)
        bad = _library()[0].decoder_layers(ctypes.byref(self._model), ids.data_ptr(), x.data_ptr(), b, t, offs,
                                           cos.data_ptr(), sin_signed.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                           k_cache.shape[3], kv_len, h.data_ptr(), qkv.data_ptr(), att.data_ptr(),
                                           gu.data_ptr(), act.data_ptr(), scores.data_ptr())
        if bad:  # as F.embedding would: an id past the table is an error, never a read out of bounds
            raise IndexError(f"token id {ids.view(-1)[bad - 1].item()} is outside the embedding table "
                             f"({self._model.vocab} rows)")
        return x
