"""Benchmark: output tokens/s of alignment-set generation, side by side on the same prompts, model and cores.

    python jobs/bench_generate.py                                   # SmolLM2-135M, 32 stdlib code prompts, batch 16
    python jobs/bench_generate.py --model /path/to/target --prompts 64 --batch-size 32 --max-new-tokens 128
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/bench_generate.py

Four ways to answer the same prompts greedily with the same `max_new_tokens` (loop, batched and lean are run
interleaved, chunk by chunk, so all see the same load on a shared machine):
  loop     transformers `model.generate` one prompt at a time (the plain baseline)
  batched  fastdraft's TransformersBackend (`generate.engine: transformers`): batches of `--batch-size`, left
           padding, one KV cache per batch
  lean     fastdraft's LeanBackend (`generate.engine: lean`): the same batches through the engine's own decoder,
           a KV cache with one length per row (no padding computed), finished rows leave the batch
  lean-bf16 (--lean-bf16) the lean engine with the target in bfloat16 (`generate.dtype`)
  ray      the whole generate stage (`run_generate`, engine `--ray-engine`): Ray Data actor pool, Parquet parts,
           manifest; wall time includes the actor's start and model load
Tokens are the responses' real tokens (padding after a stop is not counted). Prints a table and writes JSON
(`--out`, default runs/bench/bench_generate.json). The issue's goal: batched >= 4x loop at batch 16 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, under `ray job submit`

import torch  # noqa: E402

from fastdraft.config import PromptSourceConfig, recipe_from_dict  # noqa: E402
from fastdraft.generation.backends import LeanBackend, TransformersBackend  # noqa: E402
from fastdraft.generation.prompts import PromptEncoder, load_prompts  # noqa: E402
from fastdraft.speculative.types import SamplingParams  # noqa: E402
from jobs.benchlib import write_json  # noqa: E402


def loop_generate(backend: TransformersBackend, prompts: list[list[int]], max_new_tokens: int) -> int:
    """transformers' generate, one prompt at a time; returns the response tokens (up to the stop token)."""
    tokens = 0
    with torch.inference_mode():
        for ids in prompts:
            out = backend.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                         eos_token_id=list(backend.stop_ids), pad_token_id=backend.pad_id)
            new = out[0, len(ids):].tolist()
            tokens += next((i + 1 for i, t in enumerate(new) if t in backend.stop_ids), len(new))
    return tokens


def batched_generate(backend: TransformersBackend, prompts: list[list[int]], max_new_tokens: int) -> int:
    """A fastdraft backend on the whole chunk at once."""
    outs = backend.generate([(ids, SamplingParams(max_new_tokens=max_new_tokens)) for ids in prompts])
    return sum(len(o.token_ids) for o in outs)


def bench_in_process(backends: dict[str, TransformersBackend], prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int) -> dict:
    """Loop vs the batched backends, interleaved chunk by chunk so that all see the same load on a shared machine."""
    modes = {"loop": (loop_generate, backends["batched"]), **{name: (batched_generate, b) for name, b in backends.items()}}
    totals = {name: [0.0, 0] for name in modes}
    ordered = sorted(prompts, key=len)  # as the pipeline plans them: similar lengths share a batch
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        for name, (fn, backend) in modes.items():
            start = time.perf_counter()
            tokens = fn(backend, chunk, max_new_tokens)
            totals[name][0] += time.perf_counter() - start
            totals[name][1] += tokens
        print(f"[bench] chunk {i // batch_size + 1}: " + ", ".join(f"{n} {t[0]:.1f} s" for n, t in totals.items()) + " so far",
              flush=True)
    return {name: tuple(v) for name, v in totals.items()}


def bench_ray(model: str, n_prompts: int, max_new_tokens: int, batch_size: int, cpus: float, workdir: Path,
              engine: str) -> tuple[float, int]:
    from fastdraft.generation.pipeline import run_generate
    from fastdraft.raycluster import ensure_ray

    ensure_ray()
    recipe = recipe_from_dict({
        "name": "bench-generate", "workdir": str(workdir), "target": {"model": model},
        "generate": {"engine": engine, "prompts": [{"name": "code", "kind": "stdlib_code", "limit": n_prompts}],
                     "sampling": [{"temperature": 0.0, "max_new_tokens": max_new_tokens}], "max_prompt_tokens": 512,
                     "batch_size": batch_size, "min_actors": 1, "max_actors": 1, "cpus_per_actor": cpus},
    })
    start = time.perf_counter()
    summary = run_generate(recipe)
    return time.perf_counter() - start, summary["response_tokens"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="target directory or embedded:<name>")
    parser.add_argument("--prompts", type=int, default=32, help="number of stdlib code prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (and the Ray actor's CPUs); more than the free cores makes OpenMP crawl")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ray"], help="leave the Ray pipeline out")
    parser.add_argument("--ray-engine", default="lean", choices=["transformers", "lean"], help="the Ray stage's engine")
    parser.add_argument("--lean-bf16", action="store_true",
                        help="also time the lean engine with the target in bfloat16 (generate.dtype; AMX CPUs: ~1.6x float32)")
    parser.add_argument("--out", default="runs/bench/bench_generate.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    backends = {"batched": TransformersBackend(args.model), "lean": LeanBackend(args.model)}
    if args.lean_bf16:
        backends["lean-bf16"] = LeanBackend(args.model, dtype="bfloat16")
    source = PromptSourceConfig(name="code", kind="stdlib_code", limit=args.prompts)
    prompts = [p.prompt_ids for p in load_prompts(source, PromptEncoder(backends["batched"].tokenizer, 512))[0]]
    print(f"[bench] {len(prompts)} prompts, mean {sum(map(len, prompts)) / len(prompts):.0f} tokens, "
          f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, {args.threads} threads", flush=True)

    results = {}
    measured = bench_in_process(backends, prompts, args.max_new_tokens, args.batch_size)
    if "ray" not in args.skip:
        measured["ray"] = bench_ray(args.model, args.prompts, args.max_new_tokens, args.batch_size, args.threads,
                                    Path(tempfile.mkdtemp(prefix="bench-generate-")), args.ray_engine)
    for name, (seconds, tokens) in measured.items():
        results[name] = {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": tokens / seconds}
    base = results.get("loop", {}).get("tokens_per_s")
    for r in results.values():
        # Three significant figures, not two decimals: a tiny run's Ray row (start-up dominated) is ~0.005x.
        r["speedup_vs_loop"] = float(f"{r['tokens_per_s'] / base:.3g}") if base else None
        r["tokens_per_s"] = float(f"{r['tokens_per_s']:.4g}")

    print(f"\n{'mode':<9} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs loop':>8}")
    for name, r in results.items():
        print(f"{name:<9} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>8.1f} {r['speedup_vs_loop'] or 0:>7.3g}x")
    report = {"model": args.model, "prompts": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "ray_engine": args.ray_engine,
              "threads": args.threads, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "device": "cpu", "results": results}
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
