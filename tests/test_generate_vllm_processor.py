"""`generate.engine: vllm` through Ray Data LLM (fastdraft/generation/vllm_processor.py), on the tiny target.

Specification:
- the recipe maps onto `vLLMEngineProcessorConfig` (model, dtype, engine_kwargs, actors, batch size, resources,
  runtime_env; Ray's chat-template/tokenize/detokenize stages off), and Ray's real `build_processor` turns it into
  an engine actor with the recipe's CPUs/GPUs (none when gpus_per_actor is 0) or, for TP x PP > 1, Ray's own
  placement group;
- a planned row becomes an exact-token-ids request with its own sampling settings and seed, and Ray's answer
  becomes response ids, finish reason and the top-k log-probs;
- Ray's own vLLM stage UDF, run here in-process on a fake `vllm` (tests named `..._fake_vllm`), answers the
  planned rows like the local engine (greedy token for token). The whole Ray Data run is in
  tests/test_generate_pipeline.py (`test_vllm_engine_through_ray_data_llm_fake_vllm`).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from fastdraft.config import GenerateConfig, TargetConfig
from fastdraft.errors import RecipeError
from fastdraft.generation.backends import TransformersBackend
from fastdraft.generation.vllm_processor import (
    from_vllm_output, processor_config, target_stop_ids, to_vllm_request, top_logprobs,
)
from fastdraft.speculative.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAKE_VLLM_DIR = Path(__file__).parent / "fake_vllm"
PROMPTS = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34, 35], [1, 60, 61]]


def generate_config(**kw) -> GenerateConfig:
    return GenerateConfig(engine="vllm", prompts=[{"name": "p", "kind": "jsonl", "path": "x.jsonl"}], **kw)


def planned_row(i: int, ids: list[int], temperature: float = 0.0, seed: int = 0, max_new_tokens: int = 10) -> dict:
    return dict(key=f"p{i}|s|0", prompt_id=f"p{i}", prompt_ids=ids, prompt_text="", temperature=temperature, top_p=0.9,
                top_k=0, max_new_tokens=max_new_tokens, sample_index=0, seed=seed, source="p")


@pytest.fixture
def fake_vllm(monkeypatch, request):
    """The fake `vllm` importable in this process (Ray's stage imports it), and gone after the test."""
    monkeypatch.syspath_prepend(str(FAKE_VLLM_DIR))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    request.addfinalizer(lambda: [sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == "vllm"])
    import vllm

    assert vllm.IS_FAKE
    return vllm


# ---------------------------------------------------------------------------------------------- recipe -> Ray
def test_recipe_maps_onto_the_processor_config(tiny_target_dir):
    cfg = generate_config(batch_size=32, min_actors=2, max_actors=4, cpus_per_actor=2, gpus_per_actor=1,
                          engine_kwargs={"gpu_memory_utilization": 0.85, "max_model_len": 4096, "dtype": "float16"},
                          runtime_env={"pip": ["vllm==0.33.0"]})
    config = processor_config(cfg, TargetConfig(model=str(tiny_target_dir), dtype="bfloat16"))
    assert config.model_source == str(tiny_target_dir)
    assert config.engine_kwargs["gpu_memory_utilization"] == 0.85 and config.engine_kwargs["max_model_len"] == 4096
    assert config.engine_kwargs["dtype"] == "float16"  # generate.engine_kwargs win over target.dtype
    assert config.engine_kwargs["trust_remote_code"] is False and config.engine_kwargs["task_type"] == "generate"
    assert (config.batch_size, config.concurrency, config.runtime_env) == (32, (2, 4), {"pip": ["vllm==0.33.0"]})
    assert config.placement_group_config["bundles"] == [{"CPU": 2.0, "GPU": 1.0}]
    assert (config.chat_template_stage, config.tokenize_stage, config.detokenize_stage) == (False, False, False)

    plain = processor_config(generate_config(), TargetConfig(model=str(tiny_target_dir)))
    assert plain.engine_kwargs["dtype"] == "float32"  # target.dtype when the recipe does not override it
    bf16 = processor_config(generate_config(dtype="bfloat16"), TargetConfig(model=str(tiny_target_dir)))
    assert bf16.engine_kwargs["dtype"] == "bfloat16"  # generate.dtype wins over target.dtype
    assert "max_logprobs" not in plain.engine_kwargs
    many = processor_config(generate_config(store_topk=32), TargetConfig(model=str(tiny_target_dir)))
    assert many.engine_kwargs["max_logprobs"] == 32  # above vLLM's default of 20, which would refuse the requests
    tp = processor_config(generate_config(gpus_per_actor=2, engine_kwargs={"tensor_parallel_size": 2}),
                          TargetConfig(model=str(tiny_target_dir)))
    assert tp.placement_group_config is None  # Ray's own: one {GPU: 1, CPU: 1} bundle per vLLM worker
    with pytest.raises(RecipeError, match="min_actors"):
        processor_config(generate_config(min_actors=3, max_actors=2), TargetConfig(model=str(tiny_target_dir)))


@pytest.mark.timeout(300)
def test_build_processor_schedules_the_engine_as_the_recipe_says(ray_session, tiny_target_dir):
    """Ray's real `build_processor` (no vLLM needed to build it): the engine stage's Ray resources."""
    from ray.data.llm import build_processor

    target = TargetConfig(model=str(tiny_target_dir))

    def engine_stage(**kw):
        processor = build_processor(processor_config(generate_config(**kw), target))
        assert processor.list_stage_names() == ["vLLMEngineStage"]  # chat template, tokenize, detokenize: off
        return processor.get_stage_by_name("vLLMEngineStage")

    cpu = engine_stage(cpus_per_actor=0.5, min_actors=1, max_actors=2)
    assert cpu.map_batches_kwargs["num_cpus"] == 0.5 and "num_gpus" not in cpu.map_batches_kwargs
    pool = cpu.map_batches_kwargs["compute"]
    assert (pool.min_size, pool.max_size) == (1, 2)
    assert cpu.fn_constructor_kwargs["engine_kwargs"]["distributed_executor_backend"] == "uni"
    gpu = engine_stage(cpus_per_actor=4, gpus_per_actor=1)
    assert (gpu.map_batches_kwargs["num_cpus"], gpu.map_batches_kwargs["num_gpus"]) == (4, 1)
    tp = engine_stage(gpus_per_actor=2, engine_kwargs={"tensor_parallel_size": 2})
    assert tp.fn_constructor_kwargs["engine_kwargs"]["distributed_executor_backend"] == "ray"
    assert tp.map_batches_kwargs["num_gpus"] == 0 and "ray_remote_args_fn" in tp.map_batches_kwargs


# ---------------------------------------------------------------------------------------------- rows in and out
def test_a_planned_row_becomes_an_exact_token_request_with_its_own_seed():
    row = planned_row(0, [1, 2, 3], temperature=0.8, seed=1234, max_new_tokens=64)
    row["top_k"] = 40
    req = to_vllm_request(row, stop_ids=(2, 7), store_topk=5)
    assert req["tokenized_prompt"] == [1, 2, 3]
    assert req["sampling_params"] == {"n": 1, "temperature": 0.8, "top_p": 0.9, "top_k": 40, "max_tokens": 64,
                                      "seed": 1234, "stop_token_ids": [2, 7], "logprobs": 5, "detokenize": False}
    assert to_vllm_request(row, (2,), 0)["sampling_params"]["logprobs"] is None


def test_an_answer_becomes_response_ids_finish_reason_and_top_k():
    columns = ("key", "seed")
    row = {"key": "k", "seed": 1, "generated_tokens": [5, 9, 2], "logprobs": [
        {5: {"logprob": -0.1, "rank": 1}, 8: {"logprob": -2.5, "rank": 2}},
        {"4": {"logprob": -0.3, "rank": 1}, "6": {"logprob": -1.0, "rank": 2}, "9": {"logprob": -4.0, "rank": 7}},
        {2: {"logprob": -0.2, "rank": 1}, 3: None, 1: {"logprob": -3.0, "rank": 2}},  # None: a key of another position
    ]}
    out = from_vllm_output(row, columns, stop_ids=(2,), store_topk=2)
    assert (out["key"], out["seed"], out["response_ids"], out["finish_reason"]) == ("k", 1, [5, 9, 2], "stop")
    assert out["topk_ids"] == [[5, 8], [4, 6], [2, 1]]  # the sampled 9 was outside the top 2: not kept
    assert out["topk_logprobs"] == [[-0.1, -2.5], [-0.3, -1.0], [-0.2, -3.0]]
    cut = from_vllm_output({**row, "generated_tokens": [5, 9]}, columns, (2,), 0)
    assert cut["finish_reason"] == "length" and "topk_ids" not in cut
    assert top_logprobs([], 3) == ([], [])


# ---------------------------------------------------------------------------------------------- Ray's stage
@pytest.mark.timeout(300)
def test_rays_vllm_stage_answers_planned_rows_like_the_local_engine_fake_vllm(fake_vllm, tiny_target_dir):
    """Ray's own `vLLMEngineStageUDF` (what each engine actor runs), in-process, on the fake vLLM."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

    stop_ids = target_stop_ids(str(tiny_target_dir))
    config = processor_config(generate_config(engine_kwargs={"max_num_seqs": 8}), TargetConfig(model=str(tiny_target_dir)))
    udf = vLLMEngineStageUDF(data_column="__data", expected_input_keys=["sampling_params"], batch_size=8,
                             max_concurrent_batches=2, model=config.model_source,
                             engine_kwargs={**config.engine_kwargs, "distributed_executor_backend": "uni"})
    rows = [planned_row(i, ids) for i, ids in enumerate(PROMPTS)]
    rows += [planned_row(10 + i, PROMPTS[0], temperature=0.8, seed=seed) for i, seed in enumerate([11, 11, 12])]
    batch = [{**r, **to_vllm_request(r, stop_ids, store_topk=3)} for r in rows]

    async def run() -> list[dict]:
        return [out async for out in udf({"__data": batch})][0]["__data"]

    answered = [from_vllm_output(d, ("key",), stop_ids, 3) for d in asyncio.run(run())]
    assert [a["key"] for a in answered] == [r["key"] for r in rows]  # Ray restores the batch order
    local = TransformersBackend(tiny_target_dir, store_topk=3)
    want = local.generate([(ids, SamplingParams(max_new_tokens=10)) for ids in PROMPTS])
    for got, w in zip(answered, want):  # greedy: token for token, and the target's own top-k
        assert (got["response_ids"], got["finish_reason"]) == (w.token_ids, w.finish_reason)
        assert got["topk_ids"] == w.topk_ids
        assert torch.allclose(torch.tensor(got["topk_logprobs"]), torch.tensor(w.topk_logprobs), atol=1e-4)
    sampled = answered[len(PROMPTS):]
    assert sampled[0]["response_ids"] == sampled[1]["response_ids"] != sampled[2]["response_ids"]  # the seed decides
    assert all(len(k) == 3 for a in sampled for k in a["topk_ids"])
