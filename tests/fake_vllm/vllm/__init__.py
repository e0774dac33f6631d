"""A stand-in for vLLM, for tests only (vLLM cannot be installed beside the CPU stack).

It offers the slice of vLLM's offline API that `fastdraft.generation.backends.VLLMBackend` uses
(`LLM(model=..., ...)`, `LLM.generate(prompts, sampling_params, use_tqdm=)`, `SamplingParams(...)`,
outputs with `.outputs[0].token_ids / .finish_reason / .logprobs`) and answers with the real model
through transformers, one prompt at a time. Every constructor and call is appended as JSON to the file
named by $FAKE_VLLM_LOG (when set), so tests can check what fastdraft asked vLLM for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

IS_FAKE = True


def _log(event: str, **data) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), **data}) + "\n")


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, seed=None, stop_token_ids=None,
                 logprobs=None, detokenize=True):
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.max_tokens, self.seed, self.stop_token_ids = max_tokens, seed, list(stop_token_ids or [])
        self.logprobs, self.detokenize = logprobs, detokenize

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Logprob:
    logprob: float
    rank: int


@dataclass
class CompletionOutput:
    token_ids: list
    finish_reason: str
    logprobs: list | None


@dataclass
class RequestOutput:
    outputs: list


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", trust_remote_code: bool = False, **kwargs):
        torch_dtype = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
        _log("init", model=model, tokenizer=tokenizer, dtype=dtype, kwargs=kwargs)

    @torch.inference_mode()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        _log("generate", n=len(prompts), params=[p.to_dict() for p in params])
        return [RequestOutput([self._one(p["prompt_token_ids"], sp)]) for p, sp in zip(prompts, params)]

    def _one(self, ids, sp: SamplingParams) -> CompletionOutput:
        sample = sp.temperature > 0
        if sample:
            torch.manual_seed(sp.seed or 0)
        out = self.model.generate(
            torch.tensor([ids]), max_new_tokens=sp.max_tokens, do_sample=sample, temperature=sp.temperature if sample else None,
            top_p=sp.top_p if sample else None, top_k=(sp.top_k if sp.top_k > 0 else 0) if sample else None,
            eos_token_id=sp.stop_token_ids or None, pad_token_id=(sp.stop_token_ids or [0])[0],
            return_dict_in_generate=True, output_logits=True,
        )
        new = out.sequences[0, len(ids):].tolist()
        for i, t in enumerate(new):  # like vLLM: the stop token is the last token of the output
            if t in sp.stop_token_ids:
                new = new[: i + 1]
                break
        reason = "stop" if new and new[-1] in sp.stop_token_ids else "length"
        logprobs = None
        if sp.logprobs:
            logprobs = []
            for t in range(len(new)):
                top = torch.log_softmax(out.logits[t][0].float(), -1).topk(sp.logprobs)
                logprobs.append({int(i): Logprob(float(v), r + 1) for r, (i, v) in enumerate(zip(top.indices, top.values))})
        return CompletionOutput(new, reason, logprobs)
