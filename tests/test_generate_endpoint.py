"""`generate.engine: openai`: the alignment set from a REAL OpenAI-compatible HTTP endpoint on loopback.

The endpoint is `tests/minimal_openai_server.py` (a minimal FastAPI + uvicorn server around the real tiny
transformers target, in its own process; fastdraft.serving has no logprobs and no token ids yet), reached directly
or through `FaultProxy` (429s, 503s, connections dropped before and after the server did the work).

Specification:
- rows from the endpoint equal the local transformers engine's (greedy and seeded samples), top-k teacher too,
  in the same columns (distill packs them as it packs local ones); each row and the manifest say they came from
  the endpoint, and how the prompt was sent;
- 429s, 503s and dropped connections are retried with backoff: the set is complete, every key once, same rows;
- a set resumed across engines mixes local and endpoint rows, and the manifest records which came from where;
- the server dying mid-run and coming back within the retries loses and doubles nothing; dying for longer fails
  the run after its retries, and once it is back a rerun completes the set exactly once (no row lost, none twice,
  rows written before the crash kept as they were); a job SIGKILLed mid-run resumes exactly once too;
- retryable failures (429, 5xx, timeouts, dropped connections) are retried, other 4xx fail at once; the request
  rate is limited; the API key comes from the named environment variable;
- a server that refuses token-id prompts gets the text, re-tokenized by the server, with the same answers;
- an endpoint with another tokenizer is refused before anything is written (fingerprint, or probes), naming both;
- the endpoint settings are typed: unknown keys, a missing section, concurrency above the batch are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from endpoint_fixtures import FaultProxy, LoopbackServer
from fastdraft.assets import build_tiny_tokenizer
from fastdraft.config import OpenAIEndpointConfig, recipe_from_dict
from fastdraft.errors import FastdraftError, RecipeError, TokenizerMismatchError
from fastdraft.generation.backends import TransformersBackend
from fastdraft.generation.endpoint import (
    OpenAIBackend, backoff_s, check_endpoint_tokenizer, resolve_prompt_format,
)
from fastdraft.generation.pipeline import run_generate
from fastdraft.speculative.types import SamplingParams
from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
INSTRUCTIONS = [
    "Write a haiku about the sea.", "Explain what a hash map is.", "List three primary colors.",
    "Translate 'good morning' to French.", "Give a synonym for happy.", "What is the boiling point of water?",
    "Summarize Hamlet in one line.", "Name a prime number above 50.", "Describe a cat to a child.",
    "Suggest a name for a bakery.",
]
SAMPLING = [{"temperature": 0.0, "max_new_tokens": 12}, {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 12, "n": 2}]
ROWS = (len(INSTRUCTIONS) + 2) * 3
TOPK = 3
FAST_RETRIES = {"backoff_initial_s": 0.05, "backoff_max_s": 0.5}


def endpoint_recipe(*args, **kwargs):
    return recipe_from_dict(endpoint_data(*args, **kwargs))


def endpoint_data(workdir: Path, target: Path, prompts: Path, base_url: str | None, limit: int | None = None,
                  engine: str = "openai", batch_size: int = 4, **openai) -> dict:
    generate = {
        "engine": engine,
        "prompts": [{"name": "inst", "kind": "jsonl", "path": str(prompts), "limit": limit},
                    {"name": "code", "kind": "stdlib_code", "limit": 2}],
        "sampling": SAMPLING, "max_prompt_tokens": 256, "batch_size": batch_size, "store_topk": TOPK,
        "cpus_per_actor": 0.5, "max_actors": 1,
    }
    if engine == "openai":
        generate["openai"] = {"base_url": base_url, "model": "tiny", "max_concurrency": min(4, batch_size), **FAST_RETRIES, **openai}
    return {"name": "endpoint-test", "workdir": str(workdir), "target": {"model": str(target)}, "generate": generate}


def read_rows(run_dir: Path) -> dict[str, dict]:
    rows = {}
    for part in sorted((run_dir / "alignment").glob("part-*.parquet")):
        for r in pq.read_table(part).to_pylist():
            assert r["key"] not in rows, f"key {r['key']} written twice"
            rows[r["key"]] = r
    return rows


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "alignment" / "manifest.json").read_text())


def answer(r: dict) -> tuple:
    return r["response_ids"], r["finish_reason"], r["topk_ids"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "instructions.jsonl"
    path.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in INSTRUCTIONS))
    return path


@pytest.fixture(scope="module")
def server(tiny_target_dir, tmp_path_factory):
    """The loopback endpoint, advertising the target's tokenizer fingerprint on GET /v1/models."""
    srv = LoopbackServer(tiny_target_dir, tmp_path_factory.mktemp("server-logs")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(tiny_target_dir):
    return TransformersBackend(tiny_target_dir, store_topk=TOPK)


@pytest.fixture(scope="module")
def endpoint_run(ray_session, server, tmp_path_factory, tiny_target_dir, prompts_file):
    """One uninterrupted run against the endpoint: the reference of the other tests."""
    recipe = endpoint_recipe(tmp_path_factory.mktemp("endpoint"), tiny_target_dir, prompts_file, server.base_url)
    summary = run_generate(recipe)
    return recipe, summary, read_rows(recipe.run_dir)


def requests_of(rows) -> list:
    return [(r["prompt_ids"], SamplingParams(temperature=r["temperature"], top_p=r["top_p"], top_k=r["top_k"],
                                             max_new_tokens=r["max_new_tokens"], seed=r["seed"])) for r in rows]


# ---------------------------------------------------------------------------------------------- the set
@pytest.mark.timeout(420)
def test_endpoint_rows_equal_the_local_engine_and_say_where_they_came_from(endpoint_run, local, server, tiny_target_dir):
    recipe, summary, rows = endpoint_run
    assert summary["rows"] == len(rows) == ROWS
    values = list(rows.values())
    for r, ref in zip(values, local.generate(requests_of(values))):  # same model, same seeds: the same answers
        assert (r["response_ids"], r["finish_reason"]) == (ref.token_ids, ref.finish_reason), r["key"]
        assert r["topk_ids"] == ref.topk_ids and len(r["topk_ids"]) == len(r["response_ids"])
        assert all(len(k) == TOPK for k in r["topk_ids"])
        flat = [lp for row in r["topk_logprobs"] for lp in row]
        assert flat == pytest.approx([lp for row in ref.topk_logprobs for lp in row], abs=1e-5)
        assert r["origin"] == f"endpoint:tiny@{server.base_url}"
        assert (r["prompt_mode"], r["response_mode"]) == ("token_ids", "token_ids")
    tok = load_tokenizer(tiny_target_dir)
    inst = [r for r in values if r["source"] == "inst"]  # fastdraft applied the chat template itself
    assert all(r["prompt_text"].startswith("<|im_start|>user\n") for r in inst) and len(inst) == 30
    m = manifest_of(recipe.run_dir)
    assert m["complete"] and m["engine"] == "openai" and m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert m["endpoint"]["tokenizer_check"] == {"method": "fingerprint", "fingerprint": tokenizer_fingerprint(tok)}
    assert m["endpoint"]["prompt_format"] == "token_ids" and "fastdraft" in m["endpoint"]["chat_template"]
    assert m["counts"]["by_origin"] == {f"endpoint:tiny@{server.base_url}": ROWS}
    assert m["counts"]["by_prompt_mode"] == {"token_ids": ROWS} and m["counts"]["duplicates"] == 0
    assert [(run["engine"], run["finished"], run["new_rows"]) for run in m["runs"]] == [("openai", True, ROWS)]
    assert {"topk_ids", "topk_logprobs", "origin", "prompt_mode"} <= set(m["columns"])


@pytest.mark.timeout(420)
def test_one_recipe_sends_one_source_to_the_endpoint_and_another_to_a_local_engine(endpoint_run, server, tmp_path,
                                                                                     tiny_target_dir, prompts_file):
    """`generate.prompts[].engine`: the instructions go to the endpoint, the code prompts to the local transformers
    engine, in one run. Every row says where it came from, and the set equals the all-endpoint one."""
    _, _, reference = endpoint_run
    data = endpoint_data(tmp_path / "mixed", tiny_target_dir, prompts_file, server.base_url)
    data["generate"]["engine"] = "transformers"
    data["generate"]["prompts"][0]["engine"] = "openai"
    recipe = recipe_from_dict(data)
    summary = run_generate(recipe)
    rows = read_rows(recipe.run_dir)
    origin = f"endpoint:tiny@{server.base_url}"
    assert rows.keys() == reference.keys() and summary["new_rows"] == ROWS
    assert all(answer(rows[k]) == answer(reference[k]) for k in rows)  # same model, same seeds, either engine
    assert {r["origin"] for r in rows.values() if r["source"] == "inst"} == {origin}
    assert {r["origin"] for r in rows.values() if r["source"] == "code"} == {"local:transformers"}
    m = manifest_of(recipe.run_dir)
    assert m["counts"]["by_origin"] == {origin: 30, "local:transformers": ROWS - 30}
    assert m["runs"][-1]["origin"] == "mixed"
    assert m["runs"][-1]["origin_by_source"] == {"inst": origin, "code": "local:transformers"}
    assert m["endpoint"]["tokenizer_check"]["method"] == "fingerprint"  # the endpoint was checked all the same


def test_an_endpoint_section_no_source_uses_is_refused(tmp_path, tiny_target_dir, prompts_file):
    data = endpoint_data(tmp_path, tiny_target_dir, prompts_file, "http://127.0.0.1:1")
    data["generate"]["engine"] = "lean"
    with pytest.raises(RecipeError, match="generate.openai is set but no source uses it"):
        recipe_from_dict(data)
    data["generate"].pop("openai")
    data["generate"]["prompts"][1]["engine"] = "openai"
    with pytest.raises(RecipeError, match=r"prompts\[\]\.engine of code\) needs a generate.openai section"):
        recipe_from_dict(data)


@pytest.mark.timeout(120)
def test_distill_reads_the_endpoint_teacher_as_the_local_one(endpoint_run, tiny_target_dir):
    import torch

    from fastdraft.training.distill import REQUIRED_COLUMNS, TOPK_COLUMNS, iter_examples, pack_examples, read_alignment
    from fastdraft.training.losses import sparse_kd

    recipe, _, _ = endpoint_run
    fingerprint = tokenizer_fingerprint(load_tokenizer(tiny_target_dir))
    files, _ = read_alignment(recipe.run_dir / "alignment", fingerprint, "draft", need_topk=True)
    examples = list(iter_examples(files, set(), False, (*REQUIRED_COLUMNS, *TOPK_COLUMNS)))  # every row: none held out
    packed, _ = pack_examples(examples, 128, 0, True, topk=TOPK)
    assert packed["topk_ids"].shape[-1] == TOPK and (packed["topk_ids"][packed["loss_mask"] > 0] >= 0).all()
    kl, tvd = sparse_kd(torch.randn(*packed["input_ids"].shape, 512), torch.tensor(packed["topk_ids"]),
                        torch.tensor(packed["topk_logprobs"]))
    assert torch.isfinite(kl).all() and torch.isfinite(tvd).all()


@pytest.mark.timeout(420)
def test_429s_503s_and_dropped_connections_are_retried_without_losing_or_doubling_a_row(
        endpoint_run, server, tmp_path, tiny_target_dir, prompts_file):
    _, _, reference = endpoint_run
    with FaultProxy(server.port) as proxy:
        recipe = endpoint_recipe(tmp_path, tiny_target_dir, prompts_file, proxy.base_url, max_retries=10)
        summary = run_generate(recipe)
    counts = proxy.counts
    assert counts["429"] >= 5 and counts["drop_before"] >= 5 and counts["drop_after"] >= 3 and counts["503"] >= 1, counts
    rows = read_rows(recipe.run_dir)
    assert summary["rows"] == ROWS and rows.keys() == reference.keys()
    assert all(answer(rows[k]) == answer(reference[k]) for k in rows)
    assert manifest_of(recipe.run_dir)["counts"]["duplicates"] == 0


@pytest.mark.timeout(600)
def test_local_rows_then_a_crashing_endpoint_resume_exactly_once(endpoint_run, tmp_path, tiny_target_dir, prompts_file):
    """Run 1: local engine, 4 instructions. Run 2: the endpoint, all 10; the server crashes mid-run and the run fails
    after its retries. Run 3: the server is back; the set completes: no row lost, none twice, the same rows."""
    _, _, reference = endpoint_run
    workdir = tmp_path / "run"
    run_generate(endpoint_recipe(workdir, tiny_target_dir, prompts_file, None, limit=4, engine="transformers"))
    local_keys = set(read_rows(workdir))
    assert len(local_keys) == 6 * 3

    crashing = LoopbackServer(tiny_target_dir, tmp_path)
    try:
        crashing.start("--die-after", "10")  # 1 prompt-format probe, then 2 batches of 4; the 3rd batch kills it
        recipe = endpoint_recipe(workdir, tiny_target_dir, prompts_file, crashing.base_url, max_retries=2)
        with pytest.raises(Exception, match="no answer after 3 attempts"):
            run_generate(recipe)
        assert crashing.wait_dead() == 17
        before = {p: p.read_bytes() for p in (workdir / "alignment").glob("part-*.parquet")}
        partial = read_rows(workdir)
        # The crash comes after a request count, not a row count: on a slow machine retries spend the count before
        # any endpoint batch is written, which leaves only the local rows. Resume must hold either way.
        assert local_keys <= set(partial) and len(partial) < ROWS, len(partial)
        assert not manifest_of(workdir)["complete"]

        crashing.start()  # back, on the same port
        summary = run_generate(recipe)
    finally:
        crashing.stop()
    rows = read_rows(workdir)  # raises on a key written twice
    assert rows.keys() == reference.keys() and summary["rows"] == ROWS
    assert summary["new_rows"] == ROWS - len(partial) and summary["resumed_rows"] == len(partial)
    assert all(answer(rows[k]) == answer(reference[k]) for k in rows)  # local and endpoint rows agree
    assert all(p.read_bytes() == b for p, b in before.items())  # rows written before the crash are kept as they were
    m = manifest_of(workdir)
    origin = f"endpoint:tiny@{crashing.base_url}"
    assert m["complete"] and m["counts"]["duplicates"] == 0
    assert m["counts"]["by_origin"] == {"local:transformers": len(local_keys), origin: ROWS - len(local_keys)}
    assert all(rows[k]["origin"] == ("local:transformers" if k in local_keys else origin) for k in rows)
    assert [(r["engine"], r["finished"]) for r in m["runs"]] == [("transformers", True), ("openai", False), ("openai", True)]
    parts = {p.name.split("-")[1] for p in (workdir / "alignment").glob("part-*.parquet")}
    assert parts <= {r["run_id"] for r in m["runs"]}  # each part's run is in the manifest


@pytest.mark.timeout(420)
def test_a_server_that_dies_and_comes_back_within_the_retries_loses_and_doubles_nothing(
        endpoint_run, tmp_path, tiny_target_dir, prompts_file):
    import threading

    _, _, reference = endpoint_run
    flaky = LoopbackServer(tiny_target_dir, tmp_path)
    flaky.start("--die-after", "9")
    restarted = threading.Event()

    def bring_back() -> None:  # as a supervisor would: the server is restarted on its port once it died
        flaky.wait_dead()
        flaky.start()
        restarted.set()

    supervisor = threading.Thread(target=bring_back, daemon=True)
    supervisor.start()
    try:
        recipe = endpoint_recipe(tmp_path / "run", tiny_target_dir, prompts_file, flaky.base_url, max_retries=30,
                                 backoff_initial_s=0.2, backoff_max_s=2.0)
        summary = run_generate(recipe)
        supervisor.join(timeout=60)
    finally:
        flaky.stop()
    assert restarted.is_set() and flaky.starts == 2
    rows = read_rows(tmp_path / "run")
    assert rows.keys() == reference.keys() and summary["rows"] == ROWS and summary["new_rows"] == ROWS
    assert all(answer(rows[k]) == answer(reference[k]) for k in rows)


@pytest.mark.timeout(420)
def test_a_job_killed_mid_run_resumes_exactly_once(endpoint_run, server, tmp_path, tiny_target_dir, prompts_file):
    """`jobs/generate.py` with the endpoint engine, SIGKILLed after its first part (rate-limited to 8 requests/s so
    it is mid-run), then rerun: the same keys as the uninterrupted run, none twice, the same rows."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray
    import yaml

    _, _, reference = endpoint_run
    data = endpoint_data(tmp_path / "run", tiny_target_dir, prompts_file, server.base_url, batch_size=2, requests_per_s=8)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    job = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "jobs" / "generate.py"),
                            str(tmp_path / "recipe.yaml")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts_dir = tmp_path / "run" / "alignment"
    deadline = time.time() + 180
    while not list(parts_dir.glob("part-*.parquet")) and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    before = {p: p.read_bytes() for p in parts_dir.glob("part-*.parquet")}
    assert before and 0 < len(read_rows(tmp_path / "run")) < ROWS
    summary = run_generate(recipe_from_dict(data))
    rows = read_rows(tmp_path / "run")
    assert rows.keys() == reference.keys() and summary["resumed_rows"] + summary["new_rows"] == ROWS
    assert all(answer(rows[k]) == answer(reference[k]) for k in rows)
    assert all(p.read_bytes() == b for p, b in before.items())


# ---------------------------------------------------------------------------------------------- prompts as text
@pytest.mark.timeout(300)
def test_a_server_refusing_token_id_prompts_gets_the_text_with_the_same_answers(local, tiny_target_dir, tmp_path):
    srv = LoopbackServer(tiny_target_dir, tmp_path, "--no-token-id-prompts", "--fingerprint", "none").start()
    try:
        cfg = OpenAIEndpointConfig(base_url=srv.base_url, model="tiny", max_concurrency=4, **FAST_RETRIES)
        tok = load_tokenizer(tiny_target_dir)
        check = check_endpoint_tokenizer(cfg, tok, str(tiny_target_dir))
        assert check["method"] == "probe" and check["checks"] == ["detokenize", "tokenize"]
        assert resolve_prompt_format(cfg, tok) == "text"
        backend = OpenAIBackend(tiny_target_dir, cfg, store_topk=TOPK)
        chat = tok.apply_chat_template([{"role": "user", "content": "Tell me about rivers."}], tokenize=False,
                                       add_generation_prompt=True)
        prompts = [tok(chat, add_special_tokens=False)["input_ids"], tok("def add(a, b):\n")["input_ids"]]
        requests = [(ids, SamplingParams(temperature=t, top_p=0.9, max_new_tokens=12, seed=5)) for ids in prompts for t in (0.0, 0.8)]
        outs = backend.generate(requests)
        for out, ref in zip(outs, local.generate(requests)):
            assert (out.token_ids, out.topk_ids) == (ref.token_ids, ref.topk_ids)
            assert (out.prompt_mode, out.response_mode) == ("text", "token_ids")
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- tokenizer contract
@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other-tokenizer")
    build_tiny_tokenizer(out, vocab_size=384)
    return out


@pytest.mark.timeout(300)
def test_an_endpoint_with_another_tokenizer_is_refused_before_anything_is_written(
        tiny_target_dir, other_tokenizer_dir, prompts_file, tmp_path):
    tok = load_tokenizer(tiny_target_dir)
    ours, theirs = tokenizer_fingerprint(tok), tokenizer_fingerprint(load_tokenizer(other_tokenizer_dir))
    srv = LoopbackServer(tiny_target_dir, tmp_path, "--tokenizer", str(other_tokenizer_dir), "--no-tokenize-endpoint").start()
    try:
        recipe = endpoint_recipe(tmp_path / "w1", tiny_target_dir, prompts_file, srv.base_url)
        with pytest.raises(TokenizerMismatchError) as exc:  # GET /v1/models advertises the other fingerprint
            run_generate(recipe)
        for name in (theirs, ours, srv.base_url, str(tiny_target_dir)):
            assert name in str(exc.value)
        assert not (tmp_path / "w1" / "alignment").exists()

        # no /tokenize: the completion's prompt ids (vLLM's return_token_ids), or a strict server's prompt token counts
        for extensions, what in ((True, "encode differently"), (False, "count the tokens of")):
            recipe = endpoint_recipe(tmp_path / "w2", tiny_target_dir, prompts_file, srv.base_url, tokenizer_check="probe",
                                     vllm_extensions=extensions)
            with pytest.raises(TokenizerMismatchError, match=what) as exc:
                run_generate(recipe)
            assert srv.base_url in str(exc.value) and str(tiny_target_dir) in str(exc.value)
            assert not (tmp_path / "w2" / "alignment").exists()
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_a_probe_through_tokenize_refuses_another_tokenizer(tiny_target_dir, other_tokenizer_dir, tmp_path):
    srv = LoopbackServer(tiny_target_dir, tmp_path, "--tokenizer", str(other_tokenizer_dir), "--fingerprint", "none").start()
    try:
        cfg = OpenAIEndpointConfig(base_url=srv.base_url, model="tiny", **FAST_RETRIES)
        with pytest.raises(TokenizerMismatchError, match="encode differently: probe"):
            check_endpoint_tokenizer(cfg, load_tokenizer(tiny_target_dir), str(tiny_target_dir))
        with pytest.raises(TokenizerMismatchError, match="lists no tokenizer_fingerprint"):
            check_endpoint_tokenizer(cfg.model_copy(update={"tokenizer_check": "fingerprint"}),
                                     load_tokenizer(tiny_target_dir), str(tiny_target_dir))
        with pytest.raises(FastdraftError, match="does not serve model 'other'"):
            check_endpoint_tokenizer(cfg.model_copy(update={"model": "other"}), load_tokenizer(tiny_target_dir), "t")
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- settings
def test_endpoint_settings_are_typed(tmp_path, tiny_target_dir, prompts_file, monkeypatch):
    def recipe(**openai):
        return endpoint_recipe(tmp_path, tiny_target_dir, prompts_file, "http://127.0.0.1:9/v1", **openai)

    with pytest.raises(RecipeError, match="max_concurent"):
        recipe(max_concurent=4)
    with pytest.raises(RecipeError, match="requests_per_s"):
        recipe(requests_per_s=0)
    with pytest.raises(RecipeError, match="exceeds generate.batch_size"):
        recipe(max_concurrency=64)
    with pytest.raises(RecipeError, match="needs a generate.openai section"):
        recipe_from_dict({"name": "x", "workdir": str(tmp_path), "target": {"model": str(tiny_target_dir)},
                          "generate": {"engine": "openai", "prompts": [{"name": "c", "kind": "stdlib_code"}]}})
    cfg = recipe(api_key_env="FASTDRAFT_TEST_KEY", max_retries=3).generate.openai
    assert cfg.requests_per_s is None and cfg.max_retries == 3 and cfg.prompt_format == "auto"
    monkeypatch.delenv("FASTDRAFT_TEST_KEY", raising=False)
    with pytest.raises(FastdraftError, match="FASTDRAFT_TEST_KEY"):
        run_generate(recipe(api_key_env="FASTDRAFT_TEST_KEY"))


def test_backoff_is_exponential_capped_and_follows_retry_after():
    cfg = OpenAIEndpointConfig(base_url="http://x/v1", model="m", backoff_initial_s=1.0, backoff_max_s=10.0)
    waits = [backoff_s(cfg, a) for a in range(6)]
    assert all(0.5 * min(10, 2 ** a) <= w <= min(10, 2 ** a) for a, w in enumerate(waits))
    assert backoff_s(cfg, 0, "3") == 3.0 and backoff_s(cfg, 0, "120") == 10.0 and backoff_s(cfg, 0, "soon") <= 1.0


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.mark.timeout(300)
def test_bench_generate_endpoint_prints_a_table_and_writes_json(tiny_target_dir, tmp_path, capsys):
    from jobs.bench_generate_endpoint import main

    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_target_dir), "--prompts", "8", "--max-new-tokens", "8", "--concurrency", "1", "4",
                 "--store-topk", "2", "--rounds", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"1", "4"} and report["store_topk"] == 2
    for r in report["results"].values():
        assert r["rows"] == 8 * report["rounds"] and r["rows_per_s"] > 0 and r["tokens"] > 0 and r["retries"] == 0
    assert "rows/s" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- retries, rate, key
def _scripted(*steps):
    """An httpx transport answering each request with the next step: a status code, or an exception to raise."""
    import httpx

    seen = []

    def handler(request):
        seen.append(request)
        step = steps[min(len(seen) - 1, len(steps) - 1)]
        if isinstance(step, Exception):
            raise step
        return httpx.Response(step, json={"ok": len(seen)} if step == 200 else {"error": {"message": str(step)}})

    return httpx.MockTransport(handler), seen


@pytest.mark.parametrize("failure", ["429", "500", "502", "503", "ReadTimeout", "ConnectError", "RemoteProtocolError"])
def test_retryable_failures_are_retried_with_backoff(failure):
    import asyncio

    import httpx

    from fastdraft.generation.endpoint import RateLimiter, RetryStats, post_with_retries

    step = int(failure) if failure.isdigit() else getattr(httpx, failure)("boom")
    transport, seen = _scripted(step, step, 200)
    cfg = OpenAIEndpointConfig(base_url="http://x/v1", model="m", max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.02)
    stats = RetryStats()

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await post_with_retries(client, cfg, "http://x/v1/completions", {}, RateLimiter(None), stats)

    assert asyncio.run(go()) == {"ok": 3} and len(seen) == 3 and stats.retries == 2
    transport, seen = _scripted(step)  # never recovers: a clear error after max_retries + 1 attempts
    with pytest.raises(FastdraftError, match="no answer after 3 attempts"):
        asyncio.run(go())


def test_other_client_errors_fail_at_once_and_the_rate_limit_spaces_requests():
    import asyncio

    import httpx

    from fastdraft.generation.endpoint import RateLimiter, RetryStats, post_with_retries

    cfg = OpenAIEndpointConfig(base_url="http://x/v1", model="m", max_retries=5)
    for status in (400, 401, 404, 422):
        transport, seen = _scripted(status)

        async def go():
            async with httpx.AsyncClient(transport=transport) as client:
                return await post_with_retries(client, cfg, "http://x/v1/completions", {}, RateLimiter(None), RetryStats())

        with pytest.raises(FastdraftError, match=f"HTTP {status}"):
            asyncio.run(go())
        assert len(seen) == 1

    limiter = RateLimiter(20.0)

    async def burst():
        start = __import__("time").monotonic()
        await asyncio.gather(*(limiter.wait() for _ in range(10)))
        return __import__("time").monotonic() - start

    assert 0.4 <= asyncio.run(burst()) < 2.0  # 10 starts at 20/s: the last one 0.45 s after the first


def test_the_api_key_comes_from_the_named_variable_as_a_bearer_token(tiny_target_dir, monkeypatch):
    """A real loopback HTTP server records the Authorization header the backend sends."""
    import http.server
    import json as _json
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.headers.get("authorization"))
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = _json.dumps({"choices": [{"token_ids": [5, 6], "finish_reason": "length"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FASTDRAFT_TEST_KEY", "sk-loopback")
    try:
        cfg = OpenAIEndpointConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="m",
                                   api_key_env="FASTDRAFT_TEST_KEY")
        backend = OpenAIBackend(tiny_target_dir, cfg, prompt_format="token_ids")
        out = backend.generate([([1, 2, 3], SamplingParams(max_new_tokens=2))])
    finally:
        server.shutdown()
    assert out[0].token_ids == [5, 6] and seen == ["Bearer sk-loopback"]


# ---------------------------------------------------------------------------------------------- fastdraft's own server
@pytest.mark.timeout(600)
def test_fastdraft_serving_as_the_endpoint_strict_mode_with_an_api_key(ray_session, tiny_target_dir, prompts_file, tmp_path):
    """fastdraft.serving (Ray Serve, the target alone) as the endpoint: the tokenizer is checked by the fingerprint
    on its /v1/models; with `vllm_extensions: false` and no top-k, response ids are re-tokenized from its text
    (recorded per row). The API key
    reaches the actors through generate.runtime_env, as on a cluster."""
    import os

    from ray import serve

    from endpoint_fixtures import free_port
    from fastdraft.serving.app import build_app

    port, key_env, key = free_port(), "FASTDRAFT_ENDPOINT_TEST_KEY", "sk-endpoint-test"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    os.environ[key_env] = key
    try:
        serve.run(build_app({"target": str(tiny_target_dir), "speculative": False, "model_name": "tiny",
                             "cpus_per_replica": 0.5, "api_key_env": key_env}), name="fastdraft-endpoint-test",
                  route_prefix="/", blocking=False)
        data = endpoint_data(tmp_path / "run", tiny_target_dir, prompts_file, f"http://127.0.0.1:{port}/v1", limit=2,
                             vllm_extensions=False, api_key_env=key_env, max_retries=20)
        data["generate"].update(store_topk=0, runtime_env={"env_vars": {key_env: key}})
        summary = run_generate(recipe_from_dict(data))
    finally:
        os.environ.pop(key_env, None)
        serve.shutdown()
    rows = read_rows(tmp_path / "run")
    assert summary["rows"] == len(rows) == 4 * 3
    assert {(r["prompt_mode"], r["response_mode"]) for r in rows.values()} == {("token_ids", "text_retokenized")}
    m = manifest_of(tmp_path / "run")
    # fastdraft's server names its target's tokenizer fingerprint on /v1/models: the contract is checked on it
    assert m["endpoint"]["tokenizer_check"]["method"] == "fingerprint"
    assert m["counts"]["by_response_mode"] == {"text_retokenized": 12}
