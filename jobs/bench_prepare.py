"""Benchmark: the prepare pipeline vs a plain `tokenizers` batch-encode loop, and its memory at 1x and 10x.

    python jobs/bench_prepare.py                          # 4 MB of stdlib code as 1x, 10x = 40 MB
    python jobs/bench_prepare.py --mb 1 --factor 5 --out runs/bench/prepare.json

Both sides tokenize the same JSONL text with the target's tokenizer (the embedded SmolLM2 by default),
side by side in one run on the same cores. The pipeline's time includes starting its actor pool.
Peak memory is the driver's (sampled RSS during the run) plus the largest actor's (`ru_maxrss`,
reported per shard in the manifest); streaming means it should not grow with the corpus.
Goals (issue 3): pipeline tokens/s >= 0.8x the plain loop; peak memory flat from 1x to 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, under `ray job submit`

from jobs.benchlib import write_json  # noqa: E402


def write_corpus(out: Path, mb: float, copies: int) -> Path:
    """`copies` JSONL files, each ~`mb` MB of stdlib sources (one document per source file)."""
    from fastdraft.assets import iter_stdlib_code_files

    out.mkdir(parents=True, exist_ok=True)
    lines, size = [], 0
    for path in iter_stdlib_code_files():
        line = json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n"
        lines.append(line)
        size += len(line)
        if size >= mb * 2**20:
            break
    for i in range(copies):
        (out / f"part-{i:03d}.jsonl").write_text("".join(lines))
    return out


def baseline(files: list[Path], tokenizer_dir: str, batch: int) -> dict:
    """A plain loop: read the JSONL, `Tokenizer.encode_batch_fast` `batch` documents at a time."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    start, tokens = time.perf_counter(), 0
    for f in files:
        docs = []
        with open(f) as fh:
            for line in fh:
                docs.append(json.loads(line)["text"])
                if len(docs) == batch:
                    tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs, add_special_tokens=False))
                    docs = []
        if docs:
            tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


class RssSampler:
    """Peak resident memory of this process, sampled every 20 ms while active."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def pipeline(corpus: Path, workdir: Path, target: str, args) -> dict:
    from fastdraft.config import Recipe
    from fastdraft.data.pipeline import run_prepare

    recipe = Recipe.model_validate({
        "name": "bench-prepare", "workdir": str(workdir), "target": {"model": target},
        "prepare": {"seq_len": 512, "validation_fraction": 0.01, "docs_per_batch": args.batch, "min_actors": args.actors,
                    "max_actors": args.actors, "cpus_per_actor": 1, "corpora": {"bench": {"sources": [
                        {"name": "code", "kind": "jsonl", "path": str(corpus / "*.jsonl")}]}}},
    })
    with RssSampler() as rss:
        start = time.perf_counter()
        run_prepare(recipe)
        seconds = time.perf_counter() - start
    manifest = json.loads((workdir / "data" / "bench" / "manifest.json").read_text())
    tokens = manifest["sources"]["code"]["tokens_read"]
    return {"tokens": tokens, "tokens_written": manifest["sources"]["code"]["tokens"], "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds), "driver_peak_rss_mb": round(rss.peak / 2**20, 1),
            "actor_peak_rss_mb": manifest["actor_peak_rss_mb"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="size of the 1x corpus in MB of text")
    parser.add_argument("--factor", type=int, default=10, help="the larger corpus is this many times the 1x one")
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct", help="whose tokenizer to use")
    parser.add_argument("--actors", type=int, default=2, help="actor pool size (= cores used by the plain loop too)")
    parser.add_argument("--batch", type=int, default=256, help="documents per tokenize call, both sides")
    parser.add_argument("--out", default="runs/bench/prepare.json")
    args = parser.parse_args()

    import ray

    from fastdraft.assets import resolve_model_path

    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the plain loop may use every core (rayon), as a user's would
    tokenizer_dir = str(resolve_model_path(args.target))
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    rows = []
    try:
        for scale in (1, args.factor):
            corpus = write_corpus(tmp / f"corpus{scale}x", args.mb, scale)
            base = baseline(sorted(corpus.glob("*.jsonl")), tokenizer_dir, args.batch)
            pipe = pipeline(corpus, tmp / f"run{scale}x", args.target, args)
            rows.append({"scale": f"{scale}x", "mb": args.mb * scale, "baseline": base, "pipeline": pipe,
                         "ratio": round(pipe["tokens_per_s"] / base["tokens_per_s"], 3)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    one, big = rows[0]["pipeline"], rows[-1]["pipeline"]
    result = {"target": args.target, "cores": args.actors, "batch": args.batch, "rows": rows,
              "memory_growth": round((big["driver_peak_rss_mb"] + big["actor_peak_rss_mb"]) /
                                     (one["driver_peak_rss_mb"] + one["actor_peak_rss_mb"]), 3),
              "goals": {"ratio": ">= 0.8", "memory_growth": "~1.0 (flat)"}}
    print(f"{'scale':>6} {'MB':>6} {'tokens':>11} {'plain tok/s':>12} {'pipeline tok/s':>15} {'ratio':>6} {'driver MB':>10} {'actor MB':>9}")
    for r in rows:
        p = r["pipeline"]
        print(f"{r['scale']:>6} {r['mb']:>6.1f} {p['tokens']:>11,} {r['baseline']['tokens_per_s']:>12,} {p['tokens_per_s']:>15,} "
              f"{r['ratio']:>6.2f} {p['driver_peak_rss_mb']:>10.0f} {p['actor_peak_rss_mb']:>9.0f}")
    print(f"peak memory {args.factor}x / 1x: {result['memory_growth']:.2f}")
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
