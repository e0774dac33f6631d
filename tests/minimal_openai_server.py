"""A MINIMAL OpenAI-compatible loopback server for tests and benchmarks (NOT fastdraft.serving).

    python tests/minimal_openai_server.py --model DIR --port 8011 [--fingerprint real|none|VALUE] [--no-token-id-prompts]

fastdraft's own server (`fastdraft.serving`) refuses `logprobs`, returns text only (no token ids) and runs under
Ray Serve (a second Ray instance on a 2-core test machine); until it has those features, this small FastAPI +
uvicorn app around the REAL tiny transformers model answers the subset of vLLM's /v1/completions that
`generate.engine: openai` uses:

- prompt as text or token ids (`--no-token-id-prompts`: token ids are refused with 400, as some servers do);
- max_tokens, temperature, top_p, top_k, seed (per-request generator, as vLLM), stop_token_ids;
- logprobs=k (the model's own top-k, before temperature), return_tokens_as_token_ids, return_token_ids, usage;
- GET /v1/models with the model's `tokenizer_fingerprint` (`--fingerprint none`: absent, VALUE: a wrong one);
- POST /tokenize and /detokenize at the root, as vLLM (`--no-tokenize-endpoint` removes them);
- `--tokenizer DIR`: tokenize with another tokenizer than the model's (a server with the wrong tokenizer);
- `--die-after N`: the process exits (no answer, connection dropped) on its N-th completion request.
Concurrent requests are gathered into one batch (up to --max-batch) of fastdraft's TransformersBackend, so
answers equal the local `transformers` engine's and concurrency pays off as on a real server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from fastdraft.generation.backends import TransformersBackend  # noqa: E402
from fastdraft.speculative.types import SamplingParams  # noqa: E402
from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint  # noqa: E402

MAX_LOGPROBS = 8


def build_app(args) -> FastAPI:
    backend = TransformersBackend(args.model, store_topk=MAX_LOGPROBS)
    tok = load_tokenizer(args.tokenizer or args.model)
    fingerprint = {"real": tokenizer_fingerprint(tok), "none": None}.get(args.fingerprint, args.fingerprint)
    app = FastAPI(title="minimal OpenAI-compatible loopback server (tests)")
    queue: asyncio.Queue = asyncio.Queue()
    served = {"completions": 0}

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(0.003)  # let concurrent requests join
            while not queue.empty() and len(batch) < args.max_batch:
                batch.append(queue.get_nowait())
            try:
                outs = await loop.run_in_executor(None, backend.generate, [(ids, p) for ids, p, _ in batch])
                for (_, _, fut), out in zip(batch, outs):
                    fut.set_result(out)
            except Exception as exc:  # noqa: BLE001
                for _, _, fut in batch:
                    fut.set_exception(exc)

    @app.on_event("startup")
    async def start() -> None:
        asyncio.get_running_loop().create_task(batcher())

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        entry = {"id": args.model_name, "object": "model", "created": 0, "owned_by": "loopback"}
        if fingerprint:
            entry["tokenizer_fingerprint"] = fingerprint
        return JSONResponse({"object": "list", "data": [entry]})

    if not args.no_tokenize_endpoint:
        @app.post("/tokenize")
        async def tokenize(request: Request) -> JSONResponse:
            body = await request.json()
            ids = tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": 2048})

        @app.post("/detokenize")
        async def detokenize(request: Request) -> JSONResponse:
            return JSONResponse({"prompt": tok.decode((await request.json())["tokens"])})

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        served["completions"] += 1
        if args.die_after and served["completions"] >= args.die_after:
            os._exit(17)  # as a crashed server: the connection drops without an answer
        body = await request.json()
        if body.get("model") != args.model_name:
            return error(404, f"model {body.get('model')!r} does not exist")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if args.no_token_id_prompts:
                return error(400, "'prompt' must be a string")
            ids = list(prompt)
        elif isinstance(prompt, str):
            ids = tok(prompt, add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        else:
            return error(400, "'prompt' must be a string or a list of token ids")
        k = body.get("logprobs")
        if k is not None and not 0 <= int(k) <= MAX_LOGPROBS:
            return error(400, f"'logprobs' must be at most {MAX_LOGPROBS}")
        if body.get("echo"):
            return error(400, "'echo' is not supported")
        params = SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                                top_k=max(0, int(body.get("top_k", 0) or 0)), max_new_tokens=int(body.get("max_tokens", 16)),
                                seed=body.get("seed"), stop_token_ids=tuple(body.get("stop_token_ids") or ()))
        fut = asyncio.get_running_loop().create_future()
        await queue.put((ids, params, fut))
        out = await fut
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: tok.decode([t]))
        choice = {"index": 0, "text": tok.decode(out.token_ids, skip_special_tokens=True),
                  "finish_reason": out.finish_reason, "logprobs": None}
        if k is not None:
            k = int(k)
            tops = [dict(zip(map(name, i[:k]), lp[:k])) for i, lp in zip(out.topk_ids, out.topk_logprobs)]
            chosen = [dict(zip(i, lp)).get(t) for t, i, lp in zip(out.token_ids, out.topk_ids, out.topk_logprobs)]
            choice["logprobs"] = {"tokens": [name(t) for t in out.token_ids], "token_logprobs": chosen,
                                  "top_logprobs": tops, "text_offset": [0] * len(out.token_ids)}
        if body.get("return_token_ids"):
            choice["token_ids"], choice["prompt_token_ids"] = out.token_ids, ids
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out.token_ids),
                 "total_tokens": len(ids) + len(out.token_ids)}
        return JSONResponse({"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                             "model": args.model_name, "choices": [choice], "usage": usage})

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fingerprint", default="real")
    parser.add_argument("--no-token-id-prompts", action="store_true")
    parser.add_argument("--no-tokenize-endpoint", action="store_true")
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
