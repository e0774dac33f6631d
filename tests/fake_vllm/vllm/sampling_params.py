"""As `vllm.sampling_params`: the `SamplingParams` fields fastdraft sends (an unknown keyword is a TypeError,
as for vLLM's msgspec struct), plus `structured_outputs`, which Ray's vLLM stage always passes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(kw_only=True)
class StructuredOutputsParams:
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if self.n != 1:
            raise NotImplementedError("the fake vLLM answers n=1 only")
        self.stop_token_ids = list(self.stop_token_ids or [])

    def to_dict(self) -> dict:
        return asdict(self)
