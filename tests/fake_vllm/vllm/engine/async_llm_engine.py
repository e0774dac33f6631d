"""As `vllm.AsyncLLMEngine` (vLLM V1's `AsyncLLM`): `from_engine_args`, the async `generate` stream of
cumulative `RequestOutput`s (the last one `finished`), `do_log_stats`, `shutdown`. Token prompts only."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from typing import Any

from vllm._log import log
from vllm._model import complete, load_model
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine_args: AsyncEngineArgs, stat_loggers: list | None = None):
        self.args = engine_args
        self.model = load_model(engine_args.model, engine_args.dtype)
        log("async_engine", pid=os.getpid(), model=engine_args.model, stat_loggers=len(stat_loggers or []))

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True, usage_context: Any = None,
                         stat_loggers: list | None = None) -> AsyncLLMEngine:
        return cls(engine_args, stat_loggers)

    async def generate(self, prompt: dict, sampling_params: SamplingParams, request_id: str, *,
                       lora_request: Any = None, **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(sampling_params)}")
        if "prompt_token_ids" not in prompt:
            raise NotImplementedError("the fake vLLM takes token prompts (TokensPrompt) only")
        if (sampling_params.logprobs or 0) > self.args.max_logprobs:
            raise ValueError(f"Requested sample logprobs of {sampling_params.logprobs}, which is greater than max "
                             f"allowed: {self.args.max_logprobs}")
        ids = list(prompt["prompt_token_ids"])
        log("request", pid=os.getpid(), request_id=request_id, n_prompt=len(ids), params=sampling_params.to_dict())
        done = complete(self.model, ids, sampling_params)
        # stream it as vLLM's default CUMULATIVE output kind does: every output holds all tokens so far
        for n in range(1, len(done.token_ids) + 1):
            last = n == len(done.token_ids)
            partial = CompletionOutput(0, "", done.token_ids[:n], None, done.logprobs[:n] if done.logprobs else None,
                                       done.finish_reason if last else None, done.stop_reason if last else None)
            yield RequestOutput(request_id, None, ids, None, [partial], finished=last)
            await asyncio.sleep(0)  # let the actor's other requests interleave, as continuous batching does

    async def do_log_stats(self, *args: Any, **kwargs: Any) -> None:
        return None

    def shutdown(self, timeout: float | None = None) -> None:
        return None
