"""The OpenAI-compatible wire format of fastdraft's server: requests, responses, errors, streaming.

Pure code (pydantic + a tokenizer), no Ray: `fastdraft/serving/app.py` wires it into Ray Serve. What the
server speaks:

    POST /v1/completions          prompt: str | [str] | [int] | [[int]]      (stream: true -> SSE)
    POST /v1/chat/completions     messages: [{role, content}]; the chat template is applied server-side
    GET  /v1/models               the one served model
    GET  /health                  200 once both models are loaded
    GET  /metrics                 Prometheus text

Extensions to OpenAI's schema: `gamma` (draft tokens per step, 0..max_gamma), `speculative` (bool) and
`top_k` in requests; `usage.speculative` (drafted, accepted, target_passes, acceptance_rate, tau, gamma)
in responses (the metric names of `fastdraft.evaluation.metrics`). Requests are validated strictly: a wrong type or an unknown field
is a 400 whose message and `param` name the field, as OpenAI's API does.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_SEQUENCES = 4
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt the context can hold, far below what hurts a replica


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "10" is not an int and 1.0 is not an int (OpenAI rejects both); unknown fields are errors.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Extension (vLLM-style): 0 or -1 = off."""
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    gamma: int | None = None
    """Extension: draft tokens per step for this request (0 = the target alone), at most the deployment's max_gamma."""
    speculative: bool | None = None
    """Extension: false runs this request on the target alone."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ChatContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None


# What a union-typed field accepts, for messages better than pydantic's one line per union member.
_EXPECTED = {
    "prompt": "a non-empty string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": f"a string or a list of at most {MAX_STOP_SEQUENCES} strings",
    "content": "a string or a list of {type: 'text', text: ...} parts",
}
_TYPE_NAMES = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|.*-.*|[A-Z].*)$")


def _param_of(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (pydantic's union member names dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_NAMES.match(part):
            out += ("." if out else "") + part
    return out


def parse_request(body: bytes, model: type[BaseModel], max_body_bytes: int = MAX_BODY_BYTES) -> BaseModel:
    """Parse and type-check a raw JSON body, or raise an APIError naming the field.

    Args:
        body: the raw request body.
        model: `CompletionRequest` or `ChatCompletionRequest`.
        max_body_bytes: larger bodies are refused with 413 before parsing.
    """
    if len(body) > max_body_bytes:
        raise APIError(413, f"request body is {len(body):,} bytes; the limit is {max_body_bytes:,}", code="body_too_large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    if not text.strip():
        raise APIError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise _api_error(exc) from None


def _api_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    kind, param = first["type"], _param_of(first["loc"])
    if kind == "json_invalid":
        return APIError(400, f"malformed JSON: {first['msg'].removeprefix('Invalid JSON: ')}", code="invalid_json")
    if kind == "model_type" and not param:
        return APIError(400, "request body must be a JSON object", code="invalid_json")
    if kind == "missing":
        return APIError(400, f"'{param}' is a required field", param=param, code="missing_field")
    if kind == "extra_forbidden":
        return APIError(400, f"unrecognized request field '{param}'", param=param, code="unknown_field")
    leaf = param.rsplit(".", 1)[-1].split("[")[0]
    if leaf in _EXPECTED and kind in ("string_type", "list_type", "int_type", "model_type", "dict_type", "literal_error"):
        return APIError(400, f"'{param}': expected {_EXPECTED[leaf]}", param=param, code="invalid_type")
    return APIError(400, f"'{param}': {first['msg']}", param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------
# Limits (from the deployment's config) and semantic checks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one deployment accepts; built from `ServeConfig` and the target's config."""

    model_name: str
    max_tokens_cap: int
    max_n: int
    max_gamma: int
    context_length: int
    speculative: bool
    max_prompts: int = 8
    max_body_bytes: int = MAX_BODY_BYTES


def check_sampling(req: _SamplingFields, limits: Limits) -> None:
    """Range checks shared by both endpoints; raise APIError naming the field."""
    if req.model is not None and req.model != limits.model_name:
        raise APIError(404, f"model '{req.model}' does not exist; this server serves '{limits.model_name}'",
                       param="model", code="model_not_found")
    if req.temperature < 0 or req.temperature > 2:
        raise APIError(400, f"'temperature' must be between 0 and 2, got {req.temperature}", param="temperature")
    if not 0 < req.top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {req.top_p}", param="top_p")
    if req.top_k < -1:
        raise APIError(400, f"'top_k' must be -1 or 0 (off) or a positive count, got {req.top_k}", param="top_k")
    if not 1 <= req.n <= limits.max_n:
        raise APIError(400, f"'n' must be between 1 and {limits.max_n} (serve.max_n), got {req.n}", param="n")
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"'stop': at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "'stop': stop sequences must be non-empty strings", param="stop")
    if req.gamma is not None and not 0 <= req.gamma <= limits.max_gamma:
        raise APIError(400, f"'gamma' must be between 0 and {limits.max_gamma} (serve.max_gamma), got {req.gamma}", param="gamma")
    if req.speculative and not limits.speculative:
        raise APIError(400, "'speculative': this deployment serves the target alone (serve.speculative is false)",
                       param="speculative")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            raise APIError(400, f"'{name}' is not supported (speculative decoding samples the target's distribution exactly)",
                           param=name)
    if req.logprobs not in (None, False):
        raise APIError(400, "'logprobs' is not supported", param="logprobs")


def check_max_tokens(value: int | None, param: str, prompt_len: int, limits: Limits) -> int:
    """The number of new tokens to generate: defaulted, capped, and fitting the context."""
    if prompt_len >= limits.context_length:
        raise APIError(400, f"the prompt ({prompt_len} tokens) leaves no room in the model's context of "
                       f"{limits.context_length} tokens", param=param, code="context_length_exceeded")
    if value is None:
        value = min(limits.max_tokens_cap, limits.context_length - prompt_len)
    if value <= 0:
        raise APIError(400, f"'{param}' must be at least 1, got {value}", param=param)
    if value > limits.max_tokens_cap:
        raise APIError(400, f"'{param}' is {value}; this deployment allows at most {limits.max_tokens_cap} (serve.max_tokens_cap)",
                       param=param)
    if prompt_len + value > limits.context_length:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus '{param}' ({value}) exceeds the model's context of "
                       f"{limits.context_length} tokens", param=param, code="context_length_exceeded")
    return value


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def completion_prompts(req: CompletionRequest, limits: Limits) -> list[str | list[int]]:
    """The request's prompts as a list of strings or token-id lists (non-empty, at most `max_prompts`)."""
    p = req.prompt
    prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts or any(len(x) == 0 for x in prompts):
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"'prompt': at most {limits.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
    if req.echo or req.suffix is not None or (req.best_of not in (None, 1)):
        name = "echo" if req.echo else "suffix" if req.suffix is not None else "best_of"
        raise APIError(400, f"'{name}' is not supported", param=name)
    return prompts


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """The conversation as plain dicts for `apply_chat_template` (content parts joined)."""
    if not req.messages:
        raise APIError(400, "'messages' must contain at least one message", param="messages")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_completion_tokens")
    return [{"role": m.role, "content": m.text()} for m in req.messages]


# --------------------------------------------------------------------------------------------
# Incremental detokenization with stop sequences
# --------------------------------------------------------------------------------------------
class TextStream:
    """Turns a growing list of token ids into text deltas, honouring stop sequences.

    Text is decoded from all ids each time (correct across multi-byte characters split between tokens);
    trailing U+FFFD (an incomplete character) and any tail that could begin a stop sequence are held
    back until the next tokens tell. After a stop sequence is seen the text ends before it.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""         # everything emitted so far
        self.stopped = False   # a stop sequence ended the text

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the new text that is safe to emit ('' when stopped)."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        # A trailing run of U+FFFD may be a character whose remaining bytes are still to come.
        end = len(full.rstrip("\ufffd"))
        end -= self._held(full[:end])
        return self._emit(full[:end])

    def finish(self) -> str:
        """The text held back, once generation has ended without a stop sequence."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        for n in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: str) -> str:
        # The emitted text only grows: a decode that rewrites earlier characters is not re-sent.
        delta = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text = upto if upto.startswith(self.text) else self.text
        return delta


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------
def speculative_usage(stats: dict | None, gamma: int) -> dict:
    """usage.speculative: the counters (defined in `fastdraft.evaluation.metrics`) of the engine's work for this request."""
    stats = stats or {}
    drafted, accepted = stats.get("drafted", 0), stats.get("accepted", 0)
    passes, emitted = stats.get("target_passes", 0), stats.get("emitted", 0)
    return {"gamma": gamma, "drafted": drafted, "accepted": accepted, "target_passes": passes, "emitted": emitted,
            "acceptance_rate": accepted / drafted if drafted else 0.0, "tau": emitted / passes if passes else 0.0}


def usage_dict(prompt_tokens: int, completion_tokens: int, spec: dict | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if spec is not None:
        out["speculative"] = spec
    return out


def merge_speculative(parts: list[dict]) -> dict:
    """Sum per-choice speculative usage into the request's (rates recomputed from the sums)."""
    total = {"drafted": 0, "accepted": 0, "target_passes": 0, "emitted": 0}
    for p in parts:
        for k in total:
            total[k] += p.get(k, 0)
    gamma = next((p["gamma"] for p in parts if "gamma" in p), 0)
    return speculative_usage(total, gamma)


@dataclass
class Choice:
    """One finished choice of a response."""

    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    speculative: dict = field(default_factory=dict)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_response(rid: str, model: str, choices: list[Choice], unique_prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason} for c in choices],
        "usage": usage_dict(unique_prompt_tokens, sum(c.completion_tokens for c in choices),
                            merge_speculative([c.speculative for c in choices])),
    }


def chat_response(rid: str, model: str, choices: list[Choice], prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage_dict(prompt_tokens, sum(c.completion_tokens for c in choices),
                            merge_speculative([c.speculative for c in choices])),
    }


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, obj: str, model: str, created: int, usage: dict) -> dict:
    """The last chunk of a stream when `stream_options.include_usage` is set: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends the stream)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def models_response(model: str, owned_by: str = "fastdraft") -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": int(time.time()), "owned_by": owned_by}]}
