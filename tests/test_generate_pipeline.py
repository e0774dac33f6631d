"""The generate stage end to end: prompts -> Ray Data actor pool (real `ray_session`) -> alignment set.

Specification:
- the alignment set follows the contract (columns, types, unique keys, manifest);
- greedy rows equal transformers' own greedy `generate` for the same prompt; sampled rows are seeded by key;
- the actor pool stays within min_actors..max_actors;
- a job killed mid-run and rerun completes the set with exactly the keys of an uninterrupted run, no duplicates;
- bad settings are refused before anything is written; a finished set is never mixed with other settings;
- the lean engine (fastdraft's own decoder) answers exactly like the transformers engine, top-k log-probs too;
- the vLLM engine runs through Ray Data LLM's vLLM processor (a fake vllm stands in, shipped with a runtime_env);
- SmolLM2 (the embedded target) answers chat-templated prompts and writes its own Magpie prompts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from fastdraft.config import recipe_from_dict
from fastdraft.errors import FastdraftError, MissingDependencyError, RecipeError
from fastdraft.generation.backends import (LeanBackend, TransformersBackend, cut_at_stop, length_groups,
                                          shared_prefix_length)
from fastdraft.generation.pipeline import actor_pool, run_generate
from fastdraft.generation.prompts import stable_seed
from fastdraft.speculative.kvcache import StaticKVCache
from fastdraft.speculative.types import SamplingParams
from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process generation on one thread
REPO = Path(__file__).resolve().parent.parent
FAKE_VLLM_DIR = Path(__file__).parent / "fake_vllm"
CONTRACT_COLUMNS = {"key", "prompt_id", "prompt_ids", "response_ids", "prompt_text", "response_text", "temperature",
                    "top_p", "top_k", "sample_index", "source", "finish_reason"}
INSTRUCTIONS = [
    "Write a haiku about the sea.", "Explain what a hash map is.", "List three primary colors.",
    "Translate 'good morning' to French.", "Give a synonym for happy.", "What is the boiling point of water?",
    "Summarize the plot of Hamlet in one line.", "Name a prime number above 50.", "Describe a cat to a child.",
    "Suggest a name for a bakery.", "How do plants make food?", "Write a limerick about Python.",
]
SAMPLING = [{"temperature": 0.0, "max_new_tokens": 16}, {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 16, "n": 2}]
ROWS = (len(INSTRUCTIONS) + 4) * 3  # (12 instructions + 4 code prompts) x (greedy + 2 samples)


def tiny_recipe(workdir: Path, target: Path, prompts: Path, **generate):
    data = {
        "name": "gen-test", "workdir": str(workdir), "target": {"model": str(target)},
        "generate": {
            "prompts": [{"name": "inst", "kind": "jsonl", "path": str(prompts)}, {"name": "code", "kind": "stdlib_code", "limit": 4}],
            "sampling": SAMPLING, "max_prompt_tokens": 256, "batch_size": 4, "min_actors": 1, "max_actors": 2,
            "cpus_per_actor": 0.5, **generate,
        },
    }
    return recipe_from_dict(data), data


def read_rows(run_dir: Path) -> pa.Table:
    return pq.ParquetDataset(sorted((run_dir / "alignment").glob("part-*.parquet"))).read()


def reference_greedy(model, ids, max_new_tokens, stop_ids):
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids))
    return cut_at_stop(out[0, len(ids):].tolist(), stop_ids)



@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "instructions.jsonl"
    path.write_text("".join(json.dumps({"instruction": t, "input": ""}) + "\n" for t in INSTRUCTIONS))
    return path


@pytest.fixture(scope="module")
def full_run(ray_session, tmp_path_factory, tiny_target_dir, prompts_file):
    """One uninterrupted run: the reference the other tests compare with."""
    recipe, _ = tiny_recipe(tmp_path_factory.mktemp("full"), tiny_target_dir, prompts_file)
    summary = run_generate(recipe)
    return recipe, summary, read_rows(recipe.run_dir)


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    return TransformersBackend(tiny_target_dir)


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.timeout(300)
def test_alignment_set_follows_the_contract(full_run, tiny_target_dir):
    recipe, summary, table = full_run
    assert CONTRACT_COLUMNS <= set(table.column_names)
    assert table.schema.field("prompt_ids").type == pa.list_(pa.int32()) == table.schema.field("response_ids").type
    rows = table.to_pylist()
    assert len(rows) == ROWS == summary["rows"] and len({r["key"] for r in rows}) == ROWS
    tok = load_tokenizer(tiny_target_dir)
    for r in rows:
        assert r["response_text"] == tok.decode(r["response_ids"], skip_special_tokens=True)
        if r["finish_reason"] == "stop":
            assert r["response_ids"][-1] == tok.eos_token_id
        else:
            assert r["finish_reason"] == "length" and len(r["response_ids"]) == 16
        if r["source"] == "inst":  # instructions are chat-templated, code is continued as it is
            assert r["prompt_text"].startswith("<|im_start|>user\n") and r["prompt_text"].endswith("<|im_start|>assistant\n")
        else:
            assert r["source"] == "code" and r["prompt_text"].startswith(("def ", "async def "))
        assert r["prompt_ids"] == tok(r["prompt_text"], add_special_tokens=r["source"] == "code")["input_ids"]
    manifest = json.loads((recipe.run_dir / "alignment" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["target"] == str(tiny_target_dir)
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert manifest["section_hash"] == recipe.section_hash("generate")
    assert [s["temperature"] for s in manifest["settings"]] == [0.0, 0.8]
    assert manifest["counts"]["rows"] == ROWS and manifest["counts"]["duplicates"] == 0
    assert manifest["counts"]["by_source"] == {"inst": 36, "code": 12}
    assert manifest["sources"]["inst"]["prompts"] == 12


@pytest.mark.timeout(300)
def test_greedy_rows_equal_transformers_greedy_generate(full_run, target):
    _, _, table = full_run
    greedy = [r for r in table.to_pylist() if r["temperature"] == 0.0]
    assert len(greedy) == 16
    for r in greedy:
        assert (r["response_ids"], r["finish_reason"]) == reference_greedy(target.model, r["prompt_ids"], 16, target.stop_ids)


@pytest.mark.timeout(300)
def test_sampled_rows_are_seeded_by_their_key(full_run, target):
    recipe, _, table = full_run
    sampled = [r for r in table.to_pylist() if r["temperature"] > 0]
    assert len(sampled) == 32 and {r["sample_index"] for r in sampled} == {0, 1}
    assert all(r["seed"] == stable_seed(recipe.generate.seed, r["key"]) for r in sampled)
    by_prompt = {}
    for r in sampled:
        by_prompt.setdefault(r["prompt_id"], []).append(r["response_ids"])
    assert sum(a != b for a, b in by_prompt.values()) >= 12  # two samples of a prompt are two draws
    r = sampled[5]
    again = target.generate([(r["prompt_ids"], SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=16, seed=r["seed"]))])
    assert again[0].token_ids == r["response_ids"]  # the key alone decides the sample


@pytest.mark.timeout(300)
def test_lean_backend_answers_exactly_like_the_transformers_backend(target, tiny_target_dir):
    """Prompts of different lengths in one batch (no padding in the lean cache), greedy and sampled rows with
    their own seeds, a stop token that ends some rows early (they leave the batch), and top-k log-probs."""
    lean = LeanBackend(tiny_target_dir, store_topk=3)
    reference = TransformersBackend(tiny_target_dir, store_topk=3)
    prompts = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 60, 61], [1, 99, 98, 97, 96]]
    greedy = reference.generate([(ids, SamplingParams(max_new_tokens=12)) for ids in prompts])
    stop = greedy[0].token_ids[3]  # a token that ends at least the first row early
    settings = [SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)),
                SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=12, stop_token_ids=(stop,))]
    for params in settings:
        requests = [(ids, SamplingParams(**{**params.__dict__, "seed": 100 + i})) for i, ids in enumerate(prompts)]
        want, got = reference.generate(requests), lean.generate(requests)
        assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]
        assert "stop" in {g.finish_reason for g in got} and "length" in {g.finish_reason for g in got}
        for g, w in zip(got, want):
            assert len(g.topk_ids) == len(g.token_ids) and g.topk_ids == w.topk_ids
            assert torch.allclose(torch.tensor(g.topk_logprobs), torch.tensor(w.topk_logprobs), atol=1e-4)


def test_length_groups_prefill_similar_prompts_together():
    """Shortest first; a group's longest is within 1.25x (or 16 tokens) of its shortest, so right-padding a group
    wastes little (64 stdlib code prompts of 19-241 tokens padded as one batch: 15.4k positions for 3.3k real)."""
    lengths = [241, 19, 40, 22, 100, 35, 120, 30]
    assert length_groups(lengths) == [[1, 3, 7, 5], [2], [4, 6], [0]]
    assert length_groups([5]) == [[0]] and length_groups([]) == []


@pytest.mark.timeout(300)
def test_lean_backend_prefills_in_length_groups_and_drops_finished_rows_exactly(target, tiny_target_dir):
    """Prompts from 2 to 70 tokens (three prefill groups, two of them short enough for the native kernels, decoded as
    one batch in another order than asked) and a stop token that ends most rows early (finished rows stay in the
    cache until they are a quarter of it, then leave): every answer is transformers' own, greedy and sampled."""
    lean = LeanBackend(tiny_target_dir, store_topk=2)
    reference = TransformersBackend(tiny_target_dir, store_topk=2)
    prompts = [[1, *range(40, 40 + n)] for n in (69, 1, 30, 2, 25, 68, 3, 4)]
    assert len(length_groups([len(p) for p in prompts])) == 3
    greedy = reference.generate([(ids, SamplingParams(max_new_tokens=20)) for ids in prompts])
    stop = next(t for g in greedy for t in g.token_ids[1:6])  # ends at least one row within its first tokens
    for params in (SamplingParams(max_new_tokens=20, stop_token_ids=(stop,)),
                   SamplingParams(temperature=0.9, max_new_tokens=20, stop_token_ids=(stop,))):
        requests = [(ids, SamplingParams(**{**params.__dict__, "seed": 7 + i})) for i, ids in enumerate(prompts)]
        want, got = reference.generate(requests), lean.generate(requests)
        assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]
        assert [g.topk_ids for g in got] == [w.topk_ids for w in want]
    assert {g.finish_reason for g in got} == {"stop", "length"}


@pytest.mark.timeout(300)
def test_lean_backend_prefills_the_prompts_shared_prefix_once_and_answers_exactly(target, tiny_target_dir):
    """Prompts that start alike (a chat template's system turn) share that prefix's cache: it is computed once, and
    the answers are still transformers' own; identical prompts (Magpie's user-turn requests) keep one token each."""
    lean = LeanBackend(tiny_target_dir, store_topk=2)
    reference = TransformersBackend(tiny_target_dir, store_topk=2)
    system = [1, *range(70, 82)]
    prompts = [system + tail for tail in ([5], [9, 14, 3], list(range(30, 50)), [60])]  # two prefill groups
    assert shared_prefix_length(prompts) == len(system)
    assert shared_prefix_length([system, system]) == len(system) - 1 and shared_prefix_length([[1, 2], [3]]) == 0
    for batch in (prompts, [system] * 4):
        for params in (SamplingParams(max_new_tokens=16), SamplingParams(temperature=1.0, max_new_tokens=16)):
            requests = [(ids, SamplingParams(**{**params.__dict__, "seed": 3 + i})) for i, ids in enumerate(batch)]
            want, got = reference.generate(requests), lean.generate(requests)
            assert [(g.token_ids, g.topk_ids) for g in got] == [(w.token_ids, w.topk_ids) for w in want]
    assert len({tuple(g.token_ids) for g in got}) > 1  # identical prompts, their own seeds: their own answers


def test_kv_cache_puts_a_prefilled_group_in_its_rows_and_keeps_rows_copying_only_written_positions():
    def cache(batch: int, capacity: int) -> StaticKVCache:
        return StaticKVCache(layers=2, batch=batch, kv_heads=1, capacity=capacity, head_dim=3, dtype=torch.float32,
                             device="cpu")

    batch, group = cache(4, 10), cache(2, 6)
    group.k.normal_(), group.v.normal_()
    batch.put_rows(1, group)
    assert torch.equal(batch.k[:, 1:3, :, :6], group.k) and torch.equal(batch.v[:, 1:3, :, :6], group.v)
    assert not batch.k[:, [0, 3]].any() and not batch.k[:, :, :, 6:].any()
    k, v = batch.k[:, [2, 0]].clone(), batch.v[:, [2, 0]].clone()
    batch.keep_rows([2, 0], length=6)
    assert batch.capacity == 10 and torch.equal(batch.k, k) and torch.equal(batch.v, v)


def test_lean_engine_refuses_a_model_it_cannot_run(tmp_path, tiny_tokenizer_dir):
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_tokenizer_dir, gpt2)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=512, n_layer=1, n_embd=32, n_head=2)).save_pretrained(gpt2)
    with pytest.raises(FastdraftError, match="generate.engine 'lean' cannot run .*gpt2.*use engine 'transformers'"):
        LeanBackend(gpt2)


@pytest.mark.timeout(300)
def test_lean_engine_through_the_actor_pool_writes_the_same_alignment_set(full_run, tmp_path, tiny_target_dir, prompts_file):
    _, _, table = full_run
    recipe, _ = tiny_recipe(tmp_path / "lean", tiny_target_dir, prompts_file, engine="lean", max_actors=1)
    run_generate(recipe)
    manifest = json.loads((recipe.run_dir / "alignment" / "manifest.json").read_text())
    assert manifest["engine"] == "lean" and manifest["complete"] is True

    def answers(t):
        return sorted((r["key"], r["response_ids"], r["finish_reason"]) for r in t.to_pylist())

    assert answers(read_rows(recipe.run_dir)) == answers(table)


@pytest.mark.timeout(300)
def test_generate_dtype_runs_the_target_in_that_dtype_and_is_part_of_what_the_rows_are(full_run, tmp_path, tiny_target_dir,
                                                                                      prompts_file):
    """generate.dtype: bfloat16 answers are the bfloat16 target's (as its backend alone gives them); unset, the recipe's
    stage key is what it was before the field existed; a rerun in float32 into bfloat16 rows is refused, rows kept."""
    # One prompt per batch, here and in the reference: in bfloat16, padding a prompt to a batch's longest changes its rounding
    # enough to flip this random model's near-tied greedy choices on CPUs without native bfloat16 (AVX2).
    recipe, _ = tiny_recipe(tmp_path / "bf16", tiny_target_dir, prompts_file, engine="lean", max_actors=1, dtype="bfloat16",
                            batch_size=1)
    assert "dtype" not in full_run[0].generate.identity() and recipe.generate.identity()["dtype"] == "bfloat16"
    run_generate(recipe)
    manifest = json.loads((recipe.run_dir / "alignment" / "manifest.json").read_text())
    assert manifest["generate"]["dtype"] == "bfloat16"
    greedy = {tuple(r["prompt_ids"]): r["response_ids"] for r in read_rows(recipe.run_dir).to_pylist()
              if r["temperature"] == 0.0}
    backend = LeanBackend(tiny_target_dir, dtype="bfloat16")
    prompts = [list(ids) for ids in greedy]
    alone = [backend.generate([(ids, SamplingParams(max_new_tokens=16))])[0].token_ids for ids in prompts]
    assert alone == [greedy[tuple(ids)] for ids in prompts]

    before = sorted(p.name for p in (recipe.run_dir / "alignment").glob("part-*"))
    data = recipe.model_dump(mode="json")
    data["generate"]["dtype"] = "float32"
    with pytest.raises(FastdraftError, match="other generate settings"):
        run_generate(recipe_from_dict(data))
    assert sorted(p.name for p in (recipe.run_dir / "alignment").glob("part-*")) == before


@pytest.mark.timeout(300)
def test_actor_pool_autoscales_within_the_recipes_bounds(full_run):
    recipe, summary, _ = full_run
    pool = actor_pool(recipe.generate)
    assert (pool.min_size, pool.max_size) == (1, 2)
    assert 1 <= summary["actors_used"] <= 2
    bad = recipe.generate.model_copy(update={"min_actors": 3})
    with pytest.raises(RecipeError, match="min_actors"):
        actor_pool(bad)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.timeout(300)
def test_killed_job_resumes_exactly_once(full_run, tmp_path, tiny_target_dir, prompts_file):
    recipe, data = tiny_recipe(tmp_path / "run", tiny_target_dir, prompts_file, batch_size=2, max_actors=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "generate.py"), str(tmp_path / "recipe.yaml")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts_dir = recipe.run_dir / "alignment"
    deadline = time.time() + 180
    while not list(parts_dir.glob("part-*.parquet")) and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)  # no chance to clean up: as when a node dies
    job.wait()
    before = {p: p.read_bytes() for p in parts_dir.glob("part-*.parquet")}
    assert before, "the job wrote nothing before it was killed"
    assert json.loads((parts_dir / "manifest.json").read_text())["complete"] is False
    assert 0 < read_rows(recipe.run_dir).num_rows < ROWS

    summary = run_generate(recipe)
    assert summary["resumed_rows"] + summary["new_rows"] == ROWS
    resumed = read_rows(recipe.run_dir).to_pylist()
    _, _, reference = full_run
    assert sorted(r["key"] for r in resumed) == sorted(reference.column("key").to_pylist())  # none lost, none twice
    assert all(p.read_bytes() == b for p, b in before.items())  # rows written before the kill are kept as they were
    ref_greedy = {r["key"]: r["response_ids"] for r in reference.to_pylist() if r["temperature"] == 0}
    assert {r["key"]: r["response_ids"] for r in resumed if r["temperature"] == 0} == ref_greedy

    again = run_generate(recipe)  # a complete set: nothing to do
    assert (again["new_rows"], again["rows"]) == (0, ROWS)


@pytest.mark.timeout(120)
def test_bad_settings_are_refused_before_anything_is_written(full_run, tmp_path, tiny_target_dir, prompts_file):
    recipe, _ = tiny_recipe(tmp_path / "ctx", tiny_target_dir, prompts_file, max_prompt_tokens=1020)
    with pytest.raises(RecipeError, match=r"max_prompt_tokens \(1020\).*context of 1024"):
        run_generate(recipe)
    assert not (recipe.run_dir / "alignment").exists()

    done, data = full_run[0], full_run[0].model_dump(mode="json")
    data["generate"]["sampling"][1]["temperature"] = 1.0
    before = sorted(p.name for p in (done.run_dir / "alignment").glob("part-*"))
    with pytest.raises(FastdraftError, match="other generate settings"):
        run_generate(recipe_from_dict(data))
    assert sorted(p.name for p in (done.run_dir / "alignment").glob("part-*")) == before

    recipe, _ = tiny_recipe(tmp_path / "missing", tiny_target_dir, tmp_path / "nope.jsonl")
    with pytest.raises(FastdraftError, match="no files match"):
        run_generate(recipe)
    assert not (recipe.run_dir / "alignment").exists()


# ---------------------------------------------------------------------------------------------- vLLM
@pytest.mark.timeout(600)
def test_vllm_engine_through_ray_data_llm_fake_vllm(full_run, tmp_path, tiny_target_dir, prompts_file, target):
    """`engine: vllm` runs Ray Data LLM's real vLLM processor (build_processor, its vLLMEngineStage actors) on a
    fake `vllm` package shipped to the engine actors with the runtime_env, as a cluster's GPU actors get the real one.
    The fake answers with the tiny target through transformers, so greedy rows must equal the local engine's."""
    log = tmp_path / "vllm_calls.jsonl"
    pythonpath = os.pathsep.join(filter(None, [str(FAKE_VLLM_DIR), os.environ.get("PYTHONPATH")]))
    recipe, _ = tiny_recipe(
        tmp_path / "run", tiny_target_dir, prompts_file, engine="vllm", store_topk=2, min_actors=1, max_actors=1,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "FAKE_VLLM_LOG": str(log)}},
        engine_kwargs={"gpu_memory_utilization": 0.8, "max_num_seqs": 8},
    )
    summary = run_generate(recipe)
    assert summary["rows"] == ROWS and summary["new_rows"] == ROWS
    rows = read_rows(recipe.run_dir)
    assert rows.schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32()))
    assert {r["origin"] for r in rows.to_pylist()} == {"local:vllm"}
    assert {(r["prompt_mode"], r["response_mode"]) for r in rows.to_pylist()} == {("token_ids", "token_ids")}
    manifest = json.loads((recipe.run_dir / "alignment" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["engine"] == "vllm" and manifest["counts"]["duplicates"] == 0

    _, _, reference = full_run
    assert sorted(rows.column("key").to_pylist()) == sorted(reference.column("key").to_pylist())
    ref = {r["key"]: (r["response_ids"], r["finish_reason"], r["response_text"]) for r in reference.to_pylist()
           if r["temperature"] == 0}
    greedy = [r for r in rows.to_pylist() if r["temperature"] == 0]
    assert {r["key"]: (r["response_ids"], r["finish_reason"], r["response_text"]) for r in greedy} == ref
    with_topk = TransformersBackend(tiny_target_dir, store_topk=2)
    for r in greedy[:4]:  # vLLM's raw log-probs = the target's own top-k, as the local engines store them
        want = with_topk.generate([(r["prompt_ids"], SamplingParams(max_new_tokens=16))])[0]
        assert r["topk_ids"] == want.topk_ids
        assert torch.allclose(torch.tensor(r["topk_logprobs"]), torch.tensor(want.topk_logprobs), atol=1e-4)
    for r in rows.to_pylist():  # sampled rows too: k per token, even where vLLM added the sampled token
        assert len(r["topk_ids"]) == len(r["response_ids"]) and all(len(k) == 2 for k in r["topk_ids"])
        assert r["finish_reason"] == ("stop" if r["response_ids"][-1] in target.stop_ids else "length")

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    engine = next(c for c in calls if c["event"] == "engine_args")["kwargs"]
    assert engine["model"] == str(tiny_target_dir) and engine["dtype"] == "float32"
    assert (engine["gpu_memory_utilization"], engine["max_num_seqs"]) == (0.8, 8)
    assert engine["distributed_executor_backend"] == "uni" and engine["runner"] == "generate"
    requests = [c for c in calls if c["event"] == "request"]
    assert len(requests) == ROWS
    by_seed = {c["params"]["seed"]: c["params"] for c in requests}
    for r in rows.to_pylist():  # every row reached vLLM with its own settings and seed
        sent = by_seed[r["seed"]]
        assert (sent["temperature"], sent["top_p"], sent["top_k"], sent["max_tokens"]) == (
            r["temperature"], r["top_p"], r["top_k"], r["max_new_tokens"])
        assert sent["stop_token_ids"] == list(target.stop_ids) and sent["logprobs"] == 2 and sent["detokenize"] is False


@pytest.mark.timeout(120)
def test_vllm_missing_on_the_actors_is_a_clear_error(ray_session, tmp_path, tiny_target_dir, prompts_file):
    recipe, _ = tiny_recipe(tmp_path / "run", tiny_target_dir, prompts_file, engine="vllm")
    with pytest.raises(MissingDependencyError, match=r"cannot import vllm.*fastdraft\[gpu\].*runtime_env"):
        run_generate(recipe)
    assert not list((recipe.run_dir / "alignment").glob("part-*"))


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_smollm2_answers_chat_prompts_and_writes_its_own_magpie_prompts(ray_session, tmp_path, smollm2_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "What is the capital of France?"}) + "\n")
    recipe = recipe_from_dict({
        "name": "smol", "workdir": str(tmp_path / "run"), "target": {"model": "embedded:smollm2-135m-instruct"},
        "generate": {"prompts": [{"name": "inst", "kind": "jsonl", "path": str(prompts)},
                                 {"name": "magpie", "kind": "magpie", "limit": 2}],
                     "sampling": [{"temperature": 0.0, "max_new_tokens": 20}], "max_prompt_tokens": 80, "batch_size": 8,
                     "max_actors": 1, "cpus_per_actor": 1},
    })
    summary = run_generate(recipe)
    rows = read_rows(recipe.run_dir).to_pylist()
    answer = next(r for r in rows if r["source"] == "inst")
    assert answer["prompt_text"].startswith("<|im_start|>system\n") and answer["prompt_text"].endswith("<|im_start|>assistant\n")
    assert "Paris" in answer["response_text"]
    magpie = [r for r in rows if r["source"] == "magpie"]
    assert len(magpie) == 2 == summary["prompts"] - 1
    state = json.loads((recipe.run_dir / "alignment" / "magpie-magpie.json").read_text())
    smol = TransformersBackend(smollm2_dir)
    prefix = smol.tokenizer("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                            "<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    for q in state["kept"]:
        assert any(f"user\n{q['text']}<|im_end|>" in r["prompt_text"] for r in magpie)
    q = state["kept"][0]  # the target wrote it: its own sample with the recorded seed gives the same text
    out = smol.generate([(prefix, SamplingParams(temperature=1.0, max_new_tokens=80 - len(prefix) - 8, seed=q["seed"]))])[0]
    assert smol.tokenizer.decode(out.token_ids, skip_special_tokens=True).strip() == q["text"]
