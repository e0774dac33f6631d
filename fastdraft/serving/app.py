"""Ray Serve application: the target + draft pair behind an OpenAI-compatible HTTP API.

Two deployments:
- `SpeculativePair` holds both models in fastdraft's speculative engine and generates token ids.
  Requests are batched between speculative rounds (`fastdraft.serving.scheduler`): a request joins a running
  batch of requests with the same gamma (up to `serve.max_batch_size` rows; every other setting, sampling, seed,
  max_tokens and stops, is its own), so they share forward passes, and it leaves in the round it finishes. Replicas scale with `serve.num_replicas` (an int, or 'auto' for autoscaling up to
  `serve.max_replicas`).
- `OpenAIIngress` (FastAPI) validates requests, applies the chat template, tokenizes, turns token
  streams into text (stop sequences, SSE), checks the bearer token and records metrics.

Run it:
    fastdraft serve jobs/recipes/demo.yaml [--set serve.gamma=4]          # blocks; Ctrl-C / SIGTERM stops it
    serve run apps/serve_demo.yaml                                          # the Serve config file
    serve run apps.speculative:build_app target=DIR draft=DIR gamma=3      # from a checkout (apps/ re-exports build_app)
    serve run fastdraft.serving.app:build_app target=DIR draft=DIR         # the same, from an installed fastdraft
    serve deploy apps/serve_demo.yaml                                       # to a running cluster

    curl localhost:8000/v1/completions -d '{"prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'

`speculative: false` serves the target alone (no draft is loaded); a request may also ask for
`"speculative": false` or another `"gamma"` (up to `serve.max_gamma`). Responses carry the engine's
counters in `usage.speculative` (`fastdraft.evaluation.metrics`: acceptance_rate = A/D, tau = N/F).
What requests may say, and how each field is honoured: `fastdraft.serving.protocol`.

Isolation, request by request:
- an engine failure fails its own request alone: a failed engine call is retried request by request, each continued
  from what it has streamed, and only a request that fails on its own gets an error (500, or in-band when streaming);
- a client that disconnects cancels its generations: the model replica drops their rows from the batch after the
  current speculative round (`should_stop`), the others go on (counted as status 499 in /metrics);
- a request past its `timeout` (default and cap: serve.request_timeout_s) ends the same way, with a 504;
- a stop sequence ends the engine's work too: the model replica follows each choice's text (the same `TextStream`)
  and drops the row within the round that completes the stop sequence;
- a model replica whose engine thread has work but commits nothing for serve.stall_timeout_s fails `check_health`,
  and Serve replaces it (requests in flight continue on another replica).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime, in the
# replica, where the deployment class arrives pickled by value.
import asyncio
import dataclasses
import hmac
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from fastdraft.plan import check_stage
from fastdraft.serving import protocol as P
from fastdraft.serving.scheduler import continuation
from fastdraft.serving.metrics import ServeMetrics
from fastdraft.config import Recipe, ServeConfig, dump_recipe, load_recipe, recipe_from_dict
from fastdraft.errors import FastdraftError, RecipeError
from fastdraft.speculative.types import SamplingParams

logger = logging.getLogger("ray.serve")
APP_NAME = "fastdraft"
DRAFT_STAGES = ("FT", "CP", "PT")  # the pipeline's drafts, most aligned first
REPLICA_RETRIES = 2  # a choice survives this many model replica deaths


# --------------------------------------------------------------------------------------------
# What to serve: resolved from a recipe (fastdraft serve) or from `serve run ... key=value` args
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSpec:
    target: str
    draft: str | None
    """None: the target alone (serve.speculative is false)."""
    dtype: str
    serve: ServeConfig


def resolve_pair(recipe: Recipe) -> PairSpec:
    """Find the draft, refuse remote code, and check the tokenizer contract before anything starts.

    Raises:
        RecipeError: no draft found, or `target.trust_remote_code` set.
        TokenizerMismatchError: target and draft do not share a tokenizer (with the full report).
    """
    from fastdraft.assets import resolve_model_path
    from fastdraft.layout import RunLayout
    from fastdraft.tokenizer import check_compatible

    cfg = recipe.serve or ServeConfig()
    if recipe.target.trust_remote_code:
        raise RecipeError("serving never runs a model's own code: set target.trust_remote_code to false")
    target = str(resolve_model_path(recipe.target.model))
    draft = None
    if cfg.speculative:
        if cfg.draft:
            draft = str(resolve_model_path(cfg.draft))
        else:
            layout = RunLayout(recipe.run_dir)
            found = [layout.draft(s) for s in DRAFT_STAGES if (layout.draft(s) / "config.json").is_file()]
            if not found:
                looked = ", ".join(str(layout.draft(s)) for s in DRAFT_STAGES)
                raise RecipeError(f"no draft to serve: set serve.draft, train one (fastdraft run), or set "
                                  f"serve.speculative=false (looked in {looked})")
            draft = str(found[0])
        check_compatible(target, draft)
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise RecipeError(f"serve.api_key_env is '{cfg.api_key_env}' but that environment variable is not set")
    return PairSpec(target, draft, recipe.target.dtype, cfg)


def recipe_from_args(args: dict[str, Any]) -> Recipe:
    """`serve run apps.speculative:build_app recipe=R target=T draft=D gamma=3 ...` -> a Recipe.

    `recipe` loads a recipe file; `target` and `dtype` set the target; every other key is a `serve` field.
    """
    args = dict(args)
    path = args.pop("recipe", None)
    data = dump_recipe(load_recipe(path)) if path else {"name": "serve"}
    target = {k: args.pop(k) for k in ("target", "dtype") if k in args}
    if "target" in target:
        data.setdefault("target", {})["model"] = target.pop("target")
    data.setdefault("target", {}).update(target)
    data["serve"] = {**(data.get("serve") or {}), **args}
    return recipe_from_dict(data, source=f"serve args{f' (recipe {path})' if path else ''}")


def pair_options(cfg: ServeConfig) -> dict:
    """Deployment options of the model replicas (a Serve config file's `deployments:` overrides them)."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": 1 if cfg.device == "cuda" else 0},
        # a full batch running plus a full batch waiting: deeper queues only add latency
        "max_ongoing_requests": 2 * cfg.max_batch_size,
        "health_check_period_s": 10,
    }
    if cfg.num_replicas == "auto":
        opts["autoscaling_config"] = {"min_replicas": 1, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.max_batch_size}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def ingress_options(cfg: ServeConfig) -> dict:
    actor: dict[str, Any] = {"num_cpus": 0}
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        # Replicas do not inherit the caller's environment on a running cluster: pass the key on.
        actor["runtime_env"] = {"env_vars": {cfg.api_key_env: os.environ[cfg.api_key_env]}}
    # Streams hold an ingress slot for their whole duration; the model replicas do the queueing.
    return {"ray_actor_options": actor, "max_ongoing_requests": 256}


def build_pair_app(spec: PairSpec) -> serve.Application:
    cfg = spec.serve
    pair = SpeculativePair.options(**pair_options(cfg)).bind(
        spec.target, spec.draft, dtype=spec.dtype, device=cfg.device, gamma=cfg.gamma if spec.draft else 0,
        max_gamma=cfg.max_gamma, dynamic_gamma=cfg.dynamic_gamma, max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s, draft_weights=cfg.draft_weights,
        stall_timeout_s=cfg.stall_timeout_s, prefill_chunk=cfg.prefill_chunk,
        lookup=cfg.lookup.engine_args() if cfg.lookup and spec.draft else None)
    return OpenAIIngress.options(**ingress_options(cfg)).bind(pair, spec.target, cfg, spec.draft is not None)


def build_app(args: dict[str, Any]) -> serve.Application:
    """App builder for `serve run` / `serve deploy` (Serve config `import_path: apps.speculative:build_app`)."""
    return build_pair_app(resolve_pair(recipe_from_args(args)))


# --------------------------------------------------------------------------------------------
# Model replicas: the engine, batched between speculative rounds
# --------------------------------------------------------------------------------------------
@serve.deployment(name="SpeculativePair")
class SpeculativePair:
    """Target + draft in fastdraft's speculative engine; yields token ids as they are accepted.

    Requests are batched at the level of speculative rounds (`fastdraft.serving.scheduler`): each joins a running
    batch between rounds, with its own sampling settings, seed, max_tokens and stops, and leaves it in the round it
    finishes."""

    def __init__(self, target: str, draft: str | None, dtype: str = "float32", device: str = "cpu", gamma: int = 3,
                 max_gamma: int = 8, dynamic_gamma: bool = False, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, draft_weights: str = "auto", stall_timeout_s: float = 60.0,
                 prefill_chunk: int = 128, lookup: dict | None = None):
        from fastdraft.serving.scheduler import Scheduler
        from fastdraft.speculative.engine import SpeculativeEngine
        from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

        tok = self.tokenizer = load_tokenizer(target)
        # from_dirs checks the tokenizer contract again: `serve deploy` may build the app on another machine.
        self.engine = SpeculativeEngine.from_dirs(target, draft, dtype=dtype, device=device, gamma=gamma,
                                                  dynamic_gamma=dynamic_gamma, max_gamma=max_gamma,
                                                  draft_weights=draft_weights, prefill_chunk=prefill_chunk,
                                                  **(lookup or {}))
        self.info_ = {"target": target, "draft": draft, "gamma": gamma, "dynamic_gamma": dynamic_gamma,
                      "prefill_chunk": prefill_chunk, "lookup": lookup,
                      "draft_weights": getattr(self.engine.draft, "weights", "float") if draft else None,
                      "tokenizer_fingerprint": tokenizer_fingerprint(tok), "pid": os.getpid()}
        self.stall_timeout_s = stall_timeout_s
        self.counters = {"cancelled": 0, "timed_out": 0, "failed": 0, "retried_alone": 0, "last_cancelled_tokens": None}
        self.scheduler = Scheduler(self.engine, tok, max_batch_size, batch_wait_timeout_s, self.counters)
        logger.info(f"SpeculativePair ready: target {target}, draft {draft or '(none: target alone)'}, gamma {gamma}")

    def info(self) -> dict:
        return {**self.info_, **self.counters, "busy": self.scheduler.live}

    def check_health(self) -> None:
        if not self.scheduler.thread.is_alive():
            raise RuntimeError("the engine thread has stopped")
        idle = time.monotonic() - self.scheduler.progress
        if self.scheduler.live and idle > self.stall_timeout_s:
            raise RuntimeError(f"the engine thread has work but has made no progress for {idle:.0f} s "
                               f"(serve.stall_timeout_s is {self.stall_timeout_s:g})")

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream one generation: {"token_ids": [...]} events, the last with finish_reason, stats and queue_s.

        An event {"error": message} ends a generation that failed in the engine (this request alone). A caller that
        goes away (cancellation: a client disconnect) or a passed `deadline` takes the request's row out of the
        engine's batch after the current speculative round; the others go on.

        Args:
            request: {"prompt_ids": list[int], "params": SamplingParams, "gamma": int, "prior_output": int (optional),
                "deadline": time.time() after which the generation ends with finish_reason "timeout" (optional),
                "text": `protocol.TextStream` keywords (optional): the replica follows the text too, and a stop
                sequence ends the generation with finish_reason "stop" within the round that completes it}.
        """
        import threading

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = {**request, "arrived": time.perf_counter(), "cancel": threading.Event(),
                   "post": lambda *e: loop.call_soon_threadsafe(events.put_nowait, e)}
        self.scheduler.submit(request)
        streamed, done = 0, False
        try:
            while not done:
                kind, payload = await events.get()
                if kind == "prompt":  # the prefill's prompt logprobs, ahead of any token
                    yield {"token_ids": [], "prompt_logprobs": payload}
                elif kind == "tokens":
                    ids, lps = payload
                    streamed += len(ids)
                    yield {"token_ids": ids} if lps is None else {"token_ids": ids, "logprobs": lps}
                elif kind == "error":  # this request alone failed in the engine
                    done = True
                    yield {"error": payload}
                else:  # done: the result; send ids the engine did not stream (if any) with it
                    result, gamma, rows, queue_s = payload
                    rest = [int(t) for t in result.token_ids[streamed:]]
                    event = {"token_ids": rest, "finish_reason": result.finish_reason, "stats": result.stats.to_dict(),
                             "gamma": gamma, "queue_s": queue_s, "batch_rows": rows}
                    if result.logprobs is not None and rest:
                        event["logprobs"] = [[lp, top] for lp, top in zip(result.logprobs[streamed:], result.top_logprobs[streamed:])]
                    done = True
                    yield event
        finally:
            if not done:
                request["cancel"].set()


# --------------------------------------------------------------------------------------------
# HTTP ingress: OpenAI protocol, auth, text, streaming, metrics
# --------------------------------------------------------------------------------------------
# Deployment classes are pickled when decorated: every helper they use is defined above them.
app = FastAPI(title="fastdraft", description="Speculative decoding with a FastDraft draft, OpenAI-compatible.")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds `limit` (never read whole into memory first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise P.APIError(413, f"request body is {int(declared):,} bytes; the limit is {limit:,}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise P.APIError(413, f"request body exceeds the limit of {limit:,} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _eos_ids(tokenizer, model_config) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(model_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    return ids


class EngineFailure(Exception):
    """The engine failed on this request (the others of its batch went on); answered with a 500."""


class RequestTimeout(Exception):
    """The request ran past its `timeout` / serve.request_timeout_s; answered with a 504."""


@dataclass
class _Job:
    """One choice of a request: what to generate and, once done, what happened."""

    index: int
    request: dict
    text: P.TextStream
    finish_reason: str | None = None
    completion_tokens: int = 0
    speculative: dict = field(default_factory=dict)
    queue_s: float | None = None
    batch_rows: int | None = None
    """How many sequences shared the engine call (and its forward passes) with this one."""
    logprobs: list = field(default_factory=list)
    """With logprobs asked for: one [logprob, [[id, logprob], ...]] per token in `text.ids`."""
    echo: str = ""
    """The prompt's text, when the completion echoes it."""
    prompt_entries: list | None = None
    """With prompt scoring asked for: per prompt token after the first, [logprob, rank, [[id, logprob], ...]]."""


@dataclass
class _Plan:
    """A validated request, ready to run."""

    endpoint: str
    rid: str
    stream: bool
    include_usage: bool
    jobs: list[_Job]
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))
    continuous_usage: bool = False
    logprobs: int | None = None
    ignored: list[str] = field(default_factory=list)
    deadline: float = float("inf")
    """time.time() by which the request must be answered."""
    echo_logprobs: bool = False
    """Completions with echo and logprobs: the logprobs object starts with the prompt's tokens."""
    prompt_logprobs: int | None = None
    """vLLM's prompt_logprobs count: each choice carries `prompt_logprobs`."""


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, pair: DeploymentHandle, target: str, cfg: ServeConfig, speculative: bool):
        from fastdraft.checkpoint import load_config
        from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

        self.pair, self.cfg = pair, cfg
        self.tokenizer = load_tokenizer(target)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        tcfg = load_config(target)
        self.limits = P.Limits(
            model_name=cfg.model_name, max_tokens_cap=cfg.max_tokens_cap, max_n=cfg.max_n, max_gamma=cfg.max_gamma,
            context_length=int(getattr(tcfg, "max_position_embeddings", 2048)), speculative=speculative,
            max_prompts=cfg.max_batch_size, vocab_size=min(len(self.tokenizer), int(getattr(tcfg, "vocab_size", 1 << 30))),
            request_timeout_s=cfg.request_timeout_s)
        self.stop_ids = tuple(sorted(_eos_ids(self.tokenizer, tcfg)))
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:
                raise FastdraftError(f"serve.api_key_env is '{cfg.api_key_env}' but it is not set in the replica's "
                                     f"environment (set it there, or in runtime_env.env_vars of the Serve config)")
        else:
            logger.warning("no API key configured (serve.api_key_env is unset): anyone who can reach this port can use it")
        self.metrics = ServeMetrics()

    # ---- routes ----
    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except P.APIError as exc:
            return JSONResponse(exc.to_dict(), status_code=exc.status)
        return JSONResponse(P.models_response(self.limits.model_name, tokenizer_fingerprint=self.fingerprint,
                                              max_model_len=self.limits.context_length))

    @app.get("/health")
    async def health(self) -> Response:
        try:
            info = await asyncio.wait_for(self.pair.info.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the models is "unhealthy"
            return JSONResponse({"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:300]}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.limits.model_name, "speculative": self.limits.speculative,
                             "gamma": info["gamma"], "draft": info["draft"],
                             "engine": {k: info.get(k) for k in ("busy", "cancelled", "timed_out", "failed", "retried_alone",
                                                                 "last_cancelled_tokens")}})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- request handling ----
    async def _serve(self, request: Request, endpoint: str) -> Response:
        start = time.perf_counter()
        try:
            self._authorize(request)
            body = await _read_body(request, self.limits.max_body_bytes)
            plan = self._plan(endpoint, body)
        except P.APIError as exc:
            self.metrics.record_request(endpoint, exc.status, time.perf_counter() - start)
            return JSONResponse(exc.to_dict(), status_code=exc.status)
        headers = {}
        if plan.ignored:
            # vLLM's behaviour: fields neither schema knows are ignored, logged, and named back to the client.
            logger.warning(f"request {plan.rid}: ignored unknown field(s): {', '.join(plan.ignored)}")
            self.metrics.ignored.record(1)
            headers["x-fastdraft-ignored-fields"] = ",".join(plan.ignored)[:4000]
        if plan.stream:
            return StreamingResponse(self._stream(plan, start), media_type="text/event-stream", headers=headers)
        try:
            response = await self._complete(plan, start)
        except asyncio.CancelledError:  # the client went away: its generations were cancelled with this task
            self.metrics.record_request(endpoint, 499, time.perf_counter() - start)
            raise
        response.headers.update(headers)
        return response

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise P.APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                             code="invalid_api_key")

    def _plan(self, endpoint: str, body: bytes) -> _Plan:
        if endpoint == "completions":
            req = P.parse_request(body, P.CompletionRequest, self.limits.max_body_bytes)
            P.check_sampling(req, self.limits)
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            raw = P.completion_prompts(req, self.limits)
            prompts = [self._truncate(self._encode_prompt(p, add_special), req.truncate_prompt_tokens) for p in raw]
            echoes = [(p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=req.skip_special_tokens))
                      if req.echo else "" for p in raw]
            max_param, max_value = "max_tokens", req.max_tokens
        else:
            req = P.parse_request(body, P.ChatCompletionRequest, self.limits.max_body_bytes)
            P.check_sampling(req, self.limits)
            prompts = [self._truncate(self._encode_chat(P.chat_messages(req), req), req.truncate_prompt_tokens)]
            echoes = [""]
            max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            max_value = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_new = P.check_max_tokens(max_value, max_param, max(len(p) for p in prompts), self.limits)
        if req.min_tokens > max_new:
            raise P.APIError(400, f"'min_tokens' ({req.min_tokens}) exceeds '{max_param}' ({max_new})", param="min_tokens")
        if not self.limits.speculative or req.speculative is False:
            gamma = 0
        else:
            gamma = req.gamma if req.gamma is not None else self.cfg.gamma
        stops = P.stop_list(req.stop)
        stop_ids = tuple(sorted(set(() if req.ignore_eos else self.stop_ids) | set(req.stop_token_ids or ())))
        options = P.engine_options(req)
        timeout = req.timeout if req.timeout is not None else self.limits.request_timeout_s
        deadline = time.time() + timeout
        jobs = []
        for pi, ids in enumerate(prompts):
            for k in range(req.n):
                # n samples with one seed would repeat each other: each choice gets its own seed.
                params = SamplingParams(max_new_tokens=max_new, stop_token_ids=stop_ids, min_new_tokens=req.min_tokens,
                                        seed=None if req.seed is None else (req.seed + pi * req.n + k) % (1 << 63),
                                        **options)
                text_args = dict(stop=stops, include_stop=req.include_stop_str_in_output,
                                 skip_special_tokens=req.skip_special_tokens, stop_ids=stop_ids, min_tokens=req.min_tokens)
                jobs.append(_Job(pi * req.n + k, {"prompt_ids": ids, "params": params, "gamma": gamma, "deadline": deadline,
                                                  "text": text_args},
                                 P.TextStream(self.tokenizer, **text_args), speculative=P.speculative_usage(None, gamma),
                                 echo=echoes[pi]))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(include_usage and req.stream_options.continuous_usage_stats)
        return _Plan(endpoint, P.new_id("cmpl" if endpoint == "completions" else "chatcmpl"), req.stream, include_usage,
                     jobs, sum(len(p) for p in prompts), continuous_usage=continuous, logprobs=options["logprobs"],
                     ignored=P.ignored_fields(req), deadline=deadline,
                     echo_logprobs=bool(endpoint == "completions" and req.echo and req.logprobs is not None),
                     prompt_logprobs=req.prompt_logprobs)

    @staticmethod
    def _truncate(ids: list[int], keep: int | None) -> list[int]:
        """vLLM's truncate_prompt_tokens: only the last `keep` prompt tokens."""
        return ids if keep is None else ids[-keep:]

    def _encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        vocab = self.limits.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.APIError(400, f"'prompt': token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        return list(prompt)

    def _encode_chat(self, messages: list[dict], req=None) -> list[int]:
        if not self.tokenizer.chat_template:
            raise P.APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        kwargs = dict(req.chat_template_kwargs or {}) if req is not None else {}
        reserved = {"tokenize", "add_generation_prompt", "continue_final_message", "conversation", "messages"} & set(kwargs)
        if reserved:
            raise P.APIError(400, f"'chat_template_kwargs': {sorted(reserved)[0]} is set by its own field",
                             param="chat_template_kwargs")
        add_generation = req.add_generation_prompt if req is not None else True
        continue_final = bool(req.continue_final_message) if req is not None else False
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation,
                                                      continue_final_message=continue_final, **kwargs)
        except Exception as exc:  # noqa: BLE001 - templates raise their own errors on conversations they refuse
            raise P.APIError(400, f"'messages': the chat template refused this conversation: {exc}", param="messages") from None
        add_special = bool(req.add_special_tokens) if req is not None and req.add_special_tokens is not None else False
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    async def _events(self, plan: _Plan) -> AsyncIterator[tuple]:
        """All choices at once: (choice index, text delta, finish_reason or None, new logprob entries) as they arrive."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._run_job(job, queue)) for job in plan.jobs]
        grace = 5.0  # past the deadline, the engine ends the rows within a round: give that round time to come back
        try:
            for _ in range(len(tasks)):
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=max(plan.deadline - time.time(), 0) + grace)
                    except asyncio.TimeoutError:
                        raise RequestTimeout(f"no answer within the request's timeout") from None
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _run_job(self, job: _Job, queue: asyncio.Queue) -> None:
        """One choice, to the end: a model replica that dies mid-generation is replaced by a continuation."""
        base = job.request
        try:
            for attempt in range(REPLICA_RETRIES + 1):
                try:
                    await self._stream_job(job, queue)
                    break
                except (RayActorError, ActorUnavailableError) as exc:
                    if job.finish_reason is not None:  # already answered: only its stats are lost
                        break
                    if attempt == REPLICA_RETRIES:
                        raise
                    logger.warning(f"model replica lost ({type(exc).__name__}); continuing choice {job.index} "
                                   f"after {len(job.text.ids)} tokens on another replica")
                    if len(job.text.ids) >= base["params"].max_new_tokens:  # only the final event was lost
                        job.finish_reason, job.completion_tokens = "length", len(job.text.ids)
                        await queue.put((job.index, job.text.finish(), "length", [], False))
                        break
                    job.request = continuation(base, job.text.ids)
            await queue.put(None)
        except Exception as exc:  # noqa: BLE001 - reported to the client by the request's own coroutine
            await queue.put(exc)

    async def _stream_job(self, job: _Job, queue: asyncio.Queue) -> None:
        """Stream one generation; stop sequences end the choice early (its stats still arrive)."""
        stream = self.pair.options(stream=True).generate.remote(job.request)
        finished = False
        try:
            async for event in stream:
                if "error" in event:
                    raise EngineFailure(event["error"])
                if event.get("finish_reason") == "timeout":
                    raise RequestTimeout("the request ran past its timeout")
                if "prompt_logprobs" in event and job.prompt_entries is None:  # a retry may score it again
                    job.prompt_entries = event["prompt_logprobs"]
                    await queue.put((job.index, "", None, [], True))
                entries = []
                if job.finish_reason is None and "logprobs" in event:
                    job.logprobs.extend(event["logprobs"])
                    entries = event["logprobs"]
                delta = job.text.add(event["token_ids"]) if job.finish_reason is None else ""
                if job.finish_reason is None and job.text.stopped:
                    job.finish_reason, job.completion_tokens = "stop", len(job.text.ids)
                    await queue.put((job.index, delta, "stop", entries, False))
                elif job.finish_reason is None and "finish_reason" in event:
                    job.finish_reason, job.completion_tokens = event["finish_reason"], len(job.text.ids)
                    await queue.put((job.index, delta + job.text.finish(), job.finish_reason, entries, False))
                elif delta or entries:
                    job.completion_tokens = len(job.text.ids)
                    await queue.put((job.index, delta, None, entries, False))
                if "stats" in event:
                    job.speculative = P.speculative_usage(event["stats"], event["gamma"])
                    job.queue_s, job.batch_rows = event["queue_s"], event["batch_rows"]
                    finished = True
        finally:
            if not finished:  # the client went away, or the request failed: the replica drops its rows now
                stream.cancel()

    def _finish_metrics(self, plan: _Plan, status: int, start: float, ttft: float | None) -> None:
        for job in plan.jobs:
            self.metrics.record_generation(job.speculative, job.queue_s, job.batch_rows)
        self.metrics.record_request(plan.endpoint, status, time.perf_counter() - start, plan.prompt_tokens,
                                    sum(j.completion_tokens for j in plan.jobs), ttft)

    def _logprobs(self, plan: _Plan, ids: list[int], entries: list, offset: int = 0, job: _Job | None = None) -> dict | None:
        """The choice's `logprobs` object for `ids`; with `job` and echo + logprobs, the prompt's tokens lead it."""
        if plan.logprobs is None:
            return None
        if job is not None and plan.echo_logprobs:
            return P.echo_logprobs(self.tokenizer, job.request["prompt_ids"], job.prompt_entries or [], plan.logprobs,
                                   ids, entries)
        if plan.endpoint == "completions":
            return P.completion_logprobs(self.tokenizer, ids, entries, offset)
        return P.chat_logprobs(self.tokenizer, ids, entries)

    async def _complete(self, plan: _Plan, start: float) -> Response:
        texts = {job.index: [job.echo] for job in plan.jobs}
        ttft = None
        try:
            async for index, delta, *_ in self._events(plan):
                if delta and ttft is None:
                    ttft = time.perf_counter() - start
                texts[index].append(delta)
        except Exception as exc:  # noqa: BLE001
            return self._server_error(plan, exc, start)
        self._finish_metrics(plan, 200, start, ttft)
        choices = [P.Choice(j.index, "".join(texts[j.index]), j.finish_reason or "length", 0, j.completion_tokens,
                            j.speculative, self._logprobs(plan, j.text.ids, j.logprobs, len(j.echo), j),
                            self._prompt_logprobs(plan, j)) for j in plan.jobs]
        model = self.limits.model_name
        body = (P.completion_response(plan.rid, model, choices, plan.prompt_tokens) if plan.endpoint == "completions"
                else P.chat_response(plan.rid, model, choices, plan.prompt_tokens))
        return JSONResponse(body)

    def _prompt_logprobs(self, plan: _Plan, job: _Job) -> list | None:
        if plan.prompt_logprobs is None:
            return None
        return P.vllm_prompt_logprobs(self.tokenizer, job.request["prompt_ids"], job.prompt_entries or [],
                                      plan.prompt_logprobs)

    def _usage(self, plan: _Plan) -> dict:
        return P.usage_dict(plan.prompt_tokens, sum(j.completion_tokens for j in plan.jobs),
                            P.merge_speculative([j.speculative for j in plan.jobs]))

    async def _stream(self, plan: _Plan, start: float) -> AsyncIterator[str]:
        model, chat, ttft = self.limits.model_name, plan.endpoint == "chat", None
        jobs = {job.index: job for job in plan.jobs}
        usage = (lambda: self._usage(plan)) if plan.continuous_usage else (lambda: None)  # noqa: E731
        if chat:  # OpenAI opens every choice with the assistant role
            for job in plan.jobs:
                yield P.sse(P.chat_chunk(plan.rid, model, plan.created, job.index, {"role": "assistant", "content": ""},
                                         None, usage=usage()))
        elif not plan.echo_logprobs:  # with logprobs, the echo waits for the prompt's logprobs (from the prefill)
            for job in plan.jobs:
                if job.echo:
                    yield P.sse(P.completion_chunk(plan.rid, model, plan.created, job.index, job.echo, None, usage=usage()))
        pending: dict[int, list] = {job.index: [] for job in plan.jobs}  # logprob entries not yet sent
        sent: dict[int, int] = {job.index: 0 for job in plan.jobs}       # tokens whose logprobs were sent
        offsets: dict[int, int] = {job.index: len(job.echo) for job in plan.jobs}
        answered = False
        try:
            async for index, delta, finish, entries, scored in self._events(plan):
                if scored:  # the prompt's logprobs: the echo (completions) or vLLM's prompt_logprobs lead the choice
                    job = jobs[index]
                    chunk = None
                    if plan.echo_logprobs:
                        lp = P.echo_logprobs(self.tokenizer, job.request["prompt_ids"], job.prompt_entries, plan.logprobs,
                                             [], [])
                        chunk = P.completion_chunk(plan.rid, model, plan.created, index, job.echo, None, lp, usage=usage())
                        offsets[index] = len("".join(lp["tokens"]))  # the completion's offsets follow the prompt's
                    if plan.prompt_logprobs is not None:
                        chunk = chunk or (P.chat_chunk(plan.rid, model, plan.created, index, {}, None, usage=usage()) if chat
                                          else P.completion_chunk(plan.rid, model, plan.created, index, "", None,
                                                                  usage=usage()))
                        chunk["choices"][0]["prompt_logprobs"] = self._prompt_logprobs(plan, job)
                    if chunk is not None:
                        yield P.sse(chunk)
                    continue
                pending[index].extend(entries)
                if delta and ttft is None:
                    ttft = time.perf_counter() - start
                if delta or finish:
                    lp = None
                    if plan.logprobs is not None:
                        n = len(pending[index])
                        ids = jobs[index].text.ids[sent[index]:sent[index] + n]
                        lp = self._logprobs(plan, ids, pending[index], offsets[index])
                        sent[index] += n
                        offsets[index] += sum(len(P.token_text(self.tokenizer, t)) for t in ids)
                        pending[index] = []
                    yield P.sse(
                        P.chat_chunk(plan.rid, model, plan.created, index, {"content": delta} if delta else {}, finish,
                                     lp, usage=usage()) if chat
                        else P.completion_chunk(plan.rid, model, plan.created, index, delta, finish, lp, usage=usage()))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            answered = True
            err = self._error_for(exc)
            self._server_error(plan, exc, start)
            yield P.sse(err.to_dict())
            yield P.sse("[DONE]")
            return
        finally:
            if not answered and any(j.finish_reason is None for j in plan.jobs):
                # The client went away mid-stream (the generator is closed or cancelled): `_events` has cancelled the
                # choices, and each model replica drops their rows after its current speculative round.
                self.metrics.record_request(plan.endpoint, 499, time.perf_counter() - start)
        self._finish_metrics(plan, 200, start, ttft)
        if plan.include_usage:
            yield P.sse(P.usage_chunk(plan.rid, "chat.completion.chunk" if chat else "text_completion", model,
                                      plan.created, self._usage(plan)))
        yield P.sse("[DONE]")

    @staticmethod
    def _error_for(exc: BaseException) -> P.APIError:
        if isinstance(exc, RequestTimeout):
            return P.APIError(504, f"the request ran past its timeout ({exc})", param="timeout", code="timeout",
                              type="timeout_error")
        if isinstance(exc, EngineFailure):
            return P.APIError(500, f"generation failed in the engine: {exc}", type="server_error", code="engine_error")
        return P.APIError(503, f"generation failed ({type(exc).__name__}); retry the request", type="server_error")

    def _server_error(self, plan: _Plan, exc: BaseException, start: float) -> Response:
        err = self._error_for(exc)
        logger.error(f"request {plan.rid} failed: {type(exc).__name__}: {exc}")
        self.metrics.record_request(plan.endpoint, err.status, time.perf_counter() - start)
        return JSONResponse(err.to_dict(), status_code=err.status)


# --------------------------------------------------------------------------------------------
# `fastdraft serve RECIPE`
# --------------------------------------------------------------------------------------------
def run_serve(recipe: Recipe) -> dict:
    """Start the app on a local (or RAY_ADDRESS) cluster; block until Ctrl-C or SIGTERM, then shut down.

    Returns a summary dict (url, model, target, draft, gamma).
    """
    from fastdraft.raycluster import ensure_ray

    spec = resolve_pair(recipe)
    check_stage(recipe, "serve")
    cfg = spec.serve
    url = f"http://{cfg.host}:{cfg.port}"
    summary = {"url": f"{url}/v1", "model": cfg.model_name, "target": spec.target, "draft": spec.draft or "(none)",
               "gamma": cfg.gamma if spec.draft else 0,
               "auth": f"bearer token from ${cfg.api_key_env}" if cfg.api_key_env else "none"}
    ensure_ray()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # after ray.init, which installs its own
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_pair_app(spec), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"[serve] '{cfg.model_name}' is up at {url}/v1 (health: {url}/health, metrics: {url}/metrics)", flush=True)
        if not cfg.api_key_env:
            print("[serve] no API key configured (serve.api_key_env unset): the API is open on this port", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _shutdown()
    return summary


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _shutdown() -> None:
    """Stop the app; exit at once if the local Ray this process started is already going down.

    A SIGTERM to the whole process group (Ctrl-C in a terminal, `kill -- -PGID`, a container stop) also
    reaches the Ray processes that `ray.init` started here. Asking a dying cluster to shut Serve down
    waits a minute for its GCS and then aborts, so in that case there is nothing left to stop.
    """
    import ray

    time.sleep(0.5)  # let a group-wide signal reach the Ray processes first
    node = getattr(ray._private.worker, "_global_node", None)  # set only when this process started Ray
    try:
        dead = bool(node is not None and node.dead_processes())
    except Exception:  # noqa: BLE001 - private API: assume alive, and shut down normally
        dead = False
    if dead:
        print("[serve] the local Ray cluster is stopping with this process; exiting", flush=True)
        sys.stderr.flush()
        os._exit(0)  # skips ray.shutdown's atexit hook, which would wait for the dead GCS
    serve.shutdown()


if __name__ == "__main__":  # python -m fastdraft.serving.app RECIPE: the same as `fastdraft serve RECIPE`
    from fastdraft.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
