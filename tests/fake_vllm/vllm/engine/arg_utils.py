"""As `vllm.engine.arg_utils.AsyncEngineArgs`: a dataclass of engine arguments (an unknown one is a TypeError, as
in vLLM) with `create_engine_config()`, whose scheduler/parallel configs Ray's vLLM stage reads."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

from vllm._log import log


@dataclass
class AsyncEngineArgs:
    model: str = "facebook/opt-125m"
    tokenizer: str | None = None
    runner: str = "auto"
    convert: str = "auto"
    trust_remote_code: bool = False
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    distributed_executor_backend: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_logprobs: int = 20
    logprobs_mode: str = "raw_logprobs"
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    enforce_eager: bool = False
    load_format: str = "auto"
    speculative_config: dict[str, Any] | None = None
    disable_log_stats: bool = False
    enable_log_requests: bool = False

    def __post_init__(self):
        log("engine_args", pid=os.getpid(), kwargs=asdict(self))

    def create_engine_config(self, usage_context: Any = None) -> SimpleNamespace:
        return SimpleNamespace(
            scheduler_config=SimpleNamespace(max_num_seqs=self.max_num_seqs or 256),
            parallel_config=SimpleNamespace(pipeline_parallel_size=self.pipeline_parallel_size,
                                            tensor_parallel_size=self.tensor_parallel_size),
            model_config=SimpleNamespace(model=self.model, dtype=self.dtype, max_logprobs=self.max_logprobs),
        )
