"""GPU serving of the same pair through vLLM's own draft-model speculation (`ray.serve.llm`).

On a GPU cluster vLLM runs the target with paged attention and continuous batching, and speculates
with the FastDraft draft through `speculative_config={"method": "draft_model", ...}` (vLLM >= the
release with PR #24322; older ones raise `NotImplementedError ... draft model`). The draft directory
is an ordinary Hugging Face directory in the target's vocabulary, so vLLM takes it as it is; a draft whose output
layer covers part of the vocabulary is served through its `fastdraft export --format hf` copy
(`fastdraft.serving.vllm`, checked when the config is built).
Ray Serve LLM places the engine (placement groups: GPUs are not requested twice) and serves the same
OpenAI routes as `fastdraft/serving/app.py`.

    serve run apps/serve_vllm.yaml                                  # the config file (edit the paths)
    serve run apps.vllm_app:build_app recipe=jobs/recipes/llama31-8b.yaml accelerator_type=H100
    python -m apps.vllm_app jobs/recipes/llama31-8b.yaml --accelerator-type H100 > my_serve.yaml

vLLM and `ray[llm]` are imported only when the app is built (they cannot share the CPU environment;
install `fastdraft[gpu]` in the GPU image). The config itself is plain data, checked in tests.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastdraft.serving.app import APP_NAME, PairSpec, recipe_from_args, resolve_pair
from fastdraft.errors import require
from fastdraft.serving.vllm import check_draft_for_vllm

DEFAULT_ACCELERATOR = None  # any GPU; set e.g. "H100" or "A10G" to pin the node type


def vllm_llm_config(spec: PairSpec, accelerator_type: str | None = DEFAULT_ACCELERATOR,
                    tensor_parallel_size: int = 1) -> dict[str, Any]:
    """The `ray.serve.llm.LLMConfig` (as a dict) that serves `spec` with vLLM draft-model speculation."""
    cfg = spec.serve
    if spec.draft is not None and cfg.gamma > 0:
        check_draft_for_vllm(spec.target, spec.draft)
    engine: dict[str, Any] = {"dtype": spec.dtype, "tensor_parallel_size": tensor_parallel_size,
                              "trust_remote_code": False, "max_num_seqs": max(cfg.max_batch_size, 1)}
    if spec.draft is not None and cfg.gamma > 0:
        # Same vocabulary by construction (the tokenizer contract): no heterogeneous-vocab mode needed.
        engine["speculative_config"] = {"method": "draft_model", "model": spec.draft,
                                        "num_speculative_tokens": cfg.gamma}
    if cfg.num_replicas == "auto":
        deployment: dict[str, Any] = {"autoscaling_config": {"min_replicas": 1, "max_replicas": cfg.max_replicas,
                                                             "target_ongoing_requests": cfg.max_batch_size}}
    else:
        deployment = {"num_replicas": cfg.num_replicas}
    out: dict[str, Any] = {"model_loading_config": {"model_id": cfg.model_name, "model_source": spec.target},
                           "engine_kwargs": engine, "deployment_config": deployment}
    if accelerator_type:
        out["accelerator_type"] = accelerator_type
    return out


def serve_config(spec: PairSpec, accelerator_type: str | None = DEFAULT_ACCELERATOR) -> dict[str, Any]:
    """A whole Serve config file (for `serve run` / `serve deploy` / a RayService's serveConfigV2)."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": spec.serve.port},
        "applications": [{
            "name": f"{APP_NAME}-vllm", "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
            "args": {"llm_configs": [vllm_llm_config(spec, accelerator_type)]},
        }],
    }


def build_app(args: dict[str, Any]):
    """App builder: the recipe's (or `target=`/`draft=`) pair served by vLLM; needs `ray[llm]` + vLLM."""
    args = dict(args)
    accelerator = args.pop("accelerator_type", DEFAULT_ACCELERATOR)
    spec = resolve_pair(recipe_from_args(args))  # the tokenizer contract is checked before any GPU is asked for
    llm = require("ray.serve.llm", "gpu", "serving through vLLM")
    return llm.build_openai_app({"llm_configs": [vllm_llm_config(spec, accelerator)]})


def main(argv: list[str] | None = None) -> int:
    import yaml

    from fastdraft.config import load_recipe
    from fastdraft.errors import FastdraftError

    p = argparse.ArgumentParser(prog="python -m apps.vllm_app", description="print a vLLM Serve config for a recipe")
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR)
    a = p.parse_args(argv)
    try:
        spec = resolve_pair(load_recipe(a.recipe, a.overrides))
    except FastdraftError as exc:
        print(f"apps.vllm_app: error: {exc}", file=sys.stderr)
        return 2
    yaml.safe_dump(serve_config(spec, a.accelerator_type), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
