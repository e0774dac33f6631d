"""A stand-in for vLLM, for tests only (vLLM cannot be installed beside the CPU stack).

It offers the slice of vLLM's API that fastdraft and Ray use, under vLLM's own module paths:
- the offline `LLM(model=..., ...)`, `LLM.generate(prompts, sampling_params, use_tqdm=)` that
  `fastdraft.generation.backends.VLLMBackend` calls;
- what Ray Data LLM's vLLM stage (`ray/llm/_internal/batch/stages/vllm_engine_stage.py`, Ray 2.60) calls:
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

import os

from vllm import inputs, outputs  # noqa: F401  (Ray reads vllm.outputs.RequestOutput)
from vllm._log import log
from vllm._model import complete, load_model
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
from vllm.engine.async_llm_engine import AsyncLLMEngine  # noqa: F401
from vllm.inputs import TextPrompt, TokensPrompt  # noqa: F401
from vllm.logprobs import Logprob  # noqa: F401
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

IS_FAKE = True


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", trust_remote_code: bool = False, **kwargs):
        self.model = load_model(model, dtype)
        log("init", pid=os.getpid(), model=model, tokenizer=tokenizer, dtype=dtype, kwargs=kwargs)

    def generate(self, prompts, sampling_params, use_tqdm=True) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        log("generate", pid=os.getpid(), n=len(prompts), params=[p.to_dict() for p in params])
        return [RequestOutput(str(i), None, p["prompt_token_ids"], None, [complete(self.model, p["prompt_token_ids"], sp)], True)
                for i, (p, sp) in enumerate(zip(prompts, params))]


__all__ = ["LLM", "AsyncEngineArgs", "AsyncLLMEngine", "SamplingParams", "CompletionOutput", "RequestOutput",
           "TokensPrompt", "TextPrompt", "Logprob"]
