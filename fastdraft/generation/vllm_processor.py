"""`generate.engine: vllm`: the planned rows through Ray Data LLM's vLLM processor -> alignment rows.

    results = generate_with_vllm(ray.data.from_items(planned_rows), recipe.generate, recipe.target)
    for block in results.iter_batches(batch_size=None, batch_format="pyarrow"): ...   # the alignment schema

`generate_rows` (pipeline.py) calls this for `engine: vllm`; the other engines keep fastdraft's own actor pool.

What Ray Data LLM (`ray.data.llm.vLLMEngineProcessorConfig` + `build_processor`) gives: vLLM's maintained
async engine (`AsyncLLMEngine`) in a pool of Ray Data actors, each one keeping up to `max_concurrent_batches`
batches in flight, so vLLM's continuous batching always has rows to schedule; one Ray placement group per engine
for tensor/pipeline parallelism (vLLM's Ray executor when TP x PP > 1); engine restarts on a dead engine; Ray Data
streaming and backpressure between the planned rows, the engines and the writer.

How the recipe maps onto it:

| fastdraft                                   | Ray Data LLM / vLLM                                                     |
|---------------------------------------------|-------------------------------------------------------------------------|
| `target.model` (`embedded:` resolved)       | `model_source` (vLLM's `model`)                                          |
| `generate.dtype` or `target.dtype`, `target.trust_remote_code` | `engine_kwargs.dtype`, `engine_kwargs.trust_remote_code` |
| `generate.engine_kwargs`                    | `engine_kwargs` as they are (`tensor_parallel_size`, `pipeline_parallel_size`, `gpu_memory_utilization`, `max_model_len`, ...); they win over the two above |
| `generate.min_actors`, `max_actors`         | `concurrency=(min, max)`: the autoscaling pool of engines                |
| `generate.batch_size`                       | `batch_size`: rows per call to an engine actor                           |
| `generate.cpus_per_actor`, `gpus_per_actor` | TP x PP = 1: `placement_group_config={"bundles": [{"CPU": c, "GPU": g}]}`, the engine actor's own resources (GPU 0: a CPU-only actor, e.g. vLLM's CPU build). TP x PP > 1: Ray's default, one `{"GPU": 1, "CPU": 1}` bundle per vLLM worker, packed |
| `generate.runtime_env`                      | `runtime_env` of the engine actors (an image or `pip: [vllm]`: vLLM cannot share the CPU stack) |
| each row's temperature, top_p, top_k, max_new_tokens, seed | the row's `sampling_params` (vLLM's `SamplingParams`: per row, seed included) |
| `prompt_ids` (chat template already applied by fastdraft) | `tokenized_prompt`: exact token ids; Ray's chat-template, tokenize and detokenize stages are off |
| `generate.store_topk`                       | `sampling_params.logprobs`: vLLM's raw (temperature 1) log-probs, top `store_topk` kept per token |

Rows come back in the alignment schema (`results_table`, as from the other engines): `origin` `local:vllm`,
`prompt_mode`/`response_mode` `token_ids`, the response ending with its stop token when `finish_reason` is
"stop", `response_text` decoded by the target's tokenizer (the same call as the other engines). Ray's vLLM stage
does not pass vLLM's `finish_reason` through, so a row "stopped" when its last token is one of the stop tokens
(vLLM keeps the stop token in `token_ids`), otherwise it hit its length: the same rule as `cut_at_stop`.
Greedy rows equal the local engines' token for token (same model, same argmax); sampled rows are vLLM's own draws,
seeded per row (reproducible, independent of batch mates) but not the draws of fastdraft's samplers. Ray does not
say which engine replica answered a row, so the manifest's `actors_used` counts the processor as one. Ray's
defaults stay for what the recipe has no setting for: `max_concurrent_batches=8` batches in flight per engine,
no `accelerator_type`.

vLLM is optional (the `[gpu]` extra) and never imported here: Ray's engine actors import it in their own
environment (`generate.runtime_env`), and `check_engine_available` (pipeline.py) stops the run first, with a
`MissingDependencyError`, when they cannot.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from fastdraft.config import GenerateConfig, TargetConfig
from fastdraft.errors import RecipeError
from fastdraft.generation.backends import Generated, stop_token_ids

if TYPE_CHECKING:
    import ray.data

ORIGIN = "local:vllm"
VLLM_MAX_LOGPROBS = 20
"""vLLM's default `max_logprobs` engine argument (EngineArgs / ModelConfig)."""
ACTOR_LABEL = "ray.data.llm:vLLMEngineStage"
"""The `_actor` value of every row (Ray's vLLM stage does not say which replica answered it)."""
_LIGHT_CPUS = 0.25
"""CPUs of the row-wise pre/postprocess tasks (dict shuffling and decoding): small, so that on a small cluster the
reservations of Ray Data's operators do not starve the engine actors."""


# --------------------------------------------------------------------------------------------
# Recipe -> Ray Data LLM
# --------------------------------------------------------------------------------------------
def engine_kwargs_for(cfg: GenerateConfig, target: TargetConfig) -> dict[str, Any]:
    """vLLM's engine arguments: `generate.dtype` (else the target's) and trust_remote_code, then `generate.engine_kwargs`
    as they are."""
    kwargs: dict[str, Any] = {"dtype": cfg.dtype or target.dtype, "trust_remote_code": target.trust_remote_code}
    if cfg.store_topk > VLLM_MAX_LOGPROBS:  # vLLM refuses requests for more log-probs than max_logprobs
        kwargs["max_logprobs"] = cfg.store_topk
    return {**kwargs, **cfg.engine_kwargs}


def placement_for(cfg: GenerateConfig, engine_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The engine actor's resources. One worker per engine (TP x PP = 1, vLLM's in-process "uni" executor): the
    recipe's cpus/gpus_per_actor, through Ray's `placement_group_config`, which is also the only way to ask for no
    GPU at all (Ray's default is one GPU per engine). TP x PP > 1: None, Ray's own placement group of one
    `{"GPU": 1, "CPU": 1}` bundle per vLLM worker, which vLLM's Ray executor fills."""
    workers = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
    if workers > 1:
        return None
    bundle = {"CPU": cfg.cpus_per_actor}
    if cfg.gpus_per_actor > 0:
        bundle["GPU"] = cfg.gpus_per_actor
    return {"bundles": [bundle]}


def processor_config(cfg: GenerateConfig, target: TargetConfig) -> Any:
    """The `ray.data.llm.vLLMEngineProcessorConfig` of the recipe (see the table in the module docstring)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from fastdraft.assets import resolve_model_path

    if cfg.min_actors > cfg.max_actors:
        raise RecipeError(f"generate.min_actors ({cfg.min_actors}) is larger than generate.max_actors ({cfg.max_actors})")
    model = str(resolve_model_path(target.model))
    engine_kwargs = engine_kwargs_for(cfg, target)
    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs,
        batch_size=cfg.batch_size,
        concurrency=(cfg.min_actors, cfg.max_actors),
        runtime_env=cfg.runtime_env,
        placement_group_config=placement_for(cfg, engine_kwargs),
        # fastdraft applies the chat template and tokenizes on the driver (exact ids, the same as every engine),
        # and decodes with the target's own tokenizer after the engine
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )


def target_stop_ids(model_path: str, trust_remote_code: bool = False) -> tuple[int, ...]:
    """The target's stop tokens (generation config EOS + tokenizer EOS), as the local engines use them."""
    from transformers import GenerationConfig

    from fastdraft.tokenizer import load_tokenizer

    try:
        gen_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's EOS is the stop token
        gen_config = None
    return stop_token_ids(gen_config, load_tokenizer(model_path, trust_remote_code=trust_remote_code))


# --------------------------------------------------------------------------------------------
# Rows in and out of Ray's vLLM stage (plain functions of one row: tested without vLLM)
# --------------------------------------------------------------------------------------------
def to_vllm_request(row: dict[str, Any], stop_ids: tuple[int, ...], store_topk: int) -> dict[str, Any]:
    """A planned row's vLLM request: its exact prompt ids and its own sampling settings (seed included).

    temperature 0 is vLLM's greedy; top_k 0 and top_p 1 are "off" in both; `detokenize=False` because the
    response text is decoded after the engine by the target's tokenizer.
    """
    return {
        "tokenized_prompt": [int(t) for t in row["prompt_ids"]],
        "sampling_params": {
            "n": 1, "temperature": float(row["temperature"]), "top_p": float(row["top_p"]), "top_k": int(row["top_k"]),
            "max_tokens": int(row["max_new_tokens"]), "seed": int(row["seed"]), "stop_token_ids": list(stop_ids),
            "logprobs": store_topk or None, "detokenize": False,
        },
    }


def from_vllm_output(row: dict[str, Any], input_columns: tuple[str, ...], stop_ids: tuple[int, ...],
                     store_topk: int) -> dict[str, Any]:
    """One answered row -> the planned row's columns + response_ids, finish_reason (and top-k log-probs).

    `row` is what Ray's vLLM stage leaves: the planned columns plus its outputs (`generated_tokens`, and
    `logprobs`: per response token, {token id: {logprob, rank, decoded_token}}, vLLM's top `logprobs` plus the
    sampled token when it is not among them).
    """
    token_ids = [int(t) for t in row["generated_tokens"]]
    out = {name: row[name] for name in input_columns}
    out["response_ids"] = token_ids
    out["finish_reason"] = "stop" if token_ids and token_ids[-1] in stop_ids else "length"
    if store_topk:
        out["topk_ids"], out["topk_logprobs"] = top_logprobs(row.get("logprobs") or [], store_topk)
    return out


def top_logprobs(positions: list[dict], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The k most likely tokens at each position, best first, from vLLM's per-position logprob dicts."""
    ids, values = [], []
    for position in positions:
        # keys may arrive as str after a trip through Arrow; entries absent at this position arrive as None
        best = sorted(((int(t), float(lp["logprob"])) for t, lp in position.items() if lp is not None),
                      key=lambda item: item[1], reverse=True)[:k]
        ids.append([t for t, _ in best])
        values.append([v for _, v in best])
    return ids, values


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, trust_remote_code: bool):
    """One tokenizer per worker process (Ray reuses workers across tasks)."""
    from fastdraft.tokenizer import load_tokenizer

    return load_tokenizer(model, trust_remote_code=trust_remote_code)


def alignment_block(batch: pa.Table, model: str, trust_remote_code: bool, store_topk: int) -> pa.Table:
    """Postprocessed rows -> the alignment schema, response text decoded exactly as the other engines do."""
    from fastdraft.generation.pipeline import results_table

    rows = batch.to_pylist()
    outs = [Generated(r["response_ids"], r["finish_reason"], r.get("topk_ids"), r.get("topk_logprobs")) for r in rows]
    return results_table(rows, outs, _tokenizer(model, trust_remote_code), store_topk, ACTOR_LABEL, ORIGIN)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def generate_with_vllm(planned: ray.data.Dataset, cfg: GenerateConfig, target: TargetConfig) -> ray.data.Dataset:
    """Planned rows (pipeline.py's `_INPUT_FIELDS` columns) -> result rows in the alignment schema, through
    Ray Data LLM's vLLM processor; lazy, like every Ray Data transform.

    Args:
        planned: one row per (prompt, setting, sample): key, prompt_ids, temperature, top_p, top_k,
            max_new_tokens, seed, ...
        cfg: the recipe's generate section (engine_kwargs, actors, batch size, resources, runtime_env, store_topk).
        target: the recipe's target (model, dtype, trust_remote_code).
    """
    from ray.data.llm import build_processor

    from fastdraft.assets import resolve_model_path
    from fastdraft.generation.pipeline import _INPUT_FIELDS

    config = processor_config(cfg, target)
    stop_ids = target_stop_ids(config.model_source, target.trust_remote_code)
    columns = tuple(name for name, _ in _INPUT_FIELDS)
    processor = build_processor(
        config,
        preprocess=functools.partial(to_vllm_request, stop_ids=stop_ids, store_topk=cfg.store_topk),
        postprocess=functools.partial(from_vllm_output, input_columns=columns, stop_ids=stop_ids,
                                      store_topk=cfg.store_topk),
        preprocess_map_kwargs={"num_cpus": _LIGHT_CPUS},
        postprocess_map_kwargs={"num_cpus": _LIGHT_CPUS},
    )
    return processor(planned).map_batches(
        alignment_block, batch_format="pyarrow", num_cpus=_LIGHT_CPUS,
        fn_kwargs=dict(model=str(resolve_model_path(target.model)), trust_remote_code=target.trust_remote_code,
                       store_topk=cfg.store_topk),
    )
