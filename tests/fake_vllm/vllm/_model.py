"""The fake's generation: the real model through transformers, one request at a time (shared by `LLM` and
`AsyncLLMEngine`). Mimics vLLM's output conventions, not its speed:

- generation stops at `stop_token_ids` or the model's EOS (unless `ignore_eos`), or after `max_tokens`;
  the stop token stays in `token_ids` (vLLM leaves it out of the text only);
- `logprobs=k`: per token {token id: Logprob} of the k most likely tokens of the raw (temperature 1) logits,
  plus the sampled token when it is not among them (vLLM's "up to k + 1" rule), ranks 1-based;
- temperature 0 is greedy; sampling is seeded by `seed` alone.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput


def load_model(model: str, dtype: str):
    torch_dtype = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])


@torch.inference_mode()
def complete(model, ids: list[int], sp) -> CompletionOutput:
    stops = list(dict.fromkeys([*(sp.stop_token_ids or []), *([] if sp.ignore_eos else eos_ids(model))]))
    sample = sp.temperature > 0
    if sample:
        torch.manual_seed(sp.seed or 0)
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=sp.max_tokens, do_sample=sample, temperature=sp.temperature if sample else None,
        top_p=sp.top_p if sample else None, top_k=(sp.top_k if sp.top_k > 0 else 0) if sample else None,
        eos_token_id=stops or None, pad_token_id=(stops or [0])[0], return_dict_in_generate=True, output_logits=True,
    )
    new = out.sequences[0, len(ids):].tolist()
    for i, t in enumerate(new):  # like vLLM: the stop token is the last token of the output
        if t in stops:
            new = new[: i + 1]
            break
    reason = "stop" if new and new[-1] in stops else "length"
    logprobs = None
    if sp.logprobs:
        logprobs = []
        for t, chosen in enumerate(new):
            lp = torch.log_softmax(out.logits[t][0].float(), -1)
            top = lp.topk(sp.logprobs)
            entry = {int(i): Logprob(float(v), r + 1) for r, (i, v) in enumerate(zip(top.indices, top.values))}
            if chosen not in entry:
                entry[chosen] = Logprob(float(lp[chosen]), int((lp > lp[chosen]).sum()) + 1)
            logprobs.append(entry)
    return CompletionOutput(index=0, text="", token_ids=new, cumulative_logprob=None, logprobs=logprobs,
                            finish_reason=reason, stop_reason=new[-1] if reason == "stop" else None)
