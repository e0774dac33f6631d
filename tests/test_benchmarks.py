"""The README's benchmark commands run end to end at a tiny size and write what they print.

Each runs as the README shows it (`python jobs/bench_*.py`, from the repo root, in its own process and its
own Ray where it uses one), with flags that shrink the work to seconds. Speed itself is never asserted here
(a shared 2-core machine): only that every side of the comparison ran and that the JSON carries the ratio.
`python -m jobs.bench_engine` is covered in test_speculative_bench.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, timeout: int = 400) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, as on a laptop
    res = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_readme_lists_every_benchmark_job():
    readme = (REPO / "README.md").read_text()
    for script in sorted(p.name for p in (REPO / "jobs").glob("bench_*.py")):
        assert script.removesuffix(".py") in readme, f"README does not mention {script}"


@pytest.mark.timeout(420)
def test_bench_prepare_compares_the_pipeline_with_a_plain_loop_at_two_sizes(smollm2_dir, tmp_path):
    out = tmp_path / "prepare.json"
    stdout = run_bench("bench_prepare.py", "--mb", "0.05", "--factor", "2", "--actors", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert [r["scale"] for r in result["rows"]] == ["1x", "2x"]
    for row in result["rows"]:
        assert row["pipeline"]["tokens"] > 0 and row["baseline"]["tokens_per_s"] > 0 and row["ratio"] > 0
    assert result["memory_growth"] > 0
    assert "pipeline tok/s" in stdout and f"wrote {out}" in stdout


@pytest.mark.timeout(420)
def test_bench_generate_times_the_loop_both_batched_engines_and_the_ray_pipeline(tiny_target_dir, tmp_path):
    out = tmp_path / "generate.json"
    stdout = run_bench("bench_generate.py", "--model", str(tiny_target_dir), "--prompts", "4", "--batch-size", "2",
                       "--max-new-tokens", "4", "--lean-bf16", "--out", str(out))
    result = json.loads(out.read_text())["results"]
    assert set(result) == {"loop", "batched", "lean", "lean-bf16", "ray"}
    for row in result.values():
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["speedup_vs_loop"] > 0
    assert "vs loop" in stdout


@pytest.mark.timeout(420)
def test_bench_train_compares_ray_train_with_a_plain_loop(smollm2_dir, tmp_path):
    out = tmp_path / "train.json"
    run_bench("bench_train.py", "--target", str(smollm2_dir), "--layers", "1", "--hidden", "64", "--seq-len", "32", "--micro-batch", "2",
              "--steps", "4", "--cpus-per-worker", "0.5", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["ratio_per_worker"] > 0 and result["ray_train"]["world_size"] == 1
    assert result["plain"]["tokens_per_s_before"] > 0 and result["plain"]["tokens_per_s_after"] > 0


@pytest.mark.timeout(420)
def test_bench_serve_measures_speculative_and_target_alone_over_http(tiny_target_dir, tmp_path):
    out = tmp_path / "serve.json"
    stdout = run_bench("bench_serve.py", "--target", str(tiny_target_dir), "--pair", "truncated", "--draft-layers", "1",
                       "--clients", "1,2", "--requests", "4", "--max-tokens", "2,8", "--temperature", "0,0.7", "--cpus", "0.5",
                       "--out", str(out))
    result = json.loads(out.read_text())
    assert [(p["phase"], p["clients"]) for p in result["phases"]] == [
        ("speculative", 1), ("target alone", 1), ("speculative", 2), ("target alone", 2)], result["phases"]
    assert all(p["errors"] == 0 and p["http_5xx"] == 0 and p["requests"] > 0 and p["output_tokens_per_s"] > 0
               for p in result["phases"])
    assert all(x > 0 for x in result["speedup_tokens_per_s"].values())
    assert set(result["phases"][2]["latency_p99_by_max_tokens"]) <= {"2", "8"}  # JSON keys
    assert "speculative / target alone, output tokens/s, 2 clients" in stdout
