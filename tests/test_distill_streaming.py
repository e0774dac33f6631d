"""Distill never holds the alignment set in the driver: it streams through Ray Data to the Ray Train workers.

What goes in: an alignment set whose rows (with the target's top-8 per token) take more memory than the
driver is allowed for this test, and a driver process that is killed the moment its resident memory grows past
that limit. What must come out: distill finishes, trains on rows of every part file, and writes drafts/FT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

DRIVER_LIMIT_MB = 250
"""How much the driver's resident memory may grow while distill runs (a watchdog kills it beyond that). Ray's
own client in the driver takes about 100 MB of it."""


def _nested(lengths: np.ndarray, inner: int, values: np.ndarray) -> pa.Array:
    """list<list<value>>: `lengths[i]` lists of `inner` values each, per row."""
    flat = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, inner, dtype=np.int32)), pa.array(values))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), flat)


def write_big_alignment(directory: Path, fingerprint: str, vocab: int, files: int, rows: int, prompt_len: int = 8,
                        response_len: int = 48, k: int = 8) -> int:
    """Random prompt/response rows with a top-k teacher, `files` part files; returns the uncompressed bytes."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    size = 0
    for f in range(files):
        ids = [f"f{f}-r{r}" for r in range(rows)]
        prompts = rng.integers(3, vocab, (rows, prompt_len), dtype=np.int32)
        responses = rng.integers(3, vocab, (rows, response_len), dtype=np.int32)
        lengths = np.full(rows, response_len)
        table = pa.table({
            "key": ids, "prompt_id": ids,
            "prompt_ids": pa.ListArray.from_arrays(pa.array(np.arange(0, rows * prompt_len + 1, prompt_len, dtype=np.int32)), pa.array(prompts.ravel())),
            "response_ids": pa.ListArray.from_arrays(pa.array(np.arange(0, rows * response_len + 1, response_len, dtype=np.int32)), pa.array(responses.ravel())),
            "topk_ids": _nested(lengths, k, rng.integers(3, vocab, rows * response_len * k, dtype=np.int32)),
            "topk_logprobs": _nested(lengths, k, np.log(rng.dirichlet(np.ones(k + 1), rows * response_len)[:, :k]).astype(np.float32).ravel()),
        })
        pq.write_table(table, directory / f"part-{f:05d}.parquet")
        size += table.nbytes
    (directory / "manifest.json").write_text(json.dumps({
        "complete": True, "tokenizer_fingerprint": fingerprint, "counts": {"rows": files * rows},
        "settings": [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "n": 1}], "section_hash": f"big-{files}-{rows}"}))
    return size


DRIVER = textwrap.dedent("""
    import os, sys, threading, time
    # Everything distill imports comes before the baseline: the limit is on the memory it holds, not on code.
    import ray, ray.data, ray.train.torch, torch, transformers
    from fastdraft.config import recipe_from_dict
    from fastdraft.training.distill import run_distill

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    limit, peak = rss() + int(sys.argv[2]) * 2**20, [0]

    def watchdog():
        while True:
            peak[0] = max(peak[0], rss())
            if peak[0] > limit:
                print(f"DRIVER OVER ITS LIMIT: {peak[0] / 2**20:.0f} MB", flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watchdog, daemon=True).start()
    import json
    summary = run_distill(recipe_from_dict(json.loads(sys.argv[1])))
    print("SUMMARY", json.dumps({**summary, "driver_growth_mb": (peak[0] - limit) / 2**20 + int(sys.argv[2])}), flush=True)
""")


@pytest.mark.timeout(900)
def test_distill_streams_an_alignment_set_larger_than_the_drivers_memory_limit(tmp_path, tiny_target_dir, tiny_draft_dir):
    from fastdraft.checkpoint import load_config, read_metadata

    fingerprint = read_metadata(tiny_draft_dir).tokenizer_fingerprint
    run = tmp_path / "run"
    size = write_big_alignment(run / "alignment", fingerprint, load_config(tiny_target_dir).vocab_size, files=40, rows=3000)
    assert size > 1.2 * DRIVER_LIMIT_MB * 2**20  # the Arrow table alone would not fit, let alone Python lists of it
    recipe = {"name": "big", "workdir": str(run), "target": {"model": str(tiny_target_dir)},
              "distill": {"init": str(tiny_draft_dir), "loss": "ce+kl", "tokens": 4096, "seq_len": 64,
                          "micro_batch_size": 4, "optim": {"lr": 1e-3, "warmup_steps": 1}, "eval_prompts": 4,
                          "eval_every": 8, "ckpt_every": 8, "compute": {"num_workers": 1, "cpus_per_worker": 0.5}}}
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(recipe), str(DRIVER_LIMIT_MB)],
                         capture_output=True, text=True, timeout=840)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    summary = json.loads(out.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["train_rows"] > 40 * 3000 * 56 // 64 * 0.9  # every file's samples were packed (about 7 per 8 rows)
    assert summary["driver_growth_mb"] < DRIVER_LIMIT_MB
    assert read_metadata(run / "drafts" / "FT").stages[-1] == "FT"
