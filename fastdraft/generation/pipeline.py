"""The generate stage: the target answers prompts on an autoscaled Ray Data actor pool -> the alignment set.

    fastdraft generate jobs/recipes/demo.yaml [--set generate.max_actors=2]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/generate.py jobs/recipes/demo.yaml

Flow (all in `run_generate`):
  1. read every prompt source on the driver (`prompts.py`): format, chat template, length policy, dedupe;
     Magpie sources first ask the target for their user turns (one Ray Data pass of their own);
  2. plan one row per (prompt, sampling setting, sample index), keyed `prompt_id|setting|sample`, with a
     seed derived from the key; rows whose key is already in `alignment/part-*.parquet` are skipped (resume);
  3. `ray.data.from_items(rows).map_batches(GenerateActor, compute=ActorPoolStrategy(min_size, max_size),
     num_cpus=, num_gpus=)`: each actor loads the engine once and answers a batch per call;
  4. the driver streams the results and writes each block as its own part (`*.partial`, then rename), so
     an interrupted run loses at most the batches in flight and a rerun completes the set exactly once;
  5. `alignment/manifest.json` (alignment contract: complete, target, tokenizer_fingerprint, settings,
     counts, section_hash) is rewritten with `complete: true` at the end; `runs` lists every run (engine, origin,
     its parts' run id) and `counts.by_origin` how many rows came from each engine or endpoint.

`generate.engine: openai` (`endpoint.py`) answers through an OpenAI-compatible endpoint from the same actors; its
tokenizer is checked against the target's (`check_endpoint`) before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fastdraft.config import GenerateConfig, Recipe, SamplingConfig
from fastdraft.errors import FastdraftError, MissingDependencyError, RecipeError
from fastdraft.generation.backends import Generated, Request, make_backend
from fastdraft.generation.prompts import (
    EncodedPrompt, PromptEncoder, check_source, load_prompts, magpie_prompts, reserved_eval_texts, stable_seed,
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
_TOPK_FIELDS = [("topk_ids", pa.list_(pa.list_(pa.int32()))), ("topk_logprobs", pa.list_(pa.list_(pa.float32())))]


def alignment_schema(store_topk: int = 0) -> pa.Schema:
    """The alignment contract's columns (plus max_new_tokens and seed, which make each row reproducible)."""
    return pa.schema(_INPUT_FIELDS + _OUTPUT_FIELDS + (_TOPK_FIELDS if store_topk else []))


def setting_label(s: SamplingConfig) -> str:
    """A readable, stable name of a sampling setting, part of every row key."""
    return f"T{s.temperature:g}-p{s.top_p:g}-k{s.top_k}-m{s.max_new_tokens}"


def row_key(prompt_id: str, s: SamplingConfig, sample_index: int) -> str:
    return f"{prompt_id}|{setting_label(s)}|{sample_index}"


def plan_rows(prompts: list[EncodedPrompt], settings: list[SamplingConfig], seed: int, done: set[str]) -> list[dict]:
    """One row per (prompt, setting, sample) whose key is not in `done`, grouped by setting, short prompts first."""
    rows = []
    for order, s in enumerate(settings):
        for p in sorted(prompts, key=lambda p: len(p.prompt_ids)):  # similar lengths share a batch: less padding
            for j in range(s.n):
                key = row_key(p.prompt_id, s, j)
                if key in done:
                    continue
                rows.append(dict(
                    key=key, prompt_id=p.prompt_id, prompt_ids=p.prompt_ids, prompt_text=p.prompt_text,
                    temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                    sample_index=j, seed=stable_seed(seed, key), source=p.source,
                ))
    return rows


# --------------------------------------------------------------------------------------------
# The Ray Data actor
# --------------------------------------------------------------------------------------------
class GenerateActor:
    """Loads the engine once per actor; each call answers one batch of planned rows (1 row in, 1 row out)."""

    def __init__(self, engine: str, model: str, dtype: str, device: str, store_topk: int = 0,
                 trust_remote_code: bool = False, engine_kwargs: dict | None = None, threads: int = 1,
                 endpoint: dict | None = None, prompt_format: str | None = None):
        import torch

        from fastdraft.tokenizer import load_tokenizer

        if device == "cpu":
            torch.set_num_threads(max(1, threads))  # the recipe's torch_threads, else the CPUs Ray reserved
        self.backend = make_backend(engine, model, dtype=dtype, device=device, store_topk=store_topk,
                                    trust_remote_code=trust_remote_code, engine_kwargs=engine_kwargs,
                                    endpoint=endpoint, prompt_format=prompt_format)
        self.origin = f"local:{engine}"
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.store_topk = store_topk
        self.actor_id = f"{socket.gethostname()}:{os.getpid()}"

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


def generate_on_ray(rows: list[dict], cfg: GenerateConfig, recipe: Recipe) -> Iterator[pa.Table]:
    """Stream planned rows through the engine actor pool; yields result blocks as they finish."""
    import ray.data

    device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    blocks = max(1, min(1000, math.ceil(len(rows) / cfg.batch_size)))
    if cfg.engine == "vllm":  # Ray Data LLM's vLLM processor: fastdraft/generation/vllm_processor.py
        from fastdraft.generation.vllm_processor import generate_with_vllm

        planned = ray.data.from_items(rows, override_num_blocks=blocks)
        yield from generate_with_vllm(planned, cfg, recipe.target).iter_batches(batch_size=None, batch_format="pyarrow")
        return
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        GenerateActor,
        fn_constructor_kwargs=dict(
            engine=cfg.engine, model=recipe.target.model, dtype=recipe.target.dtype, device=device,
            store_topk=cfg.store_topk, trust_remote_code=recipe.target.trust_remote_code,
            engine_kwargs=dict(cfg.engine_kwargs), threads=cfg.torch_threads or max(1, int(cfg.cpus_per_actor)),
            endpoint=cfg.openai.model_dump(mode="json") if cfg.openai else None,
            prompt_format=cfg.openai.prompt_format if cfg.openai and cfg.openai.prompt_format != "auto" else None,
        ),
        batch_size=cfg.batch_size, batch_format="pyarrow", compute=actor_pool(cfg),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        udf_modifying_row_count=False, runtime_env=cfg.runtime_env,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


# --------------------------------------------------------------------------------------------
# The alignment directory: parts, resume, manifest
# --------------------------------------------------------------------------------------------
class AlignmentWriter:
    """Writes result blocks as `part-<run>-<n>.parquet` atomically and knows which keys exist."""

    def __init__(self, out_dir: Path, store_topk: int = 0):
        self.dir, self.schema = out_dir, alignment_schema(store_topk)
        self.run_id, self.seq = uuid.uuid4().hex[:8], 0
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.partial"):  # a write that an earlier interruption cut short
            stale.unlink()

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def done_keys(self) -> set[str]:
        keys: set[str] = set()
        for part in self.parts():
            try:
                keys.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
            except (pa.ArrowException, OSError) as exc:
                raise FastdraftError(f"{part}: unreadable alignment part ({exc}); delete it and rerun to regenerate its rows") from None
        return keys

    def write(self, table: pa.Table) -> Path:
        table = table.select(self.schema.names).cast(self.schema)
        path = self.dir / f"part-{self.run_id}-{self.seq:05d}.parquet"
        tmp = path.with_name(path.name + ".partial")
        pq.write_table(table, tmp)
        tmp.replace(path)
        self.seq += 1
        return path

    def counts(self) -> dict:
        """Rows, prompts, tokens and finish reasons over every part (also proves keys are unique)."""
        c: dict[str, Counter] = {k: Counter() for k in ("by_source", "by_setting", "finish_reason", "by_origin",
                                                        "by_prompt_mode", "by_response_mode")}
        keys, prompts, resp_tokens, prompt_tokens = set(), set(), 0, 0
        rows = duplicates = 0
        for part in self.parts():
            provenance = [c for c in ("origin", "prompt_mode", "response_mode") if c in pq.read_schema(part).names]
            t = pq.read_table(part, columns=["key", "prompt_id", "source", "finish_reason", "prompt_ids", "response_ids",
                                             *provenance])
            for key in t.column("key").to_pylist():
                duplicates += key in keys
                keys.add(key)
            prompts.update(t.column("prompt_id").to_pylist())
            c["by_source"].update(t.column("source").to_pylist())
            c["by_setting"].update(k.split("|")[1] for k in t.column("key").to_pylist())
            c["finish_reason"].update(t.column("finish_reason").to_pylist())
            resp_tokens += pc.sum(pc.list_value_length(t.column("response_ids"))).as_py() or 0
            prompt_tokens += pc.sum(pc.list_value_length(t.column("prompt_ids"))).as_py() or 0
            for column in ("origin", "prompt_mode", "response_mode"):  # parts written before these columns: unrecorded
                values = t.column(column).to_pylist() if column in provenance else [None] * t.num_rows
                c[f"by_{column}"].update("unrecorded" if v is None else v for v in values)
            rows += t.num_rows
        return {"rows": rows, "prompts": len(prompts), "duplicates": duplicates, "response_tokens": resp_tokens,
                "prompt_tokens": prompt_tokens, "parts": len(self.parts()), **{k: dict(v) for k, v in c.items()}}


def resume_hash(recipe: Recipe, fingerprint: str) -> str:
    """What decides the rows' content; batch sizes, actor counts, limits and the engine may change on resume."""
    cfg = recipe.section("generate")
    data = cfg.model_dump(include={"prompts", "sampling", "max_prompt_tokens", "overlong", "store_topk", "seed"}, mode="json")
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


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out_dir / MANIFEST)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def collect_prompts(cfg: GenerateConfig, recipe: Recipe, encoder: PromptEncoder, out_dir: Path) -> tuple[list[EncodedPrompt], dict]:
    """Every source's prompts (Magpie sources ask the target on Ray); prompt ids start with the source's name."""
    prompts, stats = [], {}
    reserved = reserved_eval_texts()
    for source in cfg.prompts:
        if source.kind == "magpie":
            def ask(requests: list[Request]) -> list[Generated]:
                return ask_target(requests, cfg, recipe)
            got, st = magpie_prompts(source, encoder, ask, out_dir / f"magpie-{source.name}.json", cfg.seed, reserved)
        else:
            got, st = load_prompts(source, encoder, reserved)
        stats[source.name] = st.to_dict()
        print(f"[generate] prompts from '{source.name}': {len(got)} "
              f"(skipped {dict(st.skipped) or 0}, truncated {st.truncated})", flush=True)
        prompts += got
    return prompts, stats


def ask_target(requests: list[Request], cfg: GenerateConfig, recipe: Recipe) -> list[Generated]:
    """Run arbitrary requests (e.g. Magpie's user-turn prompts) through the same actor pool, in order."""
    rows = [dict(key=str(i), prompt_id="", prompt_ids=ids, prompt_text="", temperature=p.temperature, top_p=p.top_p,
                 top_k=p.top_k, max_new_tokens=p.max_new_tokens, sample_index=0, seed=p.seed or 0, source="")
            for i, (ids, p) in enumerate(requests)]
    out: list[Generated | None] = [None] * len(rows)
    for block in generate_on_ray(rows, cfg, recipe):
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
    cfg, endpoint = check_endpoint(cfg, tokenizer, recipe.target.model)
    ensure_ray()
    check_engine_available(cfg)
    writer = AlignmentWriter(out_dir, cfg.store_topk)
    manifest = {
        "complete": False, "target": recipe.target.model, "tokenizer_fingerprint": fingerprint,
        "settings": [{**s.model_dump(mode="json"), "label": setting_label(s)} for s in cfg.sampling],
        "counts": {}, "section_hash": recipe.section_hash("generate"), "resume_hash": resume, "engine": cfg.engine,
        "target_context": context, "store_topk": cfg.store_topk, "columns": alignment_schema(cfg.store_topk).names,
        "endpoint": endpoint,
        # every run, in order: which engine (and endpoint) wrote which parts (`part-<run_id>-*.parquet`); an
        # interrupted run keeps finished: false
        "runs": previous.get("runs", []) + [{"run_id": writer.run_id, "engine": cfg.engine, "origin": origin_of(cfg),
                                             "prompt_format": endpoint["prompt_format"] if endpoint else "token_ids",
                                             "started_at": time.time(), "finished": False}],
    }
    write_manifest(out_dir, manifest)
    prompts, sources = collect_prompts(cfg, recipe, PromptEncoder(tokenizer, cfg.max_prompt_tokens, cfg.overlong), out_dir)
    done = writer.done_keys()
    rows = plan_rows(prompts, cfg.sampling, cfg.seed, done)
    print(f"[generate] {len(prompts)} prompts x {len(cfg.sampling)} settings: {len(rows)} rows to generate, "
          f"{len(done)} already written in {out_dir}", flush=True)
    actors, generated = _write_all(rows, cfg, recipe, writer)
    counts = writer.counts()
    manifest["runs"][-1].update(finished=True, new_rows=generated, finished_at=time.time())
    manifest.update(complete=True, counts=counts, sources=sources, actors_used=len(actors), generate=cfg.model_dump(mode="json"))
    write_manifest(out_dir, manifest)
    return {"alignment": str(out_dir), "rows": counts["rows"], "prompts": counts["prompts"], "new_rows": generated,
            "resumed_rows": len(done), "response_tokens": counts["response_tokens"], "actors_used": len(actors),
            "finish_reason": counts["finish_reason"]}


def _write_all(rows: list[dict], cfg: GenerateConfig, recipe: Recipe, writer: AlignmentWriter) -> tuple[set[str], int]:
    """Stream the actors' blocks into parts, with progress (rows, tokens/s, ETA)."""
    if not rows:
        return set(), 0
    progress = Progress("generate", unit="rows", total=len(rows), every_s=float("inf"))
    actors, tokens, last = set(), 0, time.perf_counter()
    for block in generate_on_ray(rows, cfg, recipe):
        actors.update(block.column("_actor").to_pylist())
        writer.write(block)
        new_tokens = pc.sum(pc.list_value_length(block.column("response_ids"))).as_py() or 0
        tokens += new_tokens
        progress.update(block.num_rows, tok=new_tokens)
        if time.perf_counter() - last >= 5.0 or progress.count == len(rows):
            last = time.perf_counter()
            print(f"{progress.line()} | {tokens / max(progress.elapsed, 1e-9):,.1f} tok/s | actors {len(actors)}", flush=True)
    return actors, progress.count
