"""Benchmark: rows/s of `generate.engine: openai` against an OpenAI-compatible endpoint, by client concurrency.

    python jobs/bench_generate_endpoint.py                                  # starts the loopback server on SmolLM2-135M
    python jobs/bench_generate_endpoint.py --model /path/to/target --prompts 48 --concurrency 1 4 16
    python jobs/bench_generate_endpoint.py --endpoint http://host:8000/v1 --served-model NAME --model /local/target
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/bench_generate_endpoint.py

Without `--endpoint` it starts `tests/minimal_openai_server.py` (a minimal FastAPI + uvicorn server around the
real transformers model that gathers concurrent requests into one batch, up to 16) on a free loopback port. For
each concurrency it answers the same stdlib code prompts greedily through `OpenAIBackend` (the engine the Ray
actors run: httpx, retries, exact token-id prompts, top-k log-probs when `--store-topk`), after one warm-up
request, and reports rows/s and response tokens/s; the concurrencies take turns for `--rounds` passes, so all
see the same load on a shared machine. `--ray` also times the whole generate stage through the endpoint. Prints a table and writes JSON (`--out`, default
runs/bench/bench_generate_endpoint.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the working dir, under `ray job submit`

from fastdraft.config import OpenAIEndpointConfig, PromptSourceConfig  # noqa: E402
from fastdraft.generation.endpoint import OpenAIBackend  # noqa: E402
from fastdraft.generation.prompts import PromptEncoder, load_prompts  # noqa: E402
from fastdraft.speculative.types import SamplingParams  # noqa: E402
from fastdraft.tokenizer import load_tokenizer  # noqa: E402
from jobs.benchlib import write_json  # noqa: E402

SERVER = REPO / "tests" / "minimal_openai_server.py"


def start_loopback_server(model: str, log: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """The minimal loopback server on a free port; (process, base_url) once GET /v1/models answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([sys.executable, str(SERVER), "--model", model, "--port", str(port), "--model-name", "bench"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url, deadline = f"http://127.0.0.1:{port}/v1", time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{base_url}/models", timeout=2)
            return proc, base_url
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"loopback server did not start; see {log}")
            time.sleep(0.5)


def bench_endpoint(backend_for, prompts: list[list[int]], max_new_tokens: int, concurrencies: list[int],
                   rounds: int = 1) -> dict:
    """rows/s and tokens/s of all prompts at each concurrency (`backend_for(c)` builds the engine). The
    concurrencies take turns, round after round, so that all see the same load on a shared machine."""
    backends = {c: backend_for(c) for c in concurrencies}
    totals = {c: [0.0, 0, 0] for c in concurrencies}  # seconds, rows, tokens
    for c, backend in backends.items():
        backend.generate([(prompts[0], SamplingParams(max_new_tokens=2))])  # connection and server warm-up
    for k in range(rounds):
        for c, backend in backends.items():
            start = time.perf_counter()
            outs = backend.generate([(ids, SamplingParams(max_new_tokens=max_new_tokens)) for ids in prompts])
            totals[c][0] += time.perf_counter() - start
            totals[c][1] += len(outs)
            totals[c][2] += sum(len(o.token_ids) for o in outs)
        print(f"[bench] round {k + 1}/{rounds}: " + ", ".join(f"c{c} {t[0]:.1f} s" for c, t in totals.items()) + " so far",
              flush=True)
    results = {}
    for c, (seconds, rows, tokens) in totals.items():
        results[str(c)] = {"concurrency": c, "rows": rows, "seconds": round(seconds, 3), "tokens": tokens,
                           "rows_per_s": float(f"{rows / seconds:.4g}"), "tokens_per_s": float(f"{tokens / seconds:.4g}"),
                           "retries": backends[c].stats.retries}
    base = results[str(concurrencies[0])]["rows_per_s"]
    for r in results.values():
        r["speedup"] = float(f"{r['rows_per_s'] / base:.3g}")
    return results


def bench_ray(args, base_url: str, concurrency: int) -> tuple[float, int]:
    """The generate stage through the endpoint: (wall seconds, rows)."""
    from fastdraft.config import recipe_from_dict
    from fastdraft.generation.pipeline import run_generate
    from fastdraft.raycluster import ensure_ray

    ensure_ray()
    recipe = recipe_from_dict({
        "name": "bench-generate-endpoint", "workdir": tempfile.mkdtemp(prefix="bench-endpoint-ray-"),
        "target": {"model": args.model},
        "generate": {"engine": "openai", "prompts": [{"name": "code", "kind": "stdlib_code", "limit": args.prompts}],
                     "sampling": [{"temperature": 0.0, "max_new_tokens": args.max_new_tokens}], "max_prompt_tokens": 512,
                     "batch_size": max(16, 2 * concurrency), "cpus_per_actor": 0.5, "store_topk": args.store_topk,
                     "openai": {"base_url": base_url, "model": args.served_model, "api_key_env": args.api_key_env,
                                "max_concurrency": concurrency}},
    })
    start = time.perf_counter()
    summary = run_generate(recipe)
    return time.perf_counter() - start, summary["rows"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct",
                        help="the target (local: fastdraft tokenizes; the loopback server serves it)")
    parser.add_argument("--endpoint", default=None, help="an existing endpoint's base URL (…/v1); default: start the loopback server")
    parser.add_argument("--served-model", default="bench", help="the endpoint's model name")
    parser.add_argument("--api-key-env", default=None)
    parser.add_argument("--prompts", type=int, default=32, help="number of stdlib code prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--store-topk", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts per concurrency, interleaved")
    parser.add_argument("--ray", action="store_true",
                        help="also time the whole generate stage (run_generate: Ray Data actor, Parquet parts, manifest) "
                             "at each concurrency, batch_size max(16, 2 x concurrency); wall time includes the actor's start")
    parser.add_argument("--out", default="runs/bench/bench_generate_endpoint.json")
    args = parser.parse_args(argv)

    proc, base_url = None, args.endpoint
    if base_url is None:
        log = Path(tempfile.mkdtemp(prefix="bench-endpoint-")) / "server.log"
        proc, base_url = start_loopback_server(args.model, log)
    try:
        tok = load_tokenizer(args.model)
        source = PromptSourceConfig(name="code", kind="stdlib_code", limit=args.prompts)
        prompts = [p.prompt_ids for p in load_prompts(source, PromptEncoder(tok, 512))[0]]
        print(f"[bench] {len(prompts)} prompts, mean {sum(map(len, prompts)) / len(prompts):.0f} tokens, max_new_tokens "
              f"{args.max_new_tokens}, endpoint {base_url}", flush=True)

        def backend_for(c: int) -> OpenAIBackend:
            cfg = OpenAIEndpointConfig(base_url=base_url, model=args.served_model, api_key_env=args.api_key_env,
                                       max_concurrency=c)
            return OpenAIBackend(args.model, cfg, store_topk=args.store_topk)

        results = bench_endpoint(backend_for, prompts, args.max_new_tokens, args.concurrency, args.rounds)
        if args.ray:
            for c in args.concurrency:
                seconds, rows = bench_ray(args, base_url, c)
                results[str(c)].update(ray_seconds=round(seconds, 3), ray_rows_per_s=float(f"{rows / seconds:.4g}"))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)

    print(f"\n{'concurrency':>11} {'rows':>5} {'seconds':>8} {'rows/s':>8} {'tok/s':>8} {'speedup':>8} {'retries':>7}"
          + (f" {'ray rows/s':>10}" if args.ray else ""))
    for r in results.values():
        print(f"{r['concurrency']:>11} {r['rows']:>5} {r['seconds']:>8.2f} {r['rows_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['speedup']:>7.3g}x {r['retries']:>7}" + (f" {r['ray_rows_per_s']:>10.2f}" if args.ray else ""))
    report = {"model": args.model, "endpoint": args.endpoint or "loopback: tests/minimal_openai_server.py (max batch 16)",
              "prompts": len(prompts), "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "store_topk": args.store_topk,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "results": results}
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
