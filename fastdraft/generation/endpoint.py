"""`generate.engine: openai`: the target's answers from any OpenAI-compatible HTTP endpoint.

    backend = OpenAIBackend(target_dir, OpenAIEndpointConfig(base_url="http://host:8000/v1", model="m"), store_topk=8)
    outs = backend.generate([(prompt_ids, SamplingParams(temperature=0.6, max_new_tokens=128, seed=7))])

It is a `GenerationBackend` like the local engines, so it runs inside the same Ray Data actors and the stage keeps
its row keys, seeds, Parquet parts, manifest and exactly-once resume unchanged.

- Transport: httpx (already a core dependency; the `openai` SDK is dev-only). It gives full control of what is
  retried (408/409/429/5xx, timeouts, refused or dropped connections; never other 4xx), of Retry-After, of a
  per-actor concurrency cap and request rate, and vLLM's extra fields are plain JSON. Ray Data LLM's
  `HttpRequestProcessorConfig` (Ray 2.60) was checked: it retries only 408/429/502/503/504 (not 500), ignores
  Retry-After, has no concurrency cap apart from an integer qps, awaits responses in order, and would be a second
  pipeline beside the actor pool (its own rows, no tokenizer contract), so it is not used.
- Prompts: fastdraft renders the chat template and tokenizes locally (`prompts.py`), then sends the exact token
  ids as the completion prompt (`/v1/completions`, `prompt: [ids]`) when the server takes them; otherwise the text
  (decoded from those ids, special tokens kept, `add_special_tokens: false`), which the server re-tokenizes.
  Each row records which (`prompt_mode`), and `origin` names the endpoint.
- Responses: token ids come from vLLM's `return_token_ids`, else from log-prob tokens (`return_tokens_as_token_ids`
  gives "token_id:N"), else token strings mapped back through the target's vocabulary (refused when ambiguous),
  else the text re-tokenized (`response_mode: text_retokenized`, never for top-k rows).
- Top-k: `logprobs: k` on /v1/completions: each position's `top_logprobs` become `topk_ids`/`topk_logprobs`, the
  same sparse teacher the local `store_topk` writes (vLLM's default log-probs are the model's own, before
  temperature and top-p, as the local engines store them).
- The tokenizer contract (`check_endpoint_tokenizer`, on the driver before anything is written): GET /v1/models'
  `tokenizer_fingerprint` on the model entry when present, else probe strings round-tripped through the endpoint
  (vLLM's /tokenize and /detokenize, else completions' prompt token counts).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fastdraft.config import OpenAIEndpointConfig
from fastdraft.errors import FastdraftError, TokenizerMismatchError
from fastdraft.generation.backends import Generated, Request, stop_token_ids
from fastdraft.speculative.types import SamplingParams

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.TransportError)  # connect/read/write errors, dropped connections
PROBE_STRINGS = (
    "Hello, world! How are you today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  Tabs\tand  spaces,   numbers 1234567890 and symbols {}[]<>#@!",
    "Unicode: na\u00efve caf\u00e9 \u00fcber \u4f60\u597d \U0001F642",
)
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


class EndpointError(FastdraftError):
    """The endpoint refused a request, or kept failing after every retry."""


def origin_label(cfg: OpenAIEndpointConfig) -> str:
    return f"endpoint:{cfg.model}@{cfg.base_url.rstrip('/')}"


def api_key(cfg: OpenAIEndpointConfig) -> str | None:
    """The API key from the environment variable the recipe names (a clear error when it is unset)."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise FastdraftError(f"generate.openai.api_key_env is '{cfg.api_key_env}' but that variable is not set here "
                             f"(on a cluster, pass it in generate.runtime_env.env_vars)")
    return key


def _headers(cfg: OpenAIEndpointConfig) -> dict[str, str]:
    key = api_key(cfg)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _root(base_url: str) -> str:
    """The server's root (vLLM serves /tokenize there, beside /v1)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def backoff_s(cfg: OpenAIEndpointConfig, attempt: int, retry_after: str | None = None) -> float:
    """How long to wait before retry `attempt` (0-based): the server's Retry-After (seconds) when it sends one,
    else exponential with full jitter in [0.5, 1] of min(backoff_max_s, backoff_initial_s * 2**attempt)."""
    if retry_after:
        try:
            return min(cfg.backoff_max_s, max(0.0, float(retry_after)))
        except ValueError:
            pass
    return min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** attempt) * random.uniform(0.5, 1.0)


class RateLimiter:
    """Request starts spaced by 1 / requests_per_s (shared by every request of this backend, across batches)."""

    def __init__(self, per_s: float | None):
        self.interval = 1.0 / per_s if per_s else 0.0
        self.next_at = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        at = max(now, self.next_at)
        self.next_at = at + self.interval  # reserved before sleeping: the event loop is single-threaded
        if at > now:
            await asyncio.sleep(at - now)


@dataclass
class RetryStats:
    requests: int = 0
    retries: int = 0
    by_reason: dict | None = None

    def count(self, reason: str) -> None:
        self.retries += 1
        self.by_reason = self.by_reason or {}
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


async def post_with_retries(client: httpx.AsyncClient, cfg: OpenAIEndpointConfig, url: str, body: dict,
                            limiter: RateLimiter, stats: RetryStats) -> dict:
    """POST `body`, retrying retryable failures with backoff; the JSON answer, or EndpointError."""
    last = ""
    for attempt in range(cfg.max_retries + 1):
        await limiter.wait()
        stats.requests += 1
        try:
            resp = await client.post(url, json=body)
        except RETRYABLE_ERRORS as exc:
            last, retry_after = f"{type(exc).__name__}: {exc}", None
            stats.count(type(exc).__name__)
        else:
            if resp.status_code < 400:
                try:
                    return resp.json()
                except ValueError:  # a truncated body is a dropped connection
                    last, retry_after = f"HTTP {resp.status_code} with a body that is not JSON", None
                    stats.count("bad_json")
            elif resp.status_code in RETRYABLE_STATUS:
                last, retry_after = f"HTTP {resp.status_code}: {resp.text[:300]}", resp.headers.get("retry-after")
                stats.count(str(resp.status_code))
            else:
                hint = ("; a strict server may refuse vLLM's extra request fields: set generate.openai.vllm_extensions: false"
                        if resp.status_code in (400, 422) and cfg.vllm_extensions else "")
                raise EndpointError(f"{url} refused the request with HTTP {resp.status_code}: {resp.text[:500]}{hint}")
        if attempt < cfg.max_retries:
            await asyncio.sleep(backoff_s(cfg, attempt, retry_after))
    raise EndpointError(f"{url}: no answer after {cfg.max_retries + 1} attempts (last: {last}); rows written so far "
                        f"are kept, rerun to resume once the endpoint is back")


def _sync_request(cfg: OpenAIEndpointConfig, method: str, url: str, body: dict | None = None) -> httpx.Response:
    """One driver-side request with the same retries (the tokenizer check and the prompt probe)."""
    last = ""
    for attempt in range(cfg.max_retries + 1):
        try:
            resp = httpx.request(method, url, json=body, headers=_headers(cfg), timeout=cfg.timeout_s)
            if resp.status_code not in RETRYABLE_STATUS:
                return resp
            last, retry_after = f"HTTP {resp.status_code}", resp.headers.get("retry-after")
        except RETRYABLE_ERRORS as exc:
            last, retry_after = f"{type(exc).__name__}: {exc}", None
        if attempt < cfg.max_retries:
            time.sleep(backoff_s(cfg, attempt, retry_after))
    raise EndpointError(f"{method} {url}: no answer after {cfg.max_retries + 1} attempts (last: {last})")


# --------------------------------------------------------------------------------------------
# The tokenizer contract and the prompt format
# --------------------------------------------------------------------------------------------
def model_entry(cfg: OpenAIEndpointConfig) -> dict:
    """The model's entry in GET /v1/models (a clear error naming what the endpoint serves when it is absent)."""
    url = cfg.base_url.rstrip("/") + "/models"
    resp = _sync_request(cfg, "GET", url)
    if resp.status_code >= 400:
        raise EndpointError(f"GET {url}: HTTP {resp.status_code}: {resp.text[:300]}")
    entries = resp.json().get("data", [])
    for entry in entries:
        if entry.get("id") == cfg.model:
            return entry
    raise EndpointError(f"{url} does not serve model {cfg.model!r} (it serves: {', '.join(e.get('id', '?') for e in entries) or 'nothing'})")


def check_endpoint_tokenizer(cfg: OpenAIEndpointConfig, tokenizer, target: str) -> dict:
    """Refuse an endpoint whose tokenizer is not the recipe target's; returns how it was checked (for the manifest).

    Raises:
        TokenizerMismatchError: naming the endpoint and the target, with both fingerprints or the probe that differed.
    """
    from fastdraft.tokenizer import tokenizer_fingerprint

    ours = tokenizer_fingerprint(tokenizer)
    theirs = model_entry(cfg).get("tokenizer_fingerprint")
    where = f"endpoint {cfg.base_url} (model {cfg.model!r})"
    if cfg.tokenizer_check == "fingerprint" and not theirs:
        raise TokenizerMismatchError(f"generate.openai.tokenizer_check is 'fingerprint' but {where} lists no "
                                     f"tokenizer_fingerprint in GET /v1/models; use tokenizer_check: auto or probe")
    if theirs and cfg.tokenizer_check != "probe":
        if theirs != ours:
            raise TokenizerMismatchError(
                f"tokenizer mismatch: {where} has tokenizer fingerprint {theirs} but the recipe's target "
                f"{target} has {ours}; the endpoint serves another tokenizer, its answers cannot train this draft")
        return {"method": "fingerprint", "fingerprint": theirs}
    return {"method": "probe", **_probe_tokenizer(cfg, tokenizer, target, where)}


def _probe_tokenizer(cfg: OpenAIEndpointConfig, tok, target: str, where: str) -> dict:
    """Encode/decode round trips of probe strings through the endpoint, compared with the target's tokenizer."""
    probes = list(PROBE_STRINGS)
    if tok.chat_template:
        probes.append(tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                              add_generation_prompt=True))
    root, checks = _root(cfg.base_url), []

    def refuse(what: str, text: str, theirs: Any, ours: Any) -> None:
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {where} and the recipe's target {target} {what} differently: probe {text!r} -> "
            f"endpoint {theirs!r}, target {ours!r}; the endpoint serves another tokenizer (or template)")

    for text in probes:
        ours = tok(text, add_special_tokens=False)["input_ids"]
        resp = _sync_request(cfg, "POST", f"{root}/tokenize", {"model": cfg.model, "prompt": text, "add_special_tokens": False})
        if resp.status_code < 400 and isinstance(resp.json().get("tokens"), list):
            theirs = [int(t) for t in resp.json()["tokens"]]
            if theirs != ours:
                refuse("encode", text, theirs, ours)
            checks.append("tokenize")
            back = _sync_request(cfg, "POST", f"{root}/detokenize", {"model": cfg.model, "tokens": ours})
            if back.status_code < 400 and "prompt" in back.json():
                if back.json()["prompt"] != tok.decode(ours):
                    refuse("decode", text, back.json()["prompt"], tok.decode(ours))
                checks.append("detokenize")
            continue
        # no /tokenize: the prompt's token count as the server reports it (usage.prompt_tokens)
        body = {"model": cfg.model, "prompt": text, "max_tokens": 1, "temperature": 0.0, **cfg.extra_body}
        if cfg.vllm_extensions:
            body.update(add_special_tokens=False, return_token_ids=True)  # vLLM: the exact prompt ids come back
        resp = _sync_request(cfg, "POST", cfg.base_url.rstrip("/") + "/completions", body)
        if resp.status_code >= 400:
            raise EndpointError(f"tokenizer probe: POST {cfg.base_url}/completions: HTTP {resp.status_code}: {resp.text[:300]}")
        data = resp.json()
        prompt_ids = (data.get("choices") or [{}])[0].get("prompt_token_ids")
        if prompt_ids is not None:
            if list(prompt_ids) != ours:
                refuse("encode", text, list(prompt_ids), ours)
            checks.append("prompt_token_ids")
        else:
            count = (data.get("usage") or {}).get("prompt_tokens")
            if count is None:
                raise EndpointError(f"tokenizer probe: {where} reports no usage.prompt_tokens; the tokenizer cannot be "
                                    f"checked (give the endpoint a tokenizer_fingerprint, or /tokenize)")
            if count != len(ours):
                refuse("count the tokens of", text, f"{count} tokens", f"{len(ours)} tokens")
            checks.append("prompt_tokens")
    return {"probes": len(probes), "checks": sorted(set(checks))}


def probe_token_id_prompts(cfg: OpenAIEndpointConfig, tokenizer) -> bool:
    """Whether the server takes a prompt given as token ids (one 1-token request)."""
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    body = {"model": cfg.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, **cfg.extra_body}
    resp = _sync_request(cfg, "POST", cfg.base_url.rstrip("/") + "/completions", body)
    if resp.status_code < 400:
        return True
    if resp.status_code in (400, 422):
        return False
    raise EndpointError(f"probe of token-id prompts: HTTP {resp.status_code}: {resp.text[:300]}")


def resolve_prompt_format(cfg: OpenAIEndpointConfig, tokenizer) -> str:
    if cfg.prompt_format != "auto":
        return cfg.prompt_format
    return "token_ids" if probe_token_id_prompts(cfg, tokenizer) else "text"


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------
class OpenAIBackend:
    """Answers requests through an OpenAI-compatible `/v1/completions`, concurrently, with retries."""

    name = "openai"

    def __init__(self, model_dir: str | Path, cfg: OpenAIEndpointConfig | dict, store_topk: int = 0,
                 trust_remote_code: bool = False, prompt_format: str | None = None):
        from transformers import GenerationConfig

        from fastdraft.assets import resolve_model_path
        from fastdraft.tokenizer import load_tokenizer

        self.cfg = cfg if isinstance(cfg, OpenAIEndpointConfig) else OpenAIEndpointConfig(**cfg)
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        try:
            gen_config = GenerationConfig.from_pretrained(str(resolve_model_path(str(model_dir))))
        except OSError:
            gen_config = None
        self.stop_ids = stop_token_ids(gen_config, self.tokenizer)
        self.store_topk = store_topk
        self.prompt_format = prompt_format or resolve_prompt_format(self.cfg, self.tokenizer)
        self.origin = origin_label(self.cfg)
        self.url = self.cfg.base_url.rstrip("/") + "/completions"
        self.limiter = RateLimiter(self.cfg.requests_per_s)
        self.stats = RetryStats()
        self._vocab = self.tokenizer.get_vocab()
        self._pieces: dict[str, int] | None = None
        api_key(self.cfg)  # a missing key fails here, not on the first request

    # ---- requests ----
    def body(self, ids: list[int], p: SamplingParams) -> dict:
        stops = list(dict.fromkeys([*self.stop_ids, *p.stop_token_ids]))
        body: dict[str, Any] = {
            "model": self.cfg.model, "max_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
            "n": 1, "stream": False,
        }
        if p.seed is not None:
            body["seed"] = int(p.seed)
        if self.prompt_format == "token_ids":
            body["prompt"] = list(ids)
        else:  # the exact text of the ids (special tokens kept), re-tokenized by the server
            body["prompt"] = self.tokenizer.decode(ids, skip_special_tokens=False)
        if self.store_topk:
            body["logprobs"] = self.store_topk
        if self.cfg.vllm_extensions:
            body.update(return_token_ids=True, return_tokens_as_token_ids=True, stop_token_ids=stops,
                        skip_special_tokens=True, include_stop_str_in_output=False)
            if self.prompt_format == "text":
                body["add_special_tokens"] = False
            if p.top_k > 0:
                body["top_k"] = p.top_k
        elif p.top_k > 0:
            raise EndpointError("top_k sampling needs generate.openai.vllm_extensions (OpenAI's API has no top_k)")
        body.update(self.cfg.extra_body)
        return body

    def generate(self, requests: Sequence[Request]) -> list[Generated]:
        return asyncio.run(self._generate(list(requests)))

    async def _generate(self, requests: list[Request]) -> list[Generated]:
        semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency, max_keepalive_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(headers=_headers(self.cfg), timeout=self.cfg.timeout_s, limits=limits) as client:
            async def one(ids: list[int], p: SamplingParams) -> Generated:
                async with semaphore:
                    data = await post_with_retries(client, self.cfg, self.url, self.body(ids, p), self.limiter, self.stats)
                return self.convert(data, ids, p)

            return list(await asyncio.gather(*(one(ids, p) for ids, p in requests)))

    # ---- responses ----
    def token_id(self, token: str) -> int | None:
        """A log-prob token string as an id: "token_id:N" (vLLM), a vocabulary token, or an unambiguous decoded piece."""
        m = _TOKEN_ID.match(token)
        if m:
            return int(m.group(1))
        if token in self._vocab:
            return self._vocab[token]
        if self._pieces is None:  # decoded text of each id; pieces that several ids decode to are ambiguous (None)
            pieces: dict[str, int | None] = {}
            for i in range(len(self.tokenizer)):
                piece = self.tokenizer.decode([i])
                pieces[piece] = None if piece in pieces else i
            self._pieces = pieces  # type: ignore[assignment]
        return self._pieces.get(token)

    def convert(self, data: dict, prompt_ids: list[int], p: SamplingParams) -> Generated:
        choice = (data.get("choices") or [None])[0]
        if not isinstance(choice, dict):
            raise EndpointError(f"{self.url} answered without choices: {str(data)[:300]}")
        reason = "stop" if choice.get("finish_reason") == "stop" else "length"
        logprobs = choice.get("logprobs") or {}
        response_mode = "token_ids"
        if choice.get("token_ids") is not None:
            token_ids = [int(t) for t in choice["token_ids"]]
        else:
            token_ids = [self.token_id(t) for t in logprobs.get("tokens") or []] if logprobs.get("tokens") is not None else None
            response_mode = "logprob_tokens"
            if token_ids is None or any(t is None for t in token_ids):
                if self.store_topk and token_ids is not None:
                    raise EndpointError(
                        f"{self.url}: log-prob tokens that map to no single id of the target's vocabulary (e.g. "
                        f"{next(t for t, i in zip(logprobs['tokens'], token_ids) if i is None)!r}); store_topk needs "
                        f"token ids: enable vllm_extensions (return_tokens_as_token_ids) on a vLLM server")
                token_ids = self.tokenizer(choice.get("text") or "", add_special_tokens=False)["input_ids"]
                response_mode = "text_retokenized"
        stops = [*self.stop_ids, *p.stop_token_ids]
        if reason == "stop" and (not token_ids or token_ids[-1] not in stops):
            token_ids.append(stops[0])  # the alignment contract: a stopped response ends with its stop token
        gen = Generated(token_ids, reason)
        gen.origin, gen.response_mode = self.origin, response_mode
        gen.prompt_mode = self.prompt_format
        if self.prompt_format == "text":
            seen = choice.get("prompt_token_ids")
            count = (data.get("usage") or {}).get("prompt_tokens")
            if (seen is not None and list(seen) != list(prompt_ids)) or (seen is None and count not in (None, len(prompt_ids))):
                gen.prompt_mode = "text_mismatch"  # the server saw other prompt ids than the row records
        if self.store_topk:
            if response_mode == "text_retokenized":
                raise EndpointError(f"{self.url} returned no log-probs; store_topk needs `logprobs` on /v1/completions")
            # every position gets exactly store_topk entries, padded with id -1 (the losses' padding), as the
            # local engines' [n, k] rows; an appended stop token without a teacher row is all padding
            k, gen.topk_ids, gen.topk_logprobs = self.store_topk, [], []
            positions = list(logprobs.get("top_logprobs") or [])[: len(token_ids)]
            positions += [{}] * (len(token_ids) - len(positions))
            for position in positions:
                pairs = [(self.token_id(t), float(lp)) for t, lp in (position or {}).items()]
                best = sorted(((i, lp) for i, lp in pairs if i is not None), key=lambda kv: kv[1], reverse=True)[:k]
                gen.topk_ids.append([i for i, _ in best] + [-1] * (k - len(best)))
                gen.topk_logprobs.append([lp for _, lp in best] + [0.0] * (k - len(best)))
        return gen
