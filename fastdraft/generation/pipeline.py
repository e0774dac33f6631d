"""The generate stage: the target answers prompts on an autoscaled Ray Data actor pool -> the alignment set.

    fastdraft generate jobs/recipes/demo.yaml [--set generate.max_actors=2]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/generate.py jobs/recipes/demo.yaml

Everything that grows with the number of prompts runs in Ray tasks and actors; the driver holds the recipe,
per-source stats, one small summary per finished block and the manifest, so its memory stays flat from a dozen
prompts to the paper recipe's ~430k x 4 settings (tests/test_generate_streaming.py watches its RSS).

Flow (all in `run_generate`):
  1. Magpie sources first ask the target for their user turns (`magpie_queries`, chunks of `MAGPIE_CHUNK` requests
     through the same actor pool); the driver keeps their texts, bounded by the source's required `limit`, in
     `magpie-<name>.json`;
  2. the prompt set: one Ray task per source (`encode_source`, on the driver's node, where the source files were
     checked) reads, formats, applies the chat template and length policy, drops reserved evaluation texts and
     dedupes, in reading order (so `limit` and dedupe are exactly the sequential ones; prompt ids carry their
     source's name, so there is no dedupe across sources), and writes `prompts-<run>/` Parquet files of
     `PROMPTS_PER_FILE` prompts (removed at the end); the driver gets each source's stats;
  3. what is written already: one Ray task (`survey_parts`) reads the `key` column of `part-*.parquet` and leaves
     the keys in the object store; the driver gets their count and an ObjectRef. Resume is then a filter in the
     planner (a hash set lookup, `pc.is_in`): exact, per block, with no all-to-all join barrier before the first
     answer; the price is the keys themselves in the object store (~50 bytes a row: ~85 MB at 1.7M rows);
  4. `plan_block` (Ray Data map over the prompt files): one row per (prompt, sampling setting, sample index),
     keyed `prompt_id|setting|sample`, seeded from the key, minus the keys already written, grouped by setting and
     sorted by prompt length within the block (a global sort would be an all-to-all barrier before the first answer),
     re-cut into blocks of `batch_size` rows; a first cheap pass only counts them (an exact total for the ETA, and
     no engine is started when nothing is left);
  5. `generate_rows`: planned rows in, result rows out (`map_batches(GenerateActor, compute=ActorPoolStrategy(min,
     max))`, one engine per actor); `engine: vllm` is Ray Data LLM's vLLM processor instead (`vllm_processor.py`);
  6. `write_part` (a Ray Data map after it): each block is written by the worker as its own
     `part-<run>-<id>.parquet` (`*.partial`, then rename) and only a summary row (rows, tokens, actor) reaches the
     driver, for progress (rows, tokens/s, ETA): an interrupted run loses at most the blocks in flight and a rerun
     completes the set exactly once;
  7. `alignment/manifest.json` (alignment contract: complete, target, tokenizer_fingerprint, settings, counts,
     section_hash) is rewritten with `complete: true` at the end, `counts` from `survey_parts` over every part;
     `runs` lists every run (engine, origin, its parts' run id) and `counts.by_origin` how many rows came from each
     engine or endpoint.

`generate.engine: openai` (`endpoint.py`) answers through an OpenAI-compatible endpoint from the same actors; its
tokenizer is checked against the target's (`check_endpoint`) before anything is written.
A source's own `engine` sends its prompts elsewhere than `generate.engine` (some to the endpoint, the rest local):
step 5 then runs once per engine over its sources' prompt files and the outputs are unioned (`answer_by_engine`);
the manifest's run says each source's origin (`origin_by_source`) and every row has its own `origin`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fastdraft.config import GenerateConfig, Recipe, SamplingConfig
from fastdraft.errors import FastdraftError, MissingDependencyError, RecipeError
from fastdraft.generation.backends import Generated, Request, generation_dtype, make_backend
from fastdraft.config import PromptSourceConfig
from fastdraft.generation.prompts import (
    EncodedPrompt, PromptEncoder, SourceStats, check_source, iter_magpie_prompts, iter_prompts, magpie_queries,
    reserved_eval_texts, stable_seed,
)
from fastdraft.layout import RunLayout
from fastdraft.plan import check_stage
from fastdraft.progress import Progress
from fastdraft.speculative.types import SamplingParams

MANIFEST = "manifest.json"
_INPUT_FIELDS = [
    ("key", pa.string()), ("prompt_id", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
    ("prompt_text", pa.string()), ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int32()),
    ("max_new_tokens", pa.int32()), ("sample_index", pa.int32()), ("seed", pa.int64()), ("source", pa.string()),
]
_OUTPUT_FIELDS = [("response_ids", pa.list_(pa.int32())), ("response_text", pa.string()), ("finish_reason", pa.string()),
                  ("origin", pa.string()), ("prompt_mode", pa.string()), ("response_mode", pa.string())]
"""origin: `local:<engine>` or `endpoint:<model>@<base_url>` (a set resumed with another engine mixes them);
prompt_mode: token_ids (the exact ids reached the model), text (re-tokenized by the server) or text_mismatch (the
server counted other prompt tokens); response_mode: token_ids, logprob_tokens (mapped back) or text_retokenized."""
_PROMPT_FIELDS = [("prompt_id", pa.string()), ("source", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
                  ("prompt_text", pa.string())]
_SUMMARY_FIELDS = [("part", pa.string()), ("rows", pa.int64()), ("response_tokens", pa.int64()),
                   ("actors", pa.list_(pa.string()))]
PROMPTS_PER_FILE = 4096
"""Prompts per file of the prompt set, and so per planning block (x samples per prompt rows)."""
SMALL_TASK_CPUS = 0.25
"""CPUs reserved by the planning and writing tasks: light work, and whole CPUs could be held by the engine
actors on GPU nodes (a task that cannot be scheduled would stall the stream)."""
_TOPK_FIELDS = [("topk_ids", pa.list_(pa.list_(pa.int32()))), ("topk_logprobs", pa.list_(pa.list_(pa.float32())))]


def alignment_schema(store_topk: int = 0) -> pa.Schema:
    """The alignment contract's columns (plus max_new_tokens and seed, which make each row reproducible)."""
    return pa.schema(_INPUT_FIELDS + _OUTPUT_FIELDS + (_TOPK_FIELDS if store_topk else []))


def setting_label(s: SamplingConfig) -> str:
    """A readable, stable name of a sampling setting, part of every row key."""
    return f"T{s.temperature:g}-p{s.top_p:g}-k{s.top_k}-m{s.max_new_tokens}"


def row_key(prompt_id: str, s: SamplingConfig, sample_index: int) -> str:
    return f"{prompt_id}|{setting_label(s)}|{sample_index}"


def plan_block(prompts: pa.Table, settings: list[dict], seed: int, done=None) -> pa.Table:
    """Ray Data map: a block of the prompt set -> one row per (prompt, setting, sample) whose key is not in `done`
    (an Arrow array of the keys already written, or its ObjectRef), grouped by setting, short prompts first."""
    import ray

    # similar lengths share a batch: less padding (stable sort: equal lengths keep the source's order)
    prompts = prompts.take(pc.sort_indices(pc.list_value_length(prompts.column("prompt_ids"))))
    ids = prompts.column("prompt_id").to_pylist()
    schema, tables = pa.schema(_INPUT_FIELDS), []
    for s in map(SamplingConfig.model_validate, settings):
        which = np.repeat(np.arange(len(ids)), s.n)  # a prompt's samples next to each other
        sample = np.tile(np.arange(s.n), len(ids))
        keys = [row_key(ids[i], s, j) for i, j in zip(which.tolist(), sample.tolist())]
        rows, n = prompts.take(pa.array(which)), len(keys)
        tables.append(pa.table({
            "key": keys, "prompt_id": rows.column("prompt_id"), "prompt_ids": rows.column("prompt_ids"),
            "prompt_text": rows.column("prompt_text"), "temperature": [s.temperature] * n, "top_p": [s.top_p] * n,
            "top_k": [s.top_k] * n, "max_new_tokens": [s.max_new_tokens] * n, "sample_index": sample,
            "seed": [stable_seed(seed, k) for k in keys], "source": rows.column("source"),
        }, schema=schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    done = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    if done is not None:
        table = table.filter(pc.invert(pc.is_in(table.column("key"), value_set=done)))
    return table


# --------------------------------------------------------------------------------------------
# The Ray Data actor
# --------------------------------------------------------------------------------------------
class GenerateActor:
    """Loads the engine once per actor; each call answers one batch of planned rows (1 row in, 1 row out)."""

    def __init__(self, engine: str, model: str, dtype: str | None, device: str, store_topk: int = 0,
                 trust_remote_code: bool = False, engine_kwargs: dict | None = None, threads: int = 1,
                 endpoint: dict | None = None, prompt_format: str | None = None, target_dtype: str = "float32"):
        import torch

        from fastdraft.tokenizer import load_tokenizer

        if device == "cpu":
            torch.set_num_threads(max(1, threads))  # the recipe's torch_threads, else the CPUs Ray reserved
        requested, dtype = dtype, generation_dtype(dtype, target_dtype, device)  # `auto` depends on the actor's own CPU
        self.backend = make_backend(engine, model, dtype=dtype, device=device, store_topk=store_topk,
                                    trust_remote_code=trust_remote_code, engine_kwargs=engine_kwargs,
                                    endpoint=endpoint, prompt_format=prompt_format)
        self.origin = f"local:{engine}"
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.store_topk = store_topk
        self.actor_id = f"{socket.gethostname()}:{os.getpid()}"
        if engine in ("transformers", "lean"):
            print(f"[generate] actor {self.actor_id}: {engine} engine, target in {dtype} on {device}"
                  + (" (generate.dtype auto)" if requested == "auto" else ""), flush=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests: list[Request] = [
            (r["prompt_ids"], SamplingParams(temperature=r["temperature"], top_p=r["top_p"], top_k=r["top_k"],
                                             max_new_tokens=r["max_new_tokens"], seed=r["seed"]))
            for r in rows
        ]
        outs = self.backend.generate(requests)
        return results_table(rows, outs, self.tokenizer, self.store_topk, self.actor_id, self.origin)


def results_table(rows: list[dict], outs: list[Generated], tokenizer, store_topk: int, actor_id: str = "",
                  origin: str = "local") -> pa.Table:
    """Planned rows + the engine's answers as a table in the alignment schema (+ `_actor`, dropped on write)."""
    columns = {name: [r[name] for r in rows] for name, _ in _INPUT_FIELDS}
    columns["response_ids"] = [o.token_ids for o in outs]
    columns["response_text"] = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    columns["finish_reason"] = [o.finish_reason for o in outs]
    columns["origin"] = [o.origin or origin for o in outs]
    columns["prompt_mode"] = [o.prompt_mode for o in outs]
    columns["response_mode"] = [o.response_mode for o in outs]
    if store_topk:
        columns["topk_ids"] = [o.topk_ids or [] for o in outs]
        columns["topk_logprobs"] = [o.topk_logprobs or [] for o in outs]
    table = pa.Table.from_pydict(columns, schema=alignment_schema(store_topk))
    return table.append_column("_actor", pa.array([actor_id] * len(rows), pa.string()))


def actor_pool(cfg: GenerateConfig):
    """The autoscaling actor pool from the recipe: between min_actors and max_actors engines."""
    import ray.data

    if cfg.min_actors > cfg.max_actors:
        raise RecipeError(f"generate.min_actors ({cfg.min_actors}) is larger than generate.max_actors ({cfg.max_actors})")
    return ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors)


def generate_rows(planned, cfg: GenerateConfig, recipe: Recipe):
    """The generation step: a Ray Dataset of planned rows (`_INPUT_FIELDS`) -> the result rows (alignment schema +
    `_actor`), one each, answered on the autoscaling engine actor pool. Any step with this contract can replace it."""
    device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    if cfg.engine == "vllm":  # Ray Data LLM's vLLM processor: fastdraft/generation/vllm_processor.py
        from fastdraft.generation.vllm_processor import generate_with_vllm

        return generate_with_vllm(planned, cfg, recipe.target)
    return planned.map_batches(
        GenerateActor,
        fn_constructor_kwargs=dict(
            engine=cfg.engine, model=recipe.target.model, dtype=cfg.dtype, target_dtype=recipe.target.dtype, device=device,
            store_topk=cfg.store_topk, trust_remote_code=recipe.target.trust_remote_code,
            engine_kwargs=dict(cfg.engine_kwargs), threads=cfg.torch_threads or max(1, int(cfg.cpus_per_actor)),
            endpoint=cfg.openai.model_dump(mode="json") if cfg.openai else None,
            prompt_format=cfg.openai.prompt_format if cfg.openai and cfg.openai.prompt_format != "auto" else None,
        ),
        batch_size=cfg.batch_size, batch_format="pyarrow", compute=actor_pool(cfg),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        udf_modifying_row_count=False, runtime_env=cfg.runtime_env,
    )


# --------------------------------------------------------------------------------------------
# The alignment directory: parts written by the workers, what they hold, the manifest
# --------------------------------------------------------------------------------------------
def write_atomic(table: pa.Table, path: Path) -> None:
    """A file is whole or absent: written as `*.partial`, then renamed (a rerun deletes stale partials)."""
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_part(block: pa.Table, out_dir: str, run_id: str, store_topk: int) -> pa.Table:
    """Ray Data map after the generation step: the worker writes its block as `part-<run_id>-<id>.parquet` and
    passes on one summary row (rows, response tokens, actors) for the driver's progress."""
    schema = alignment_schema(store_topk)
    name = f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
    write_atomic(block.select(schema.names).cast(schema), Path(out_dir) / name)
    tokens = pc.sum(pc.list_value_length(block.column("response_ids"))).as_py() or 0
    actors = sorted(set(block.column("_actor").to_pylist()))
    return pa.table({"part": [name], "rows": [block.num_rows], "response_tokens": [tokens], "actors": [actors]},
                    schema=pa.schema(_SUMMARY_FIELDS))


def _value_counts(column) -> Counter:
    counts = pc.value_counts(column)
    return Counter(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


def _read_part(part: Path, columns: list[str] | None = None):
    """A part's columns (its schema when `columns` is None), or a clear error naming the file."""
    try:
        return pq.read_schema(part) if columns is None else pq.read_table(part, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise FastdraftError(f"{part}: unreadable alignment part ({exc}); delete it and rerun to regenerate its rows") from None


def survey_parts(out_dir: str, keys_only: bool = False) -> tuple[dict, pa.Array | None]:
    """Ray task (two returns): the manifest's `counts` over every part (also proves keys unique; only `rows` with
    `keys_only`), and the keys already written, which stay in the object store for the planner's resume filter. A
    worker reads the parts one at a time; the driver gets the counts and an ObjectRef."""
    c: dict[str, Counter] = {k: Counter() for k in ("by_source", "by_setting", "finish_reason", "by_origin",
                                                    "by_prompt_mode", "by_response_mode")}
    keys, prompt_ids, resp_tokens, prompt_tokens = [], [], 0, 0
    parts = sorted(Path(out_dir).glob("part-*.parquet"))
    for part in parts:
        if keys_only:  # what resume needs: no list columns read
            keys += _read_part(part, ["key"]).column("key").chunks
            continue
        provenance = [c for c in ("origin", "prompt_mode", "response_mode") if c in _read_part(part).names]
        t = _read_part(part, ["key", "prompt_id", "source", "finish_reason", "prompt_ids", "response_ids", *provenance])
        keys += t.column("key").chunks
        prompt_ids += t.column("prompt_id").chunks
        c["by_source"].update(_value_counts(t.column("source")))
        c["by_setting"].update(_value_counts(pc.list_element(pc.split_pattern(t.column("key"), "|"), 1)))
        c["finish_reason"].update(_value_counts(t.column("finish_reason")))
        resp_tokens += pc.sum(pc.list_value_length(t.column("response_ids"))).as_py() or 0
        prompt_tokens += pc.sum(pc.list_value_length(t.column("prompt_ids"))).as_py() or 0
        for column in ("origin", "prompt_mode", "response_mode"):  # parts written before these columns: unrecorded
            values = pc.fill_null(t.column(column), "unrecorded") if column in provenance else pa.array(["unrecorded"] * t.num_rows)
            c[f"by_{column}"].update(_value_counts(values))
    done = pa.chunked_array(keys, pa.string()).combine_chunks() if keys else None
    rows = len(done) if done is not None else 0
    if keys_only:
        return {"rows": rows}, done
    distinct = pc.count_distinct(done).as_py() if done is not None else 0
    prompts = pc.count_distinct(pa.chunked_array(prompt_ids, pa.string())).as_py() if prompt_ids else 0
    counts = {"rows": rows, "prompts": prompts, "duplicates": rows - distinct, "response_tokens": resp_tokens,
              "prompt_tokens": prompt_tokens, "parts": len(parts), **{k: dict(v) for k, v in c.items()}}
    return counts, done


def survey(out_dir: Path, keys_only: bool = False) -> tuple[dict, object]:
    """`survey_parts` on a worker: (counts, ObjectRef of the keys written) without the keys reaching the driver."""
    import ray

    from fastdraft.data.pipeline import user_error

    task = ray.remote(num_cpus=SMALL_TASK_CPUS)(survey_parts).options(num_returns=2)
    counts_ref, keys_ref = task.remote(str(out_dir), keys_only)
    try:
        return ray.get(counts_ref), keys_ref
    except Exception as exc:
        raise (user_error(exc) or exc) from None


def resume_hash(recipe: Recipe, fingerprint: str) -> str:
    """What decides the rows' content; batch sizes, actor counts, limits and the engine may change on resume."""
    cfg = recipe.section("generate")
    content = {"prompts", "sampling", "max_prompt_tokens", "overlong", "store_topk", "seed", "dtype"}
    data = {k: v for k, v in cfg.identity().items() if k in content}  # dtype only when set (`KEYED_WHEN_SET`)
    for source in data["prompts"]:
        source.pop("limit", None)  # raising a limit extends the set; the keys of the rows already written stay valid
    payload = {"target": recipe.target.model, "tokenizer_fingerprint": fingerprint, "generate": data}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(out_dir: Path, fingerprint: str, resume: str) -> dict | None:
    """The existing manifest, if this run may add to it; a clear error if the rows there are of another kind."""
    from fastdraft.tokenizer import check_fingerprints

    path = out_dir / MANIFEST
    if not path.is_file():
        if any(out_dir.glob("part-*.parquet")):
            raise FastdraftError(f"{out_dir} holds alignment parts but no {MANIFEST}; move them away or pick another workdir")
        return None
    manifest = json.loads(path.read_text())
    check_fingerprints(fingerprint, manifest.get("tokenizer_fingerprint", "?"), "the target", str(path))
    if manifest.get("resume_hash") != resume:
        raise FastdraftError(
            f"{out_dir} was generated with other generate settings (prompts, sampling, max_prompt_tokens, overlong, "
            f"store_topk or seed changed); resuming would mix two alignment sets. Use another workdir or delete {out_dir}"
        )
    return manifest


def check_context(cfg: GenerateConfig, recipe: Recipe) -> int | None:
    """Refuse settings whose longest prompt + response exceed the target's context window."""
    from fastdraft.checkpoint import load_config

    config = load_config(recipe.target.model, trust_remote_code=recipe.target.trust_remote_code)
    context = getattr(config, "max_position_embeddings", None)
    longest = max(s.max_new_tokens for s in cfg.sampling)
    if context and cfg.max_prompt_tokens + longest > context:
        raise RecipeError(
            f"generate.max_prompt_tokens ({cfg.max_prompt_tokens}) + the largest sampling max_new_tokens ({longest}) "
            f"exceed the target's context of {context} tokens ({recipe.target.model}); lower one of them"
        )
    return context


def check_engine_available(cfg: GenerateConfig) -> None:
    """Fail before anything is written when the actors' environment cannot import vLLM (a clear message,
    instead of an actor-constructor traceback from deep inside Ray Data)."""
    if cfg.engine != "vllm":
        return
    import ray

    @ray.remote(num_cpus=0)
    def has_vllm() -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("vllm") else f"{socket.gethostname()}:{sys.executable}"

    where = ray.get(has_vllm.options(runtime_env=cfg.runtime_env, num_gpus=cfg.gpus_per_actor or None).remote())
    if where is not None:
        raise MissingDependencyError(
            f"generate.engine 'vllm': the generation actors' environment ({where}, runtime_env={cfg.runtime_env}) "
            f"cannot import vllm. Run the job in an image with vLLM (pip install 'fastdraft[gpu]'), or set "
            f"generate.runtime_env, e.g. {{pip: [vllm], env_vars: {{...}}}} (vLLM pins its own torch/transformers: "
            f"see README, 'Optional stacks')"
        )


def origin_of(cfg: GenerateConfig) -> str:
    """The `origin` column value of the rows this configuration writes."""
    if cfg.engine == "openai":
        from fastdraft.generation.endpoint import origin_label

        return origin_label(cfg.openai)
    return f"local:{cfg.engine}"


def check_endpoint(cfg: GenerateConfig, tokenizer, target: str) -> tuple[GenerateConfig, dict | None]:
    """engine 'openai': the API key is set, the endpoint serves the model with the target's tokenizer (refused with
    a `TokenizerMismatchError` naming both sides otherwise), and `prompt_format: auto` resolved to what the server
    takes; before anything is written. Returns the config with the format resolved and the manifest's `endpoint`."""
    if cfg.engine != "openai":
        return cfg, None
    from fastdraft.generation.endpoint import api_key, check_endpoint_tokenizer, origin_label, resolve_prompt_format

    api_key(cfg.openai)
    check = check_endpoint_tokenizer(cfg.openai, tokenizer, target)
    fmt = resolve_prompt_format(cfg.openai, tokenizer)
    print(f"[generate] endpoint {cfg.openai.base_url} model {cfg.openai.model!r}: tokenizer checked by {check['method']}, "
          f"prompts sent as {'exact token ids' if fmt == 'token_ids' else 'text (re-tokenized by the server)'}; "
          f"up to {cfg.openai.max_concurrency} requests in flight per actor x {cfg.max_actors} actor(s)", flush=True)
    cfg = cfg.model_copy(update={"openai": cfg.openai.model_copy(update={"prompt_format": fmt})})
    endpoint = {"origin": origin_label(cfg.openai), "base_url": cfg.openai.base_url, "model": cfg.openai.model,
                "prompt_format": fmt, "tokenizer_check": check, "chat_template": "applied by fastdraft (local tokenizer)"}
    return cfg, endpoint


def one_or_mixed(values: Iterable[str]) -> str:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else "mixed"


def engine_configs(cfg: GenerateConfig, tokenizer, target: str) -> tuple[dict[str, GenerateConfig], dict | None]:
    """Engine -> the generate settings its step runs with, for every engine a source uses (an endpoint checked by
    `check_endpoint` first); and the manifest's `endpoint`."""
    by_engine, endpoint = {}, None
    for engine in dict.fromkeys(cfg.engines().values()):
        by_engine[engine], checked = check_endpoint(cfg.model_copy(update={"engine": engine}), tokenizer, target)
        endpoint = endpoint or checked
    return by_engine, endpoint


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out_dir / MANIFEST)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prompts_table(prompts: list[EncodedPrompt]) -> pa.Table:
    return pa.table({"prompt_id": [p.prompt_id for p in prompts], "source": [p.source for p in prompts],
                     "prompt_ids": [p.prompt_ids for p in prompts], "prompt_text": [p.prompt_text for p in prompts]},
                    schema=pa.schema(_PROMPT_FIELDS))


def encode_source(index: int, source: dict, tokenizer, max_prompt_tokens: int, overlong: str, reserved: frozenset[str],
                  out_dir: str, magpie_state: str | None = None) -> dict:
    """Ray task: one source's prompts, encoded and deduped in reading order, written as `<index>-<n>.parquet` files
    of `PROMPTS_PER_FILE` prompts under `out_dir`; returns the source's stats (the task holds one file's prompts
    and the ids seen so far)."""
    source_cfg = PromptSourceConfig.model_validate(source)
    encoder, stats = PromptEncoder(tokenizer, max_prompt_tokens, overlong), SourceStats()
    if source_cfg.kind == "magpie":
        prompts = iter_magpie_prompts(source_cfg, encoder, json.loads(Path(magpie_state).read_text()), stats, reserved)
    else:
        prompts = iter_prompts(source_cfg, encoder, stats, reserved)
    for n, chunk in enumerate(chunked(prompts, PROMPTS_PER_FILE)):
        write_atomic(prompts_table(chunk), Path(out_dir) / f"{index:03d}-{n:05d}.parquet")
    return stats.to_dict()


def write_prompt_set(cfg: GenerateConfig, by_engine: dict[str, GenerateConfig], recipe: Recipe, tokenizer, out_dir: Path,
                     prompts_dir: Path) -> dict:
    """Every source's prompts into `prompts_dir` (Magpie sources ask the target first); returns stats per source."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from fastdraft.data.pipeline import user_error

    states = {}
    encoder = PromptEncoder(tokenizer, cfg.max_prompt_tokens, cfg.overlong)
    for source in cfg.prompts:
        if source.kind == "magpie":
            def ask(requests: list[Request], engine_cfg: GenerateConfig = by_engine[cfg.engines()[source.name]]) -> list[Generated]:
                return ask_target(requests, engine_cfg, recipe)
            states[source.name] = out_dir / f"magpie-{source.name}.json"
            magpie_queries(source, encoder, ask, states[source.name], cfg.seed)
    prompts_dir.mkdir(parents=True)
    # on the driver's node: the source files are where check_source found them (as when the driver read them)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=1)(encode_source).options(scheduling_strategy=here)
    tok_ref, reserved = ray.put(tokenizer), reserved_eval_texts()  # the driver's tokenizer: the one fingerprinted
    refs = [task.remote(i, source.model_dump(mode="json"), tok_ref, cfg.max_prompt_tokens, cfg.overlong, reserved,
                        str(prompts_dir), str(states[source.name]) if source.name in states else None)
            for i, source in enumerate(cfg.prompts)]
    stats = {}
    for source, ref in zip(cfg.prompts, refs):
        try:
            st = ray.get(ref)
        except Exception as exc:
            raise (user_error(exc) or exc) from None
        print(f"[generate] prompts from '{source.name}': {st['prompts']} "
              f"(skipped {st['skipped'] or 0}, truncated {st['truncated']})", flush=True)
        stats[source.name] = st
    return stats


def planned_rows(prompts_dir: Path, cfg: GenerateConfig, done, files: list[Path] | None = None):
    """The plan as a Ray Dataset: the prompt set's files (or the given ones) -> `plan_block` (keys already written
    filtered out), in blocks of one engine batch: each becomes its own part, so an interruption loses at most the
    batches in flight."""
    import ray.data

    paths = [str(f) for f in files] if files is not None else str(prompts_dir)
    return ray.data.read_parquet(paths, file_extensions=["parquet"]).map_batches(
        plan_block, fn_kwargs=dict(settings=[s.model_dump(mode="json") for s in cfg.sampling], seed=cfg.seed, done=done),
        batch_size=None, batch_format="pyarrow", num_cpus=SMALL_TASK_CPUS, udf_modifying_row_count=True,
    ).repartition(target_num_rows_per_block=cfg.batch_size)  # streaming: splits and joins blocks, no shuffle


def answer_by_engine(prompts_dir: Path, cfg: GenerateConfig, by_engine: dict[str, GenerateConfig], recipe: Recipe, done):
    """The result rows of every source, each answered by its own engine (`generate.prompts[].engine`): one
    generation step per engine over the prompt files of its sources (`encode_source` names them by source index),
    their outputs unioned, so an endpoint and a local pool answer at the same time."""
    engines = cfg.engines()
    steps = []
    for engine, engine_cfg in by_engine.items():
        files = [f for i, source in enumerate(cfg.prompts) if engines[source.name] == engine
                 for f in sorted(prompts_dir.glob(f"{i:03d}-*.parquet"))]
        if files:
            steps.append(generate_rows(planned_rows(prompts_dir, engine_cfg, done, files), engine_cfg, recipe))
    return steps[0].union(*steps[1:]) if len(steps) > 1 else steps[0]


def ask_target(requests: list[Request], cfg: GenerateConfig, recipe: Recipe) -> list[Generated]:
    """Run arbitrary requests (e.g. one chunk of Magpie's user-turn prompts) through the same actor pool, in order."""
    import ray.data

    rows = [dict(key=str(i), prompt_id="", prompt_ids=ids, prompt_text="", temperature=p.temperature, top_p=p.top_p,
                 top_k=p.top_k, max_new_tokens=p.max_new_tokens, sample_index=0, seed=p.seed or 0, source="")
            for i, (ids, p) in enumerate(requests)]
    out: list[Generated | None] = [None] * len(rows)
    blocks = max(1, min(1000, math.ceil(len(rows) / cfg.batch_size)))
    results = generate_rows(ray.data.from_items(rows, override_num_blocks=blocks), cfg, recipe)
    for block in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in block.select(["key", "response_ids", "finish_reason"]).to_pylist():
            out[int(r["key"])] = Generated(r["response_ids"], r["finish_reason"])
    return out  # type: ignore[return-value]


def run_generate(recipe: Recipe) -> dict:
    """Generate (or complete) the alignment set of `recipe` in `<run_dir>/alignment/`; returns a summary."""
    from fastdraft.raycluster import ensure_ray
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    cfg: GenerateConfig = recipe.section("generate")
    check_stage(recipe, "generate")
    out_dir = RunLayout(recipe.run_dir).alignment
    tokenizer = load_tokenizer(recipe.target.model, trust_remote_code=recipe.target.trust_remote_code)
    fingerprint = tokenizer_fingerprint(tokenizer)
    context = check_context(cfg, recipe)
    resume = resume_hash(recipe, fingerprint)
    names = [source.name for source in cfg.prompts]
    if len(set(names)) != len(names):
        raise RecipeError(f"generate.prompts: source names must be unique (they prefix the prompt ids), got {names}")
    for source in cfg.prompts:
        check_source(source)
    previous = check_resumable(out_dir, fingerprint, resume) or {}
    by_engine, endpoint = engine_configs(cfg, tokenizer, recipe.target.model)
    ensure_ray()
    for engine_cfg in by_engine.values():
        check_engine_available(engine_cfg)
    origins = {name: origin_of(by_engine[engine]) for name, engine in cfg.engines().items()}
    run_id = uuid.uuid4().hex[:8]
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("*.partial"), *out_dir.glob("prompts-*")]:  # what an earlier interruption left
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    manifest = {
        "complete": False, "target": recipe.target.model, "tokenizer_fingerprint": fingerprint,
        "settings": [{**s.model_dump(mode="json"), "label": setting_label(s)} for s in cfg.sampling],
        "counts": {}, "section_hash": recipe.section_hash("generate"), "resume_hash": resume, "engine": cfg.engine,
        "target_context": context, "store_topk": cfg.store_topk, "columns": alignment_schema(cfg.store_topk).names,
        "endpoint": endpoint,
        # every run, in order: which engine (and endpoint) wrote which parts (`part-<run_id>-*.parquet`); an
        # interrupted run keeps finished: false
        "runs": previous.get("runs", []) + [{"run_id": run_id, "engine": cfg.engine,
                                             "origin": one_or_mixed(origins.values()),
                                             "origin_by_source": dict(origins),
                                             "prompt_format": endpoint["prompt_format"] if endpoint else "token_ids",
                                             "started_at": time.time(), "finished": False}],
    }
    write_manifest(out_dir, manifest)
    prompts_dir = out_dir / f"prompts-{run_id}"
    sources = write_prompt_set(cfg, by_engine, recipe, tokenizer, out_dir, prompts_dir)
    prompts = sum(st["prompts"] for st in sources.values())
    before, done = survey(out_dir, keys_only=True)
    todo = planned_rows(prompts_dir, cfg, done).count() if prompts else 0  # a cheap pass: exact totals and ETA
    print(f"[generate] {prompts} prompts x {len(cfg.sampling)} settings: {todo} rows to generate, "
          f"{before['rows']} already written in {out_dir}", flush=True)
    actors, generated = set(), 0
    if todo:
        results = answer_by_engine(prompts_dir, cfg, by_engine, recipe, done)
        summaries = results.map_batches(
            write_part, fn_kwargs=dict(out_dir=str(out_dir), run_id=run_id, store_topk=cfg.store_topk),
            batch_size=None, batch_format="pyarrow", num_cpus=SMALL_TASK_CPUS, udf_modifying_row_count=True)
        actors, generated = follow(summaries, todo)
    del done  # the keys' ObjectRef: the object store may free them
    shutil.rmtree(prompts_dir)
    counts, _ = survey(out_dir)
    manifest["runs"][-1].update(finished=True, new_rows=generated, finished_at=time.time())
    manifest.update(complete=True, counts=counts, sources=sources, actors_used=len(actors), generate=cfg.model_dump(mode="json"))
    write_manifest(out_dir, manifest)
    return {"alignment": str(out_dir), "rows": counts["rows"], "prompts": counts["prompts"], "new_rows": generated,
            "resumed_rows": before["rows"], "response_tokens": counts["response_tokens"], "actors_used": len(actors),
            "finish_reason": counts["finish_reason"]}


def follow(summaries, total: int) -> tuple[set[str], int]:
    """Stream the workers' per-part summaries, with progress (rows, tokens/s, ETA); the rows stay on the workers."""
    progress = Progress("generate", unit="rows", total=total, every_s=float("inf"))
    actors, tokens, last = set(), 0, time.perf_counter()
    for block in summaries.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in block.to_pylist():
            actors.update(r["actors"])
            tokens += r["response_tokens"]
            progress.update(r["rows"], tok=r["response_tokens"])
        if time.perf_counter() - last >= 5.0 or progress.count == total:
            last = time.perf_counter()
            print(f"{progress.line()} | {tokens / max(progress.elapsed, 1e-9):,.1f} tok/s | actors {len(actors)}", flush=True)
    return actors, progress.count
