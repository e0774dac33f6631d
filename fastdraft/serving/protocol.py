"""The OpenAI-compatible wire format of fastdraft's server: requests, responses, errors, streaming.

Pure code (pydantic + a tokenizer), no Ray: `fastdraft/serving/app.py` wires it into Ray Serve. What the
server speaks:

    POST /v1/completions          prompt: str | [str] | [int] | [[int]]      (stream: true -> SSE)
    POST /v1/chat/completions     messages: [{role, content}]; the chat template is applied server-side
    GET  /v1/models               the one served model
    GET  /health                  200 once both models are loaded
    GET  /metrics                 Prometheus text

Requests accept every field of OpenAI's completions and chat-completions schemas, and vLLM's sampling extensions:
- honoured exactly: temperature, top_p, n, stop, seed, max_tokens / max_completion_tokens, stream, stream_options
  (include_usage; vLLM's continuous_usage_stats: usage so far on every chunk), presence_penalty, frequency_penalty,
  logit_bias, response_format {"type": "text"}, echo (completions, with logprobs too: the prompt's are scored by the
  target's prefill), logprobs (completions: an int; chat: logprobs + top_logprobs), and vLLM's prompt_logprobs,
  top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
  include_stop_str_in_output, skip_special_tokens, allowed_token_ids, truncate_prompt_tokens, add_special_tokens,
  add_generation_prompt, continue_final_message, chat_template_kwargs. Penalties, bias and masks apply to the draft's
  and the target's logits alike before acceptance (`fastdraft.speculative.sampling.process_logits`), so the output is
  exactly the processed target's (greedy: its argmax; sampling: its distribution).
- logprobs are the TARGET's: the log-softmax of its processed logits (penalties, bias, masks; before temperature,
  top-k, top-p) at each emitted token, from the verification pass that scored it, whether the draft proposed the
  token (accepted) or the target chose it (correction / bonus).
- metadata-only fields (user, metadata, store, service_tier, prompt_cache_key / _retention / _options, content parts'
  prompt_cache_breakpoint, safety_identifier, request_id, parallel_tool_calls, stream_options.include_obfuscation)
  are accepted and change nothing.
- a value that cannot be honoured (tools, n above serve.max_n, response_format json_object / json_schema, audio,
  best_of above n, guided decoding, beam search, ...) is a 400 whose message and `param` name the field.
- a field neither schema knows is ignored and reported (`ignored_fields`): the server logs it and answers with the
  header `x-fastdraft-ignored-fields: a,b`, as vLLM does. Wrong types of known fields are 400s naming the field.

fastdraft's own extensions: `gamma` (draft tokens per step, 0..max_gamma), `speculative` (bool) and `timeout`
(seconds, at most serve.request_timeout_s) in requests; `usage.speculative` (drafted, accepted, target_passes,
acceptance_rate, tau, gamma) in responses (the metric names of `fastdraft.evaluation.metrics`). The field names of
OpenAI's own errors: {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20
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
    # strict: "10" is not an int and 1.0 is not an int (OpenAI rejects both). Fields outside both OpenAI's schema and
    # the extensions below are kept aside (extra="allow"), ignored, and reported (`ignored_fields`), as vLLM does.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """OpenAI's: random padding against side channels; there is none to add on a direct connection (accepted, no-op)."""
    continuous_usage_stats: bool = False
    """vLLM's: usage (so far) on every chunk."""


class _SamplingFields(_Strict):
    """Fields shared by both endpoints: OpenAI's, then vLLM's sampling extensions, then fastdraft's."""

    model: str | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int | None = 1
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    """{"type": "text"} only (vLLM accepts it on completions too); json_object / json_schema need constrained decoding."""
    # vLLM's sampling extensions
    top_k: int | None = 0
    """0 or -1 = off."""
    min_p: float | None = 0.0
    repetition_penalty: float | None = 1.0
    length_penalty: float | None = 1.0
    use_beam_search: bool | None = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    add_special_tokens: bool | None = None
    priority: int | None = 0
    request_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    logits_processors: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None
    @model_validator(mode="after")
    def _null_means_default(self):
        # Clients send `"temperature": null` for "not given": a null where the default is not null takes the default
        # (but `"max_tokens": null` keeps its meaning: as many as the context and serve.max_tokens_cap allow).
        for name, f in type(self).model_fields.items():
            if getattr(self, name) is None and f.default is not None and name != "max_tokens":
                object.__setattr__(self, name, f.default)
        return self

    # fastdraft's extensions
    gamma: int | None = None
    """Draft tokens per step for this request (0 = the target alone), at most the deployment's max_gamma."""
    speculative: bool | None = None
    """False runs this request on the target alone."""
    timeout: float | None = None
    """Seconds this request may take, at most the deployment's serve.request_timeout_s; past it: 504."""


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None


class ChatContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None
    prompt_cache_breakpoint: Any = None
    """A caching hint: there is no prompt cache to break (accepted, no-op)."""


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    audio: Any = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text or p.refusal or "" for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    audio: Any = None
    function_call: Any = None
    functions: list[Any] | None = None
    metadata: dict[str, Any] | None = None
    modalities: list[str] | None = None
    parallel_tool_calls: bool | None = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: Any = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    # vLLM's chat extensions
    echo: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[Any] | None = None
    mm_processor_kwargs: Any = None


def ignored_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """The fields neither OpenAI's schema nor the extensions know, at any depth: `a`, `messages[0].b`, ..."""
    out = [f"{prefix}{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += ignored_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, BaseModel):
                    out += ignored_fields(v, f"{prefix}{name}[{i}].")
    return out


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
    vocab_size: int = 1 << 30
    request_timeout_s: float = 600.0


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param, code=code)


def _unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"'{param}' is not supported: {why}", param=param, code="unsupported_field")


def check_sampling(req: _SamplingFields, limits: Limits) -> None:
    """Range checks shared by both endpoints, and a 400 naming any field whose value cannot be honoured exactly."""
    if req.model is not None and req.model != limits.model_name:
        raise APIError(404, f"model '{req.model}' does not exist; this server serves '{limits.model_name}'",
                       param="model", code="model_not_found")
    if req.temperature < 0 or req.temperature > 2:
        raise APIError(400, f"'temperature' must be between 0 and 2, got {req.temperature}", param="temperature")
    if not 0 < req.top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {req.top_p}", param="top_p")
    if req.top_k < -1:
        raise APIError(400, f"'top_k' must be -1 or 0 (off) or a positive count, got {req.top_k}", param="top_k")
    if not 0 <= req.min_p <= 1:
        raise _bad("min_p", f"must be in [0, 1], got {req.min_p}")
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
    if req.timeout is not None and not 0 < req.timeout <= limits.request_timeout_s:
        raise _bad("timeout", f"must be in (0, {limits.request_timeout_s}] seconds (serve.request_timeout_s), got {req.timeout}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(req, name) <= 2:
            raise _bad(name, f"must be between -2 and 2, got {getattr(req, name)}")
    if not 0 < req.repetition_penalty <= 2:
        raise _bad("repetition_penalty", f"must be in (0, 2], got {req.repetition_penalty}")
    for key, value in (req.logit_bias or {}).items():
        if not re.fullmatch(r"\d+", key) or int(key) >= limits.vocab_size:
            raise _bad("logit_bias", f"keys are token ids in 0..{limits.vocab_size - 1}, got '{key}'")
        if not -100 <= value <= 100:
            raise _bad("logit_bias", f"biases must be between -100 and 100, got {value} for token {key}")
    for name in ("stop_token_ids", "allowed_token_ids"):
        ids = getattr(req, name)
        bad = next((t for t in ids or () if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise _bad(name, f"token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1})")
    if req.allowed_token_ids is not None and not req.allowed_token_ids:
        raise _bad("allowed_token_ids", "must not be empty")
    if req.min_tokens < 0:
        raise _bad("min_tokens", f"must be >= 0, got {req.min_tokens}")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1:
        raise _bad("truncate_prompt_tokens", f"must be >= 1, got {req.truncate_prompt_tokens}")
    if req.seed is not None and not -(1 << 63) <= req.seed < (1 << 64):
        raise _bad("seed", "must fit in 64 bits")
    _check_unsupported(req)


def _check_unsupported(req: _SamplingFields) -> None:
    """Known fields with a value this server cannot honour exactly: a 400 naming them (never silently ignored)."""
    fmt = req.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise _unsupported("response_format", f"type '{fmt.get('type')}' needs constrained decoding; only 'text' is served")
    if req.use_beam_search:
        raise _unsupported("use_beam_search", "speculative decoding samples or decodes greedily, without beams")
    if req.length_penalty != 1.0:
        raise _unsupported("length_penalty", "it applies to beam search only")
    if req.spaces_between_special_tokens is False:
        raise _unsupported("spaces_between_special_tokens", "fast tokenizers decode special tokens one way only")
    if req.bad_words:
        raise _unsupported("bad_words", "multi-token bans are not implemented")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
        raise _bad("prompt_logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {req.prompt_logprobs}")
    if req.priority:
        raise _unsupported("priority", "requests are served in arrival order")
    if req.return_tokens_as_token_ids:
        raise _unsupported("return_tokens_as_token_ids", "logprobs name tokens by their text")
    for name in ("logits_processors", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "guided_decoding_backend", "guided_whitespace_pattern", "structured_outputs"):
        if getattr(req, name) is not None:
            raise _unsupported(name, "constrained decoding and custom logits processors are not served")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise _unsupported("suffix", "the models have no fill-in-the-middle mode")
        if req.best_of not in (None, req.n):
            raise _unsupported("best_of", "choices are not ranked; give best_of equal to n, or leave it out")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise _bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}")
        return
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise _bad("top_logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}")
        if not req.logprobs:
            raise _bad("top_logprobs", "needs 'logprobs': true")
    if req.tools:
        raise _unsupported("tools", "tool calling is not served")
    if req.functions:
        raise _unsupported("functions", "function calling is not served")
    if req.tool_choice not in (None, "none", "auto") or (req.tool_choice == "auto" and req.tools):
        raise _unsupported("tool_choice", "tool calling is not served")
    if req.function_call not in (None, "none", "auto"):
        raise _unsupported("function_call", "function calling is not served")
    if req.audio is not None or (req.modalities is not None and req.modalities != ["text"]):
        raise _unsupported("audio" if req.audio is not None else "modalities", "the models produce text only")
    for name, why in (("prediction", "predicted outputs are not served"),
                      ("web_search_options", "there is no web search"),
                      ("reasoning_effort", "the models are not reasoning models"),
                      ("moderation", "there is no moderation model"),
                      ("verbosity", "output length is set by max_tokens only"),
                      ("chat_template", "only the model's own chat template is applied"),
                      ("documents", "the chat template gets messages only"),
                      ("mm_processor_kwargs", "the models read text only")):
        if getattr(req, name) is not None:
            raise _unsupported(name, why)
    if req.echo:
        raise _unsupported("echo", "chat completions do not echo the last message")
    if req.continue_final_message and req.add_generation_prompt:
        raise _bad("continue_final_message", "set 'add_generation_prompt' to false with it")
    for i, m in enumerate(req.messages):
        if m.content is None and m.role != "assistant":
            raise APIError(400, f"'messages[{i}].content' is a required field", param=f"messages[{i}].content",
                           code="missing_field")
        if m.role == "function":
            raise _unsupported(f"messages[{i}].role", "function messages need function calling")
        if m.tool_calls:
            raise _unsupported(f"messages[{i}].tool_calls", "tool calling is not served")
        if m.function_call is not None:
            raise _unsupported(f"messages[{i}].function_call", "function calling is not served")
        if m.audio is not None:
            raise _unsupported(f"messages[{i}].audio", "the models read text only")
        for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
            if part.type not in ("text", "refusal"):
                raise _unsupported(f"messages[{i}].content[{j}].type", f"'{part.type}' parts: the models read text only")
            if (part.text if part.type == "text" else part.refusal) is None:
                raise _bad(f"messages[{i}].content[{j}]", f"a '{part.type}' part needs its '{part.type}' string")


def prompt_logprobs_count(req: _SamplingFields) -> int | None:
    """How many alternatives per prompt token the prefill must report (None: no prompt scoring): vLLM's
    `prompt_logprobs`, or the completions API's `echo` with `logprobs` (the larger count serves both)."""
    asked = [k for k in (req.prompt_logprobs,
                         req.logprobs if isinstance(req, CompletionRequest) and req.echo else None) if k is not None]
    return max(asked) if asked else None


def logprobs_count(req: _SamplingFields) -> int | None:
    """How many alternatives per token the request wants (None: no logprobs at all)."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    return (req.top_logprobs or 0) if req.logprobs else None


def engine_options(req: _SamplingFields) -> dict:
    """The request's settings as `SamplingParams` keywords (stops, lengths and seeds are the caller's)."""
    return {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": max(req.top_k, 0), "min_p": req.min_p,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logit_bias": tuple(sorted((int(k), float(v)) for k, v in (req.logit_bias or {}).items())),
        "allowed_token_ids": tuple(sorted(set(req.allowed_token_ids))) if req.allowed_token_ids is not None else None,
        "logprobs": logprobs_count(req), "prompt_logprobs": prompt_logprobs_count(req),
    }


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
    return prompts


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """The conversation as plain dicts for `apply_chat_template` (content parts joined)."""
    if not req.messages:
        raise APIError(400, "'messages' must contain at least one message", param="messages")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_completion_tokens")
    out = []
    for m in req.messages:
        msg = {"role": m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


# --------------------------------------------------------------------------------------------
# Incremental detokenization with stop sequences
# --------------------------------------------------------------------------------------------
class TextStream:
    """Turns a growing list of token ids into text deltas, honouring stop sequences.

    Text is decoded from all ids each time (correct across multi-byte characters split between tokens);
    trailing U+FFFD (an incomplete character) and any tail that could begin a stop sequence are held
    back until the next tokens tell. After a stop sequence is seen the text ends before it.
    """

    def __init__(self, tokenizer, stop: list[str], include_stop: bool = False, skip_special_tokens: bool = True,
                 stop_ids: tuple[int, ...] = (), min_tokens: int = 0):
        """`include_stop`: the stop sequence (or the text of the stop token in `stop_ids` that ended the generation)
        stays in the text, as vLLM's include_stop_str_in_output. `min_tokens`: as in vLLM, stop sequences are not
        looked for until that many tokens are out, and then only in text that ends after them."""
        self.tokenizer, self.stop = tokenizer, stop
        self.include_stop, self.skip_special = include_stop, skip_special_tokens
        self.hidden = set() if include_stop else set(stop_ids)  # only ever the last token: it ended the generation
        self.ids: list[int] = []
        self.text = ""         # everything emitted so far
        self.stopped = False   # a stop sequence ended the text
        self.min_tokens, self.search_from = min_tokens, 0

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the new text that is safe to emit ('' when stopped)."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        full = self._decode()
        if len(self.ids) <= self.min_tokens:  # too early for stop sequences: nothing to hold back for them either
            self.search_from = len(full.rstrip("\ufffd"))
            return self._emit(full[:self.search_from])
        found = [(i, len(s)) for i, s in ((full.find(s, max(0, self.search_from - len(s) + 1)), s) for s in self.stop)
                 if i >= 0]
        if found:
            cut, length = min(found)
            self.stopped = True
            return self._emit(full[:cut + length] if self.include_stop else full[:cut])
        # A trailing run of U+FFFD may be a character whose remaining bytes are still to come.
        end = len(full.rstrip("\ufffd"))
        end -= self._held(full[:end])
        return self._emit(full[:end])

    def finish(self) -> str:
        """The text held back, once generation has ended without a stop sequence."""
        if self.stopped:
            return ""
        return self._emit(self._decode())

    def _decode(self) -> str:
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.hidden else self.ids
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

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
    # copied proposals (`serve.lookup`) are counted apart: acceptance_rate stays the draft's
    looked_up, looked_up_accepted = stats.get("looked_up", 0), stats.get("looked_up_accepted", 0)
    return {"gamma": gamma, "drafted": drafted, "accepted": accepted, "target_passes": passes, "emitted": emitted,
            "acceptance_rate": accepted / drafted if drafted else 0.0, "tau": emitted / passes if passes else 0.0,
            "looked_up": looked_up, "looked_up_accepted": looked_up_accepted}


def usage_dict(prompt_tokens: int, completion_tokens: int, spec: dict | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if spec is not None:
        out["speculative"] = spec
    return out


def merge_speculative(parts: list[dict]) -> dict:
    """Sum per-choice speculative usage into the request's (rates recomputed from the sums)."""
    total = {"drafted": 0, "accepted": 0, "target_passes": 0, "emitted": 0, "looked_up": 0, "looked_up_accepted": 0}
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
    logprobs: dict | None = None
    prompt_logprobs: list | None = None
    """vLLM's, when asked for."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _finite(x: float) -> float:
    return x if x > -1e30 else -9999.0  # a masked token's -inf is not JSON: OpenAI's floor is -9999


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, ids: list[int], entries: list, offset: int = 0) -> dict:
    """The completions API's `logprobs` object for `ids`, from the engine's (logprob, [(id, logprob)...]) entries.

    `offset`: where the first token's text starts in the choice's text (the echoed prompt's length).
    """
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [_finite(e[0]) for e in entries],
            "top_logprobs": [{token_text(tokenizer, i): _finite(lp) for i, lp in e[1]} for e in entries],
            "text_offset": offsets}


def echo_logprobs(tokenizer, prompt_ids: list[int], prompt_entries: list, k: int, ids: list[int], entries: list) -> dict:
    """The completions API's `logprobs` with `echo`: the prompt's tokens first (the first one without a logprob, as
    OpenAI gives it), then the completion's, offsets counted from the start of the echoed text."""
    head = completion_logprobs(tokenizer, prompt_ids[1:], [[e[0], e[2][:k]] for e in prompt_entries],
                               len(token_text(tokenizer, prompt_ids[0])))
    first = token_text(tokenizer, prompt_ids[0])
    tail = completion_logprobs(tokenizer, ids, entries, len(first) + sum(len(t) for t in head["tokens"]))
    return {"tokens": [first] + head["tokens"] + tail["tokens"],
            "token_logprobs": [None] + head["token_logprobs"] + tail["token_logprobs"],
            "top_logprobs": [None] + head["top_logprobs"] + tail["top_logprobs"],
            "text_offset": [0] + head["text_offset"] + tail["text_offset"]}


def vllm_prompt_logprobs(tokenizer, prompt_ids: list[int], prompt_entries: list, k: int) -> list:
    """vLLM's `prompt_logprobs` of a choice: None for the first token, then {id: {logprob, rank, decoded_token}} with
    the prompt's own token and the k most likely ones."""
    out: list = [None]
    for token, (lp, rank, top) in zip(prompt_ids[1:], prompt_entries):
        entry = {str(i): {"logprob": _finite(v), "rank": n + 1, "decoded_token": token_text(tokenizer, i)}
                 for n, (i, v) in enumerate(top[:k])}
        entry[str(token)] = {"logprob": _finite(lp), "rank": rank, "decoded_token": token_text(tokenizer, token)}
        out.append(entry)
    return out


def chat_logprobs(tokenizer, ids: list[int], entries: list) -> dict:
    """The chat API's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    def item(token_id: int, lp: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, e[0]), "top_logprobs": [item(i, lp) for i, lp in e[1]]} for t, e in zip(ids, entries)],
            "refusal": None}


def completion_response(rid: str, model: str, choices: list[Choice], unique_prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                     **({"prompt_logprobs": c.prompt_logprobs} if c.prompt_logprobs is not None else {})}
                    for c in choices],
        "usage": usage_dict(unique_prompt_tokens, sum(c.completion_tokens for c in choices),
                            merge_speculative([c.speculative for c in choices])),
    }


def chat_response(rid: str, model: str, choices: list[Choice], prompt_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": c.logprobs,
                     "finish_reason": c.finish_reason,
                     **({"prompt_logprobs": c.prompt_logprobs} if c.prompt_logprobs is not None else {})}
                    for c in choices],
        "usage": usage_dict(prompt_tokens, sum(c.completion_tokens for c in choices),
                            merge_speculative([c.speculative for c in choices])),
    }


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None, usage: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if usage is not None:
        out["usage"] = usage
    return out


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None, usage: dict | None = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if usage is not None:
        out["usage"] = usage
    return out


def usage_chunk(rid: str, obj: str, model: str, created: int, usage: dict) -> dict:
    """The last chunk of a stream when `stream_options.include_usage` is set: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends the stream)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def models_response(model: str, owned_by: str = "fastdraft", tokenizer_fingerprint: str | None = None,
                    max_model_len: int | None = None) -> dict:
    """GET /v1/models. `tokenizer_fingerprint` (`fastdraft.tokenizer.tokenizer_fingerprint` of the target) lets a
    client check that its own tokenizer matches the server's before it sends token ids."""
    entry = {"id": model, "object": "model", "created": int(time.time()), "owned_by": owned_by}
    if tokenizer_fingerprint is not None:
        entry["tokenizer_fingerprint"] = tokenizer_fingerprint
    if max_model_len is not None:
        entry["max_model_len"] = max_model_len
    return {"object": "list", "data": [entry]}
