"""Benchmark: load-test the served pair on loopback, speculation on vs off side by side.

For each concurrency (`--clients 1,4,16`), that many clients stream completions back to back, against one server
holding the pair, until a fixed list of requests is answered (`--requests`, default 8 per client, at least 16); the
two phases differ only in the request's `speculative` switch, so both run on the same replica and do the same work:
the same prompts and settings, in the same order. Request k takes prompt k and the k-th combination of the mix of
lengths and temperatures (`--max-tokens 4,64`, `--temperature 0,0.7`). Output tokens/s is the phase's tokens over
its makespan (a fixed time window would count only the requests finished in it, mostly short ones).
Reports requests/s, output tokens/s, latency and
time to first token (p50/p99), the longest gap between a request's streamed tokens (p50/p99 "stall": what
other requests' prefills cost a running one), the p99 latency per max_tokens and the short/long ratio (continuous batching: a
short request must not wait for long ones), 5xx responses (goal: 0), and the engine's AR and tau. With
`--kill-replica`, a last phase kills the model replica's process mid-load (greedy requests only), once a third of its
requests are answered, and reports failed requests, the time until a request completes again, and whether every
completed text equals the same request's text from an undisturbed phase (nothing lost, nothing answered twice).

    python jobs/bench_serve.py                                    # the demo's trained draft, else the agreeing pair
    python jobs/bench_serve.py --pair agreeing --clients 1,4,16 --kill-replica
    python jobs/bench_serve.py --pair agreeing --prefill-chunk 0                  # whole prefills, for comparison
    python jobs/bench_serve.py --target DIR --draft DIR --out runs/bench/serve.json
    python jobs/bench_serve.py --gamma 1 --lookup-tokens 0 --out runs/bench/serve-nolookup.json  # the demo pair, no lookup

Prints a table and writes JSON (default runs/bench/serve.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, under `ray job submit`

import httpx  # noqa: E402
from jobs.benchlib import write_json  # noqa: E402


@dataclass
class Sample:
    ok: bool
    start: float
    latency_s: float = 0.0
    ttft_s: float | None = None
    stall_s: float = 0.0
    """The longest wait between two streamed pieces after the first (a running request stalled by others' prefills)."""
    tokens: int = 0
    prompt_tokens: int = 0
    spec: dict = field(default_factory=dict)
    error: str = ""
    status: int = 200
    max_tokens: int = 0
    temperature: float = 0.0
    prompt: int = 0
    text: str = ""


# --------------------------------------------------------------------------------------------
# Pair and prompts
# --------------------------------------------------------------------------------------------
def truncated_draft(target: str, layers: int, out: Path) -> Path:
    """An untrained-but-plausible draft: the target's first `layers` layers, its embeddings and head."""
    from fastdraft.checkpoint import DraftMetadata, load_model, save_draft
    from fastdraft.speculative.pairs import truncated_copy
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(target)
    draft = truncated_copy(load_model(target), layers)
    meta = DraftMetadata(target=target, tokenizer_fingerprint=tokenizer_fingerprint(tok),
                         extra={"init": f"first {layers} layers of the target"})
    tmp = out.with_name(out.name + ".partial")
    save_draft(draft, tok, tmp, meta)
    tmp.rename(out)
    return out


def agreeing_pair_dirs(root: Path) -> tuple[Path, Path]:
    """The engine's "agreeing pair" saved as directories: a ~85M target whose layers past the first add
    nothing, and a 1-layer draft computing the same function (AR ~1), sharing a tiny tokenizer. It
    measures what serving adds to the engine, independent of how good a trained draft is."""
    from fastdraft.assets import build_tiny_tokenizer
    from fastdraft.checkpoint import DraftMetadata, save_draft
    from fastdraft.speculative.pairs import agreeing_pair
    from fastdraft.tokenizer import tokenizer_fingerprint

    target, draft = root / "target", root / "draft"
    if (draft / "config.json").is_file():
        return target, draft
    tok = build_tiny_tokenizer(root / "tokenizer", vocab_size=512)
    t, d = agreeing_pair(vocab_size=len(tok))
    t.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    meta = DraftMetadata(target=str(target), tokenizer_fingerprint=tokenizer_fingerprint(tok), extra={"init": "agreeing pair"})
    save_draft(d, tok, draft, meta)
    return target, draft


def resolve_spec(args):
    """The pair to serve: --target/--draft; else (--pair auto) the recipe's trained draft, else the agreeing pair."""
    from fastdraft.serving.app import recipe_from_args, resolve_pair
    from fastdraft.assets import resolve_model_path
    from fastdraft.errors import RecipeError

    base = {"recipe": args.recipe, "max_tokens_cap": max(max(args.max_tokens), 16), "max_batch_size": max(args.clients),
            "cpus_per_replica": args.cpus, "gamma": args.gamma, "prefill_chunk": args.prefill_chunk}
    if args.lookup_tokens is not None:  # else the recipe's serve.lookup
        base["lookup"] = {"tokens": args.lookup_tokens} if args.lookup_tokens else None
    if args.target:
        base = {**base, "target": args.target}
    if args.draft:
        return resolve_pair(recipe_from_args({**base, "draft": args.draft})), "given"
    if args.pair in ("auto", "recipe"):
        try:
            return resolve_pair(recipe_from_args(base)), "the recipe's trained draft"
        except RecipeError:
            if args.pair == "recipe":
                raise
    if args.pair == "truncated":
        target = str(resolve_model_path(recipe_from_args(base).target.model))
        draft = truncated_draft(target, args.draft_layers, Path("runs/bench") / f"first{args.draft_layers}-draft")
        return resolve_pair(recipe_from_args({**base, "draft": str(draft)})), f"first {args.draft_layers} target layers"
    target, draft = agreeing_pair_dirs(Path("runs/bench/agreeing"))
    return resolve_pair(recipe_from_args({**base, "target": str(target), "draft": str(draft)})), "agreeing pair"


def bench_prompts(n: int = 32, target: str | None = None, prompt_tokens: int | None = None) -> list[str]:
    """Half code (HumanEval prompts), half prose (stdlib docs): the paper's two kinds of task; with `prompt_tokens`,
    each cut to its first that many tokens of the `target`'s tokenizer (the agreeing pair's 512-token vocabulary
    spells a text in ~2.5x the tokens a real BPE vocabulary does, so its prompts cost ~2.5x the prefill)."""
    from fastdraft.assets import humaneval_problems, iter_stdlib_prose

    code = [p["prompt"] for p in humaneval_problems()[: n // 2]]
    prose = [t[:300] for _, t in zip(range(n // 2), iter_stdlib_prose())]
    prompts = code + prose
    if prompt_tokens:
        from fastdraft.tokenizer import load_tokenizer

        tok = load_tokenizer(target)
        prompts = [tok.decode(tok(p, add_special_tokens=False)["input_ids"][:prompt_tokens]) for p in prompts]
    return prompts


# --------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------
def one_request(client: httpx.Client, url: str, prompts: list[str], k: int, args, speculative: bool,
                greedy: bool = False) -> Sample:
    """Request k: prompt k, and the k-th (max_tokens, temperature) combination of the mix (temperature 0 if `greedy`)."""
    max_tokens = args.max_tokens[k % len(args.max_tokens)]
    temperature = 0.0 if greedy else args.temperature[(k // len(args.max_tokens)) % len(args.temperature)]
    body = {"prompt": prompts[k % len(prompts)], "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}, "speculative": speculative}
    start = time.perf_counter()
    s = Sample(ok=False, start=start, max_tokens=max_tokens, temperature=temperature, prompt=k % len(prompts))
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                s.status, s.error = r.status_code, f"HTTP {r.status_code}: {r.text[:200]}"
                return s
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:  # an in-band server error, after the 200 of a stream
                    s.status, s.error = 500, event["error"]["message"]
                    return s
                if event.get("usage"):
                    s.tokens, s.spec = event["usage"]["completion_tokens"], event["usage"].get("speculative", {})
                    s.prompt_tokens = event["usage"]["prompt_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    s.text += event["choices"][0]["text"]
                    now = time.perf_counter()
                    if s.ttft_s is None:
                        s.ttft_s = now - start
                    else:
                        s.stall_s = max(s.stall_s, now - last)
                    last = now
    except httpx.HTTPError as exc:
        s.status, s.error = 0, f"{type(exc).__name__}: {exc}"[:200]
        return s
    s.ok, s.latency_s = True, time.perf_counter() - start
    return s


def run_phase(url: str, prompts: list[str], args, clients: int, speculative: bool, requests: int,
              greedy_only: bool = False, on_answered=None) -> tuple[list[Sample], float]:
    """`clients` threads send requests 0..`requests`-1 back to back, each taking the next unsent one, until every one
    is answered; returns the samples and the makespan. `on_answered(n)` is called after each of them."""
    samples: list[Sample] = []
    lock = threading.Lock()
    sent = iter(range(requests))

    def client_loop() -> None:
        with httpx.Client(timeout=args.request_timeout) as client:
            while True:
                with lock:
                    k = next(sent, None)
                if k is None:
                    return
                s = one_request(client, url, prompts, k, args, speculative, greedy=greedy_only)
                with lock:
                    samples.append(s)
                    answered = len(samples)
                if on_answered:
                    on_answered(answered)
                if not s.ok:
                    time.sleep(0.5)  # a failing server is not hammered in a tight loop

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples, time.perf_counter() - t0


def phase_requests(args, clients: int) -> int:
    return args.requests or max(16, 8 * clients)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(name: str, clients: int, samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    lat = [s.latency_s for s in ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    spec = {k: sum(s.spec.get(k, 0) for s in ok) for k in ("drafted", "accepted", "target_passes", "emitted")}
    by_length = {m: pct([s.latency_s for s in ok if s.max_tokens == m], 99) for m in sorted({s.max_tokens for s in ok})}
    short, long = (by_length[min(by_length)], by_length[max(by_length)]) if len(by_length) > 1 else (None, None)
    return {
        "phase": name, "clients": clients, "requests": len(ok), "errors": len(samples) - len(ok),
        "http_5xx": sum(1 for s in samples if not s.ok and s.status >= 500), "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s, "output_tokens_per_s": sum(s.tokens for s in ok) / wall_s,
        "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95), "latency_p99_s": pct(lat, 99),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "stall_p50_s": pct([s.stall_s for s in ok], 50), "stall_p99_s": pct([s.stall_s for s in ok], 99),
        "mean_latency_s": statistics.fmean(lat) if lat else None,
        # Every request's prefill is the same work with speculation on or off: it bounds the tokens/s speedup.
        "mean_prompt_tokens": statistics.fmean(s.prompt_tokens for s in ok) if ok else None,
        "mean_output_tokens": statistics.fmean(s.tokens for s in ok) if ok else None,
        "latency_p99_by_max_tokens": by_length,
        "short_over_long_p99": short / long if short and long else None,
        "AR": spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0,
        "tau": spec["emitted"] / spec["target_passes"] if spec["target_passes"] else 0.0,
        "first_errors": sorted({s.error for s in samples if not s.ok})[:3],
    }


def kill_phase(url: str, prompts: list[str], args, clients: int, requests: int, reference: dict) -> dict:
    """Greedy speculative load with the model replica's process killed once a third of the requests are answered;
    every completed text is compared with the same request's text from an undisturbed phase (`reference`:
    (prompt, max_tokens) -> text)."""
    from ray import serve

    from fastdraft.serving.app import APP_NAME

    handle = serve.get_deployment_handle("SpeculativePair", APP_NAME)
    pid = handle.info.remote().result()["pid"]
    killed: dict = {}

    def killer(answered: int) -> None:
        if answered >= requests // 3 and not killed:
            killed["at"] = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            print(f"[bench] killed the model replica (pid {pid}), {answered} of {requests} requests answered", flush=True)

    samples, wall = run_phase(url, prompts, args, clients, True, requests, greedy_only=True, on_answered=killer)
    out = summarize("speculative + replica killed", clients, samples, wall)
    # Recovery: from the kill until the server completes a request again (continued or new).
    after = sorted((s for s in samples if s.ok and s.start + s.latency_s > killed["at"]), key=lambda s: s.start + s.latency_s)
    out["killed_pid"] = pid
    out["failed_requests"] = out["errors"]
    out["recovery_s"] = (after[0].start + after[0].latency_s - killed["at"]) if after else None
    compared = [s for s in samples if s.ok and (s.prompt, s.max_tokens) in reference]
    out["texts_compared"] = len(compared)
    out["texts_differing"] = sum(1 for s in compared if s.text != reference[(s.prompt, s.max_tokens)])
    try:
        out["new_pid"] = handle.info.remote().result(timeout_s=120)["pid"]
    except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
        out["new_pid"] = f"unavailable: {exc}"
    return out


# --------------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    cols = [("phase", "phase", "{}"), ("clients", "c", "{}"), ("requests", "req", "{}"), ("errors", "err", "{}"),
            ("http_5xx", "5xx", "{}"), ("requests_per_s", "req/s", "{:.2f}"),
            ("output_tokens_per_s", "tok/s", "{:.1f}"), ("latency_p50_s", "p50 s", "{:.2f}"),
            ("latency_p95_s", "p95 s", "{:.2f}"), ("latency_p99_s", "p99 s", "{:.2f}"), ("ttft_p50_s", "ttft50", "{:.3f}"),
            ("ttft_p99_s", "ttft99", "{:.3f}"), ("stall_p99_s", "stall99", "{:.3f}"), ("short_over_long_p99", "p99 short/long", "{:.2f}"), ("AR", "AR", "{:.2f}"),
            ("tau", "tau", "{:.2f}")]
    cells = [[h for _, h, _ in cols]] + [["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="jobs/recipes/demo.yaml", help="recipe whose target/draft/serve section to use")
    p.add_argument("--target", default=None, help="target directory (overrides the recipe)")
    p.add_argument("--draft", default=None, help="draft directory (default: the recipe's trained draft)")
    p.add_argument("--pair", choices=["auto", "recipe", "agreeing", "truncated"], default="auto",
                   help="auto: the recipe's trained draft if there is one, else the agreeing pair; truncated: the "
                        "target's first --draft-layers layers as an untrained draft")
    p.add_argument("--draft-layers", type=int, default=4)
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    floats = lambda v: [float(x) for x in v.split(",")]  # noqa: E731
    p.add_argument("--clients", type=ints, default=[1, 4, 16], help="concurrencies, e.g. 1,4,16")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per phase (default: 8 per client, at least 16); both phases answer the same ones")
    p.add_argument("--max-tokens", type=ints, default=[4, 64], help="max_tokens of the requests, mixed: e.g. 4,64")
    p.add_argument("--temperature", type=floats, default=[0.0, 0.7], help="temperatures, mixed: e.g. 0,0.7")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="cut every prompt to its first N tokens of the target's tokenizer (default: whole prompts)")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--lookup-tokens", type=int, default=None,
                   help="serve.lookup.tokens: context lookup beside the draft (0: off; default: the recipe's serve.lookup)")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="serve.prefill_chunk: prompt tokens fed per round while others generate (0: whole prompts)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs of the model replica")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--kill-replica", action="store_true", help="add a phase that kills the model replica mid-load")
    p.add_argument("--out", default="runs/bench/serve.json")
    args = p.parse_args(argv)

    from ray import serve

    from fastdraft.serving.app import APP_NAME, build_pair_app
    from fastdraft.raycluster import ensure_ray

    spec, source = resolve_spec(args)
    prompts = bench_prompts(target=str(spec.target), prompt_tokens=args.prompt_tokens)
    ensure_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_pair_app(spec), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    print(f"[bench] target {spec.target}\n[bench] draft  {spec.draft} ({source}), gamma {args.gamma}; "
          f"{args.clients} clients, {', '.join(str(phase_requests(args, c)) for c in args.clients)} requests per phase, "
          f"max_tokens {args.max_tokens}, "
          f"T {args.temperature}, prefill chunk {args.prefill_chunk or 'off (whole prompts)'}", flush=True)
    try:
        with httpx.Client(timeout=args.request_timeout) as c:  # warm-up: first calls pay one-off costs
            for sp in (True, False):
                one_request(c, url, prompts, 0, args, sp)
        rows, speedups = [], {}
        for clients in args.clients:
            pair = []
            for name, speculative in (("speculative", True), ("target alone", False)):
                print(f"[bench] phase: {name}, {clients} clients", flush=True)
                samples, wall = run_phase(url, prompts, args, clients, speculative, phase_requests(args, clients))
                pair.append(summarize(name, clients, samples, wall))
            rows += pair
            speedups[clients] = (pair[0]["output_tokens_per_s"] / pair[1]["output_tokens_per_s"]
                                 if pair[1]["output_tokens_per_s"] else None)
        if args.kill_replica:
            print("[bench] phase: speculative + replica killed", flush=True)
            top, n = max(args.clients), phase_requests(args, max(args.clients))
            reference_samples, _ = run_phase(url, prompts, args, top, True, n, greedy_only=True)
            reference = {(s.prompt, s.max_tokens): s.text for s in reference_samples if s.ok}
            rows.append(kill_phase(url, prompts, args, top, n, reference))
    finally:
        serve.shutdown()
    top = max(args.clients)
    spec_top = next(r for r in rows if r["phase"] == "speculative" and r["clients"] == top)
    result = {
        "target": spec.target, "draft": spec.draft, "draft_source": source, "gamma": args.gamma,
        "prefill_chunk": args.prefill_chunk, "prompt_tokens": args.prompt_tokens,
        "clients": args.clients, "requests": {c: phase_requests(args, c) for c in args.clients}, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "phases": rows, "speedup_tokens_per_s": speedups,
        "goals": {
            f"p99 latency {min(args.max_tokens)}-token / {max(args.max_tokens)}-token at {top} clients (<= 0.25)":
                spec_top["short_over_long_p99"],
            "5xx responses (0)": sum(r["http_5xx"] for r in rows),
            **({f"speculative / target alone tokens/s at {c} clients (>= 2 with the agreeing pair)": speedups[c]
                for c in args.clients if c == 4}),
        },
        "cpu_count": os.cpu_count(),
    }
    print()
    print_table(rows)
    print()
    for c, x in speedups.items():
        print(f"speculative / target alone, output tokens/s, {c} clients: {x:.2f}x")
    if args.kill_replica:
        k = rows[-1]
        print(f"replica kill: {k['failed_requests']} failed requests, recovery {k['recovery_s']} s "
              f"(pid {k['killed_pid']} -> {k['new_pid']}); {k['texts_differing']} of {k['texts_compared']} completed "
              f"texts differ from the undisturbed run")
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
