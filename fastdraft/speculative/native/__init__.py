"""fastdraft's own small-batch float32 linear for CPU (`skinny_linear.c`), compiled once, loaded with ctypes.

Decoding and verification multiply 1 to ~9 rows by every weight matrix: a stream over the weights. The C
kernel reads each weight once and uses it for all rows (see the comment in `skinny_linear.c`); measured on
2 cores, a 12-layer 768-wide stack took 15-17 ms at 1 row and 18-21 ms at 6 (oneDNN pre-packed: 18-19 and
23-25 ms; MKL through F.linear: 16-17 and 30-33 ms). Above `MAX_ROWS` rows (prefill, big batches) MKL is
faster and `linear` hands over to F.linear on the same weights, so no second copy of them is kept.

It is built with the system C compiler (`$CC`, default `cc`) the first time it is used, for this CPU
(-march=native), into `$FASTDRAFT_CACHE/native/`; the file name carries a hash of the source, the compiler
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

SOURCE = Path(__file__).with_name("skinny_linear.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
MAX_ROWS = 24  # crossover with MKL: 12-16 rows on an AVX-512 Xeon; on AMD Zen 3 (AVX2) the kernel is still 2.4x MKL at 24


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, _cpu_flags(), *FLAGS]).encode()).hexdigest()
    from fastdraft.assets import cache_dir

    out = cache_dir() / "native" / f"skinny_linear-{key[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: concurrent builders are safe
        built = Path(tmp) / out.name
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {proc.stderr.strip()[-500:]}")
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
    lib.skinny_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.skinny_linear.restype = None
    return lib, None


def unavailable_reason(weight: torch.Tensor | None = None) -> str | None:
    """Why the native kernel cannot serve `weight` (float32 on CPU), or None when it can."""
    if weight is not None and (weight.device.type != "cpu" or weight.dtype != torch.float32):
        return f"it runs float32 on CPU (got {weight.dtype} on {weight.device.type})"
    return _library()[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for contiguous float32 CPU tensors; the native kernel up to MAX_ROWS rows."""
    k = x.shape[-1]
    rows = x.numel() // k
    if rows > MAX_ROWS:
        return F.linear(x, weight, bias)
    x = x.contiguous()
    n = weight.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    _library()[0].skinny_linear(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                                y.data_ptr(), rows, n, k)
    return y
