"""Ray Serve application: the target + draft pair behind an OpenAI-compatible HTTP API.

Two deployments:
- `SpeculativePair` holds both models in fastdraft's speculative engine and generates token ids.
  Concurrent requests are gathered with `@serve.batch` (up to `serve.max_batch_size`) and those with
  the same decoding settings share one engine call, so they share forward passes. Replicas scale with
  `serve.num_replicas` (an int, or 'auto' for autoscaling up to `serve.max_replicas`).
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
from concurrent.futures import ThreadPoolExecutor
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
        batch_wait_timeout_s=cfg.batch_wait_timeout_s, draft_weights=cfg.draft_weights)
    return OpenAIIngress.options(**ingress_options(cfg)).bind(pair, spec.target, cfg, spec.draft is not None)


def build_app(args: dict[str, Any]) -> serve.Application:
    """App builder for `serve run` / `serve deploy` (Serve config `import_path: apps.speculative:build_app`)."""
    return build_pair_app(resolve_pair(recipe_from_args(args)))


# --------------------------------------------------------------------------------------------
# Model replicas: the engine behind @serve.batch
# --------------------------------------------------------------------------------------------
@serve.deployment(name="SpeculativePair")
class SpeculativePair:
    """Target + draft in fastdraft's speculative engine; yields token ids as they are accepted."""

    def __init__(self, target: str, draft: str | None, dtype: str = "float32", device: str = "cpu", gamma: int = 3,
                 max_gamma: int = 8, dynamic_gamma: bool = False, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, draft_weights: str = "auto"):
        from fastdraft.speculative.engine import SpeculativeEngine
        from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

        tok = load_tokenizer(target)
        # from_dirs checks the tokenizer contract again: `serve deploy` may build the app on another machine.
        self.engine = SpeculativeEngine.from_dirs(target, draft, dtype=dtype, device=device, gamma=gamma,
                                                  dynamic_gamma=dynamic_gamma, max_gamma=max_gamma,
                                                  draft_weights=draft_weights)
        self.info_ = {"target": target, "draft": draft, "gamma": gamma, "dynamic_gamma": dynamic_gamma,
                      "draft_weights": getattr(self.engine.draft, "weights", "float") if draft else None,
                      "tokenizer_fingerprint": tokenizer_fingerprint(tok), "pid": os.getpid()}
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # One generation at a time per replica: torch already uses the replica's cores for each pass.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        logger.info(f"SpeculativePair ready: target {target}, draft {draft or '(none: target alone)'}, gamma {gamma}")

    def info(self) -> dict:
        return dict(self.info_)

    def check_health(self) -> None:
        if self._executor._shutdown:
            raise RuntimeError("the engine thread has stopped")

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream one generation: {"token_ids": [...]} events, the last with finish_reason, stats and queue_s.

        Args:
            request: {"prompt_ids": list[int], "params": SamplingParams, "gamma": int}.
        """
        request = {**request, "arrived": time.perf_counter()}
        async for event in self._generate_batch(request):
            if event is not None:
                yield event

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, requests: list[dict]) -> AsyncIterator[list]:
        """Run a batch: one engine call per group of requests with equal settings, streaming every token.

        Each yield is one list with an entry per request: an event, None (nothing new) or StopIteration.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        started = time.perf_counter()
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r["params"], r["gamma"]), []).append(i)
        loop.run_in_executor(self._executor, self._run_groups, groups, requests, loop, events)
        streamed = [0] * len(requests)
        finished: set[int] = set()
        while True:
            batch_events = [await events.get()]
            while not events.empty():
                batch_events.append(events.get_nowait())
            out: list = [StopIteration if i in finished else None for i in range(len(requests))]
            end = False
            for kind, i, payload in batch_events:
                if kind == "end":
                    end = True
                elif kind == "error":
                    raise payload
                elif kind == "tokens":
                    streamed[i] += len(payload)
                    out[i] = {"token_ids": (out[i] or {}).get("token_ids", []) + payload}
                else:  # done: the result; send ids the engine did not stream (if any) with it
                    result, gamma, rows = payload
                    rest = [int(t) for t in result.token_ids[streamed[i]:]]
                    out[i] = {"token_ids": (out[i] or {}).get("token_ids", []) + rest,
                              "finish_reason": result.finish_reason, "stats": result.stats.to_dict(), "gamma": gamma,
                              "queue_s": started - requests[i]["arrived"], "batch_rows": rows}
                    finished.add(i)
            yield out
            if end:
                return

    def _run_groups(self, groups: dict, requests: list[dict], loop, events: asyncio.Queue) -> None:
        """Engine thread: generate each group, posting ('tokens'|'done'|'error'|'end', index, payload) events."""
        post = lambda *e: loop.call_soon_threadsafe(events.put_nowait, e)  # noqa: E731
        try:
            for (params, gamma), idxs in groups.items():
                results = self.engine.generate(
                    [requests[i]["prompt_ids"] for i in idxs], params, gamma=gamma,
                    on_tokens=lambda j, ids, idxs=idxs: post("tokens", idxs[j], [int(t) for t in ids]))
                for j, result in enumerate(results):
                    post("done", idxs[j], (result, gamma, len(idxs)))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, the replica stays up
            logger.exception("engine failed")
            post("error", -1, exc)
        finally:
            post("end", -1, None)


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


def _continuation(request: dict, generated: list[int]) -> dict:
    """The rest of `request` after its replica died: the prompt plus what was generated, fewer new tokens.

    Exact for greedy decoding, and a correct sample for sampling (a continuation from a prefix).
    """
    params = request["params"]
    # A fresh seed would repeat the lost attempt's first draws; derive one from the progress instead.
    seed = None if params.seed is None else params.seed + 1_000_003 * (len(generated) + 1)
    rest = dataclasses.replace(params, max_new_tokens=params.max_new_tokens - len(generated), seed=seed)
    return {**request, "prompt_ids": list(request["prompt_ids"]) + list(generated), "params": rest}


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


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, pair: DeploymentHandle, target: str, cfg: ServeConfig, speculative: bool):
        from fastdraft.checkpoint import load_config
        from fastdraft.tokenizer import load_tokenizer

        self.pair, self.cfg = pair, cfg
        self.tokenizer = load_tokenizer(target)
        tcfg = load_config(target)
        self.limits = P.Limits(
            model_name=cfg.model_name, max_tokens_cap=cfg.max_tokens_cap, max_n=cfg.max_n, max_gamma=cfg.max_gamma,
            context_length=int(getattr(tcfg, "max_position_embeddings", 2048)), speculative=speculative,
            max_prompts=cfg.max_batch_size)
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
        return JSONResponse(P.models_response(self.limits.model_name))

    @app.get("/health")
    async def health(self) -> Response:
        try:
            info = await asyncio.wait_for(self.pair.info.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the models is "unhealthy"
            return JSONResponse({"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"[:300]}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.limits.model_name, "speculative": self.limits.speculative,
                             "gamma": info["gamma"], "draft": info["draft"]})

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
        if plan.stream:
            return StreamingResponse(self._stream(plan, start), media_type="text/event-stream")
        return await self._complete(plan, start)

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
            prompts = [self._encode_prompt(p) for p in P.completion_prompts(req, self.limits)]
            max_param, max_value = "max_tokens", req.max_tokens
        else:
            req = P.parse_request(body, P.ChatCompletionRequest, self.limits.max_body_bytes)
            P.check_sampling(req, self.limits)
            prompts = [self._encode_chat(P.chat_messages(req))]
            max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            max_value = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_new = P.check_max_tokens(max_value, max_param, max(len(p) for p in prompts), self.limits)
        if not self.limits.speculative or req.speculative is False:
            gamma = 0
        else:
            gamma = req.gamma if req.gamma is not None else self.cfg.gamma
        stops = P.stop_list(req.stop)
        jobs = []
        for pi, ids in enumerate(prompts):
            for k in range(req.n):
                # n samples with one seed would repeat each other: each choice gets its own seed.
                params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
                                        max_new_tokens=max_new, stop_token_ids=self.stop_ids,
                                        seed=None if req.seed is None else req.seed + pi * req.n + k)
                jobs.append(_Job(pi * req.n + k, {"prompt_ids": ids, "params": params, "gamma": gamma},
                                 P.TextStream(self.tokenizer, stops), speculative=P.speculative_usage(None, gamma)))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Plan(endpoint, P.new_id("cmpl" if endpoint == "completions" else "chatcmpl"), req.stream, include_usage,
                     jobs, sum(len(p) for p in prompts))

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        vocab = len(self.tokenizer)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.APIError(400, f"'prompt': token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        return list(prompt)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise P.APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - templates raise their own errors on conversations they refuse
            raise P.APIError(400, f"'messages': the chat template refused this conversation: {exc}", param="messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _events(self, plan: _Plan) -> AsyncIterator[tuple[int, str, str | None]]:
        """All choices at once: (choice index, text delta, finish_reason or None) as they arrive."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._run_job(job, queue)) for job in plan.jobs]
        try:
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
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
                        await queue.put((job.index, job.text.finish(), "length"))
                        break
                    job.request = _continuation(base, job.text.ids)
            await queue.put(None)
        except Exception as exc:  # noqa: BLE001 - reported to the client by the request's own coroutine
            await queue.put(exc)

    async def _stream_job(self, job: _Job, queue: asyncio.Queue) -> None:
        """Stream one generation; stop sequences end the choice early (its stats still arrive)."""
        async for event in self.pair.options(stream=True).generate.remote(job.request):
            delta = job.text.add(event["token_ids"]) if job.finish_reason is None else ""
            if job.finish_reason is None and job.text.stopped:
                job.finish_reason, job.completion_tokens = "stop", len(job.text.ids)
                await queue.put((job.index, delta, "stop"))
            elif job.finish_reason is None and "finish_reason" in event:
                job.finish_reason, job.completion_tokens = event["finish_reason"], len(job.text.ids)
                await queue.put((job.index, delta + job.text.finish(), job.finish_reason))
            elif delta:
                await queue.put((job.index, delta, None))
            if "stats" in event:
                job.speculative = P.speculative_usage(event["stats"], event["gamma"])
                job.queue_s, job.batch_rows = event["queue_s"], event["batch_rows"]

    def _finish_metrics(self, plan: _Plan, status: int, start: float, ttft: float | None) -> None:
        for job in plan.jobs:
            self.metrics.record_generation(job.speculative, job.queue_s, job.batch_rows)
        self.metrics.record_request(plan.endpoint, status, time.perf_counter() - start, plan.prompt_tokens,
                                    sum(j.completion_tokens for j in plan.jobs), ttft)

    async def _complete(self, plan: _Plan, start: float) -> Response:
        texts = {job.index: [] for job in plan.jobs}
        ttft = None
        try:
            async for index, delta, _ in self._events(plan):
                if delta and ttft is None:
                    ttft = time.perf_counter() - start
                texts[index].append(delta)
        except Exception as exc:  # noqa: BLE001
            return self._server_error(plan, exc, start)
        self._finish_metrics(plan, 200, start, ttft)
        choices = [P.Choice(j.index, "".join(texts[j.index]), j.finish_reason or "length", 0, j.completion_tokens,
                            j.speculative) for j in plan.jobs]
        model = self.limits.model_name
        body = (P.completion_response(plan.rid, model, choices, plan.prompt_tokens) if plan.endpoint == "completions"
                else P.chat_response(plan.rid, model, choices, plan.prompt_tokens))
        return JSONResponse(body)

    async def _stream(self, plan: _Plan, start: float) -> AsyncIterator[str]:
        model, chat, ttft = self.limits.model_name, plan.endpoint == "chat", None
        if chat:  # OpenAI opens every choice with the assistant role
            for job in plan.jobs:
                yield P.sse(P.chat_chunk(plan.rid, model, plan.created, job.index, {"role": "assistant", "content": ""}, None))
        try:
            async for index, delta, finish in self._events(plan):
                if delta and ttft is None:
                    ttft = time.perf_counter() - start
                if delta or finish:
                    yield P.sse(
                        P.chat_chunk(plan.rid, model, plan.created, index, {"content": delta} if delta else {}, finish) if chat
                        else P.completion_chunk(plan.rid, model, plan.created, index, delta, finish))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            self._server_error(plan, exc, start)
            yield P.sse(P.APIError(500, f"generation failed: {type(exc).__name__}", type="server_error").to_dict())
            yield P.sse("[DONE]")
            return
        self._finish_metrics(plan, 200, start, ttft)
        if plan.include_usage:
            usage = P.usage_dict(plan.prompt_tokens, sum(j.completion_tokens for j in plan.jobs),
                                 P.merge_speculative([j.speculative for j in plan.jobs]))
            yield P.sse(P.usage_chunk(plan.rid, "chat.completion.chunk" if chat else "text_completion", model,
                                      plan.created, usage))
        yield P.sse("[DONE]")

    def _server_error(self, plan: _Plan, exc: BaseException, start: float) -> Response:
        logger.error(f"request {plan.rid} failed: {type(exc).__name__}: {exc}")
        self.metrics.record_request(plan.endpoint, 503, time.perf_counter() - start)
        err = P.APIError(503, f"generation failed ({type(exc).__name__}); retry the request", type="server_error")
        return JSONResponse(err.to_dict(), status_code=503)


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
