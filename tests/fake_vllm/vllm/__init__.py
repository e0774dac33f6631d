"""A stand-in for vLLM, for tests only (vLLM cannot be installed beside the CPU stack).

It offers, under vLLM's own module paths, the slice of vLLM's API that
Ray Data LLM's vLLM stage (`ray/llm/_internal/batch/stages/vllm_engine_stage.py`, Ray 2.60) calls:
  `AsyncEngineArgs(**engine_kwargs).create_engine_config()`, `AsyncLLMEngine.from_engine_args(args, stat_loggers=)`,
  `engine.generate(request_id=, prompt=TokensPrompt, sampling_params=, lora_request=)` streaming `RequestOutput`s,
  `do_log_stats()`, `shutdown()`, `SamplingParams(**row_params, structured_outputs=None)`,
  `vllm.outputs.RequestOutput`/`PoolingRequestOutput`, `vllm.inputs.llm.TokensPrompt`, `vllm.logprobs.Logprob`,
  `vllm.v1.metrics.ray_wrappers.RayPrometheusStatLogger`, `vllm.v1.engine.exceptions.EngineDeadError`.
The signatures follow vLLM's sources (vllm-project/vllm: engine/arg_utils.py, v1/engine/async_llm.py, outputs.py,
sampling_params.py, logprobs.py). It answers with the real model through transformers (`_model.py`), one
request at a time. Every engine construction and request is appended as JSON to $FAKE_VLLM_LOG (when set).
"""

from __future__ import annotations

from vllm import inputs, outputs  # noqa: F401  (Ray reads vllm.outputs.RequestOutput)
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
from vllm.engine.async_llm_engine import AsyncLLMEngine  # noqa: F401
from vllm.inputs import TextPrompt, TokensPrompt  # noqa: F401
from vllm.logprobs import Logprob  # noqa: F401
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: F401
from vllm.sampling_params import SamplingParams  # noqa: F401

IS_FAKE = True


__all__ = ["AsyncEngineArgs", "AsyncLLMEngine", "SamplingParams", "CompletionOutput", "RequestOutput",
           "TokensPrompt", "TextPrompt", "Logprob"]
