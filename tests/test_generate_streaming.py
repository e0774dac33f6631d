"""Generate never holds the prompt set, the plan, the written keys or the results in the driver.

What goes in: tens of thousands of prompts (tiny target, one new token each, so the engines are quick), a set
already half written by a first run, and a driver process that is killed the moment its resident memory grows
past a limit that the old driver (Python lists of every prompt and planned row, a set of every written key, every
result block) passes several times over. What must come out: the second run completes the set exactly once
(every key of the plan, none twice, the first run's parts untouched) within that limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

PROMPTS = 6_000
DRIVER_LIMIT_MB = 75
"""How much the driver's resident memory may grow while generate runs (a watchdog kills it beyond that). Measured
on 2 cores with these prompts: this driver grows by 46-49 MB at 3,000 prompts and 50 MB at 12,000 (Ray Data's executor,
flat); the old one (lists of prompts and rows, a set of keys, every result block) by 152 MB at 12,000, about 100 MB at
6,000 (its growth past the executor's is proportional to the prompts). 6,000 rather than 12,000 prompts: a minute less
of the suite, with the limit still 25 MB from either driver."""

DRIVER = textwrap.dedent("""
    import json, os, sys, threading, time
    # Everything generate imports, and Ray's client, come before the baseline: the limit is on what it holds.
    import ray, ray.data, torch, transformers
    from fastdraft.config import recipe_from_dict
    from fastdraft.generation.pipeline import run_generate

    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM, the peak from here on
        f.write("5")
    limit = base + int(sys.argv[2]) * 2**20

    def watchdog():
        while True:
            if status("VmRSS") > limit:
                print(f"DRIVER OVER ITS LIMIT: {(status('VmRSS') - base) / 2**20:.0f} MB", flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watchdog, daemon=True).start()
    summary = run_generate(recipe_from_dict(json.loads(sys.argv[1])))
    growth = (max(status("VmHWM"), base) - base) / 2**20
    print("SUMMARY", json.dumps({**summary, "driver_growth_mb": growth, "driver_base_mb": base / 2**20}), flush=True)
""")


def write_prompts(path: Path, n: int) -> Path:
    """`n` distinct instructions of about 120 tokens (chat template included) in the tiny vocabulary."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Question {i}: describe the number {i * 7919 % 100_003} in words, give "
                                               f"two facts about it, say whether it is prime or a perfect square, and "
                                               f"name a year in history that it recalls and what happened then."}) + "\n")
    return path


def big_recipe(workdir: Path, target: Path, prompts: Path, limit: int | None = None) -> dict:
    return {"name": "big-gen", "workdir": str(workdir), "target": {"model": str(target)},
            "generate": {"engine": "lean", "prompts": [{"name": "inst", "kind": "jsonl", "path": str(prompts), "limit": limit}],
                         "sampling": [{"temperature": 0.0, "max_new_tokens": 1}], "max_prompt_tokens": 128,
                         "batch_size": 512, "max_actors": 1, "cpus_per_actor": 1}}


def run_driver(recipe: dict, limit_mb: int, timeout: int, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(recipe), str(limit_mb)], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-4000:])
    return json.loads(out.stdout.split("SUMMARY ", 1)[1].splitlines()[0])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generate_resumes_a_large_prompt_set_exactly_once_with_flat_driver_memory(ray_session, tmp_path, tiny_target_dir):
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    first = run_driver(big_recipe(tmp_path / "run", tiny_target_dir, prompts, limit=PROMPTS // 4), 10_000, 840, env)
    assert first["rows"] == first["new_rows"] == PROMPTS // 4
    alignment = tmp_path / "run" / "alignment"
    before = {p: p.stat().st_mtime_ns for p in alignment.glob("part-*.parquet")}

    # raising a source's limit extends the set: the second run plans all prompts and skips the quarter written
    summary = run_driver(big_recipe(tmp_path / "run", tiny_target_dir, prompts), DRIVER_LIMIT_MB, 840, env)
    assert (summary["resumed_rows"], summary["new_rows"], summary["rows"]) == (PROMPTS // 4, PROMPTS * 3 // 4, PROMPTS)
    print(f"driver growth: {first['driver_growth_mb']:.0f} MB at {PROMPTS // 4} prompts, "
          f"{summary['driver_growth_mb']:.0f} MB at {PROMPTS} (resumed)")
    assert summary["driver_growth_mb"] < DRIVER_LIMIT_MB
    keys = pq.ParquetDataset(sorted(alignment.glob("part-*.parquet"))).read(columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == PROMPTS  # every planned row once
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the first run's parts are kept as they were
    manifest = json.loads((alignment / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["duplicates"] == 0 and manifest["counts"]["prompts"] == PROMPTS
    assert [r["new_rows"] for r in manifest["runs"]] == [PROMPTS // 4, PROMPTS * 3 // 4]
    assert not list(alignment.glob("prompts-*"))  # the run's prompt set is removed when it finishes


def test_the_planner_keys_seeds_and_skips_rows_already_written_without_ray():
    from fastdraft.config import SamplingConfig
    from fastdraft.generation.pipeline import plan_block, prompts_table, row_key
    from fastdraft.generation.prompts import EncodedPrompt, stable_seed

    import pyarrow as pa

    prompts = prompts_table([EncodedPrompt(f"s:{i}", "s", list(range(1, 6 - i % 3)), f"t{i}") for i in range(5)])
    settings = [SamplingConfig(max_new_tokens=4), SamplingConfig(temperature=0.8, n=2)]
    rows = plan_block(prompts, [s.model_dump() for s in settings], seed=7).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(row_key(f"s:{i}", s, j) for i in range(5) for s in settings for j in range(s.n))
    assert all(r["seed"] == stable_seed(7, r["key"]) for r in rows)
    greedy = [r for r in rows if r["temperature"] == 0]
    assert rows[:5] == greedy and [len(r["prompt_ids"]) for r in greedy] == sorted(len(r["prompt_ids"]) for r in greedy)
    done = pa.array([r["key"] for r in rows[::3]])
    rest = plan_block(prompts, [s.model_dump() for s in settings], seed=7, done=done).to_pylist()
    assert sorted(r["key"] for r in rest) == sorted(set(r["key"] for r in rows) - set(done.to_pylist()))
