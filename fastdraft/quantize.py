"""int8 draft weights: symmetric, one scale per output row, the format fastdraft's native kernel streams.

The paper deploys its drafts in int8: a draft's cost is the bytes each step reads, and int8 reads a quarter of
float32's. The engine's native kernel (`speculative/native/`) multiplies by `QuantizedWeight`s directly. So that
everything else sees the very numbers that kernel computes with (the offline acceptance, the HF path, the
lossless tests), `round_model_to_int8_` puts a model's matrices on the int8 grid in float: quantizing it then
loses nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHTS = ("auto", "float", "int8")  # how a draft's matrices are stored for the engine; auto: int8 where the native
# kernel runs the draft (Llama family, float32 on CPU), else float (`decoders.resolve_weights`)


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight [N, K] as int8 with one float32 scale per output row: W ~= scale[:, None] * q."""

    q: torch.Tensor      # int8 [N, K], row-major
    scale: torch.Tensor  # float32 [N]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def round_to_int8(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] rounded to the symmetric per-row int8 grid, in its own dtype: the numbers `quantize_int8`
    stores. A model whose weights went through this computes in float what the int8 kernel computes."""
    return quantize_int8(weight).dequantize().to(weight.dtype)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-row int8: scale = max |row| / 127, q = round(row / scale). Applied to weights already
    on the grid (`round_to_int8`) it gives back the same q, so rounding a model and quantizing it agree."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return QuantizedWeight(q, scale.contiguous())


def round_model_to_int8_(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight matrix of `model` (decoder linears, the embedding table and a head, tied or not) rounded in place
    to the int8 grid `quantize_int8` uses; norms and biases stay as they are. Returns `model`."""
    seen: set[int] = set()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2 and param.data_ptr() not in seen:
                seen.add(param.data_ptr())
                param.copy_(round_to_int8(param))
    return model
