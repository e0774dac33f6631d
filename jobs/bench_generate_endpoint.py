"""Benchmark: rows/s of `generate.engine: openai` against an OpenAI-compatible endpoint, by client concurrency.

    python jobs/bench_generate_endpoint.py                                  # starts the loopback server on SmolLM2-135M
    python jobs/bench_generate_endpoint.py --model /path/to/target --prompts 48 --concurrency 1 4 16
    python jobs/bench_generate_endpoint.py --endpoint http://host:8000/v1 --served-model NAME --model /local/target
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/bench_generate_endpoint.py

Without `--endpoint` it starts `tests/minimal_openai_server.py` (a minimal FastAPI + uvicorn server around the
real transformers model that gathers concurrent requests into one batch, up to 16) on a free loopback port. For
each concurrency it answers the same stdlib code prompts greedily through `OpenAIBackend` (the engine the Ray
actors run: httpx, retries, exact token-id prompts, top-k log-probs when `--store-topk`), after one warm-up
request, and reports rows/s and response tokens/s. Prints a table and writes JSON (`--out`, default
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


def bench_endpoint(backend_for, prompts: list[list[int]], max_new_tokens: int, concurrencies: list[int]) -> dict:
    """rows/s and tokens/s of all prompts at each concurrency (`backend_for(c)` builds the engine)."""
    results = {}
    for c in concurrencies:
        backend = backend_for(c)
        backend.generate([(prompts[0], SamplingParams(max_new_tokens=2))])  # connection and server warm-up
        start = time.perf_counter()
        outs = backend.generate([(ids, SamplingParams(max_new_tokens=max_new_tokens)) for ids in prompts])
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        results[str(c)] = {"concurrency": c, "rows": len(outs), "seconds": round(seconds, 3), "tokens": tokens,
                           "rows_per_s": float(f"{len(outs) / seconds:.4g}"), "tokens_per_s": float(f"{tokens / seconds:.4g}"),
                           "retries": backend.stats.retries}
        print(f"[bench] concurrency {c}: {len(outs)} rows in {seconds:.1f} s", flush=True)
    base = results[str(concurrencies[0])]["rows_per_s"]
    for r in results.values():
        r["speedup"] = float(f"{r['rows_per_s'] / base:.3g}")
    return results


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

        results = bench_endpoint(backend_for, prompts, args.max_new_tokens, args.concurrency)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)

    print(f"\n{'concurrency':>11} {'rows':>5} {'seconds':>8} {'rows/s':>8} {'tok/s':>8} {'speedup':>8} {'retries':>7}")
    for r in results.values():
        print(f"{r['concurrency']:>11} {r['rows']:>5} {r['seconds']:>8.2f} {r['rows_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['speedup']:>7.3g}x {r['retries']:>7}")
    report = {"model": args.model, "endpoint": args.endpoint or "loopback: tests/minimal_openai_server.py (max batch 16)",
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "store_topk": args.store_topk,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "results": results}
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
