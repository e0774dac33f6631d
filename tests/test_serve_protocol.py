"""The server's wire format and configuration, without Ray: request validation names the field,
text streams honour stop sequences, the app resolves and checks its pair, config files validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fastdraft.serving import protocol as P

REPO = Path(__file__).resolve().parent.parent
LIMITS = P.Limits(model_name="fastdraft", max_tokens_cap=64, max_n=4, max_gamma=8, context_length=128, speculative=True,
                  max_prompts=4)


def _completion_error(body) -> P.APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(P.APIError) as info:
        req = P.parse_request(raw, P.CompletionRequest)
        P.check_sampling(req, LIMITS)
        prompts = P.completion_prompts(req, LIMITS)
        P.check_max_tokens(req.max_tokens, "max_tokens", max(len(p) for p in prompts), LIMITS)
    return info.value


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "malformed JSON"),
    (b"\xff\xfe\x00", 400, None, "UTF-8"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b"", 400, None, "empty"),
    ({"max_tokens": 5}, 400, "prompt", "required"),
    ({"prompt": 5}, 400, "prompt", "expected a non-empty string"),
    ({"prompt": ""}, 400, "prompt", "must not be empty"),
    ({"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"prompt": "hi", "max_tokens": 65}, 400, "max_tokens", "serve.max_tokens_cap"),
    ({"prompt": list(range(100)), "max_tokens": 60}, 400, "max_tokens", "context of 128"),
    ({"prompt": list(range(130)), "max_tokens": None}, 400, "max_tokens", "leaves no room"),
    ({"prompt": "hi", "temperature": -0.1}, 400, "temperature", "between 0 and 2"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": "hi", "n": 5}, 400, "n", "serve.max_n"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": "hi", "stop": 3}, 400, "stop", "a string or a list"),
    ({"prompt": "hi", "stop": ["a", 1]}, 400, "stop", "a string or a list"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "hi", "gamma": 9}, 400, "gamma", "serve.max_gamma"),
    ({"prompt": "hi", "bogus": 1}, 400, "bogus", "unrecognized"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    ({"prompt": ["a"] * 5}, 400, "prompt", "at most 4 prompts"),
])
def test_bad_completion_requests_get_a_4xx_naming_the_field(body, status, param, words):
    err = _completion_error(body)
    assert err.status == status
    assert err.param == param
    assert words in err.message
    assert err.to_dict()["error"]["message"] == err.message


def test_oversized_bodies_are_refused_before_parsing():
    err = _completion_error(b'{"prompt": "' + b"x" * (P.MAX_BODY_BYTES + 1) + b'"}')
    assert err.status == 413


def test_chat_messages_are_checked_and_content_parts_joined():
    req = P.parse_request(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]}).encode(), P.ChatCompletionRequest)
    assert P.chat_messages(req) == [{"role": "user", "content": "Hello, world"}]
    for body, param in [({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
                        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
                        ({"messages": "hi"}, "messages")]:
        with pytest.raises(P.APIError) as info:
            P.parse_request(json.dumps(body).encode(), P.ChatCompletionRequest)
        assert info.value.param == param and info.value.status == 400
    with pytest.raises(P.APIError, match="at least one message"):
        P.chat_messages(P.parse_request(b'{"messages": []}', P.ChatCompletionRequest))


def test_speculation_cannot_be_requested_from_a_target_alone_deployment():
    limits = P.Limits(**{**LIMITS.__dict__, "speculative": False})
    req = P.parse_request(b'{"prompt": "x", "speculative": true}', P.CompletionRequest)
    with pytest.raises(P.APIError, match="serve.speculative is false"):
        P.check_sampling(req, limits)


class _CharTokenizer:
    """One token per character (ids are code points): decoding is exact, so the test is about the logic."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _stream(stop, pieces):
    ts = P.TextStream(_CharTokenizer(), stop)
    out = [ts.add([ord(c) for c in piece]) for piece in pieces]
    return ts, out


def test_text_stream_cuts_at_a_stop_sequence_split_across_tokens():
    ts, deltas = _stream(["END"], ["ab", "cE", "N", "Dxyz"])
    assert deltas == ["ab", "c", "", ""]  # "E" and "N" are held back: they may begin "END"
    assert ts.stopped and ts.text == "abc" and ts.finish() == ""


def test_text_stream_releases_held_text_that_was_not_a_stop():
    ts, deltas = _stream(["END"], ["abE", "Nx"])
    assert deltas == ["ab", "ENx"]
    assert not ts.stopped and ts.finish() == "" and ts.text == "abENx"


def test_text_stream_holds_back_an_incomplete_utf8_character():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    ts = P.TextStream(Bytes(), [])
    euro = "€".encode()  # 3 bytes, arriving one token at a time
    assert ts.add([ord("a"), euro[0]]) == "a"
    assert ts.add([euro[1]]) == ""
    assert ts.add([euro[2]]) == "€"
    assert ts.finish() == "" and ts.text == "a€"


def test_usage_sums_choices_and_recomputes_rates():
    a = P.speculative_usage({"drafted": 6, "accepted": 3, "target_passes": 3, "emitted": 6}, 2)
    b = P.speculative_usage({"drafted": 2, "accepted": 1, "target_passes": 1, "emitted": 2}, 2)
    total = P.merge_speculative([a, b])
    assert total["acceptance_rate"] == 4 / 8 and total["tau"] == 8 / 4 and total["gamma"] == 2


# ---- app configuration: resolve and check the pair, deployment options, config files ----
def test_serve_args_resolve_the_pair_and_apply_overrides(tiny_target_dir, tiny_draft_dir):
    from fastdraft.serving.app import pair_options, recipe_from_args, resolve_pair

    spec = resolve_pair(recipe_from_args({"target": str(tiny_target_dir), "draft": str(tiny_draft_dir), "gamma": "5",
                                          "num_replicas": "auto", "max_replicas": 3}))
    assert spec.draft == str(tiny_draft_dir) and spec.serve.gamma == 5
    opts = pair_options(spec.serve)
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    alone = resolve_pair(recipe_from_args({"target": str(tiny_target_dir), "speculative": False}))
    assert alone.draft is None


def test_a_mismatched_pair_refuses_to_start_with_the_report(tiny_target_dir, smollm2_dir, tmp_path):
    from fastdraft.serving.app import recipe_from_args, resolve_pair
    from fastdraft.errors import TokenizerMismatchError

    with pytest.raises(TokenizerMismatchError, match="vocabulary size"):
        resolve_pair(recipe_from_args({"target": str(tiny_target_dir), "draft": str(smollm2_dir)}))


def test_bad_serve_args_name_the_key(tiny_target_dir, tmp_path, monkeypatch):
    from fastdraft.serving.app import recipe_from_args, resolve_pair
    from fastdraft.config import recipe_from_dict
    from fastdraft.errors import RecipeError

    with pytest.raises(RecipeError, match="serve.gamma"):
        recipe_from_args({"target": str(tiny_target_dir), "gamma": "many"})
    with pytest.raises(RecipeError, match="serve.colour"):
        recipe_from_args({"target": str(tiny_target_dir), "colour": "red"})
    with pytest.raises(RecipeError, match="no draft to serve"):
        resolve_pair(recipe_from_dict({"name": "nodraft", "workdir": str(tmp_path), "target": {"model": str(tiny_target_dir)}}))
    monkeypatch.delenv("FD_TEST_MISSING_KEY", raising=False)
    with pytest.raises(RecipeError, match="FD_TEST_MISSING_KEY"):
        resolve_pair(recipe_from_args({"target": str(tiny_target_dir), "speculative": False,
                                       "api_key_env": "FD_TEST_MISSING_KEY"}))
    with pytest.raises(RecipeError, match="trust_remote_code"):
        resolve_pair(recipe_from_dict({"name": "remote", "target": {"model": str(tiny_target_dir), "trust_remote_code": True},
                                       "serve": {"speculative": False}}))


def test_serve_demo_yaml_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    from apps import speculative as entry
    from fastdraft.serving import app as speculative

    data = yaml.safe_load((REPO / "apps/serve_demo.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    [app] = schema.applications
    module, attr = app.import_path.split(":")
    assert module == "apps.speculative" and getattr(entry, attr) is speculative.build_app
    names = {d["name"] for d in data["applications"][0]["deployments"]}
    assert names == {speculative.SpeculativePair.name, speculative.OpenAIIngress.name}
    args = dict(app.args)
    assert (REPO / args["recipe"]).is_file()
    recipe = speculative.recipe_from_args({**args, "recipe": str(REPO / args["recipe"])})  # every arg is a known field
    assert recipe.serve.gamma == 1  # the demo recipe's serve.gamma


def test_serve_vllm_yaml_is_valid_ray_serve_llm_config_with_draft_model_speculation():
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # the schema, importable without vLLM
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((REPO / "apps/serve_vllm.yaml").read_text())
    [app] = ServeDeploySchema.model_validate(data).applications
    assert app.import_path == "ray.serve.llm:build_openai_app"
    [cfg] = app.args["llm_configs"]
    llm = LLMConfig.model_validate(cfg)
    spec = llm.engine_kwargs["speculative_config"]
    assert spec["method"] == "draft_model" and spec["num_speculative_tokens"] >= 1 and spec["model"].endswith("/FT")
    assert llm.engine_kwargs["trust_remote_code"] is False


def test_vllm_config_from_a_recipe_pair_validates(tiny_target_dir, tiny_draft_dir):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    from fastdraft.serving.app import recipe_from_args, resolve_pair
    from apps.vllm_app import serve_config, vllm_llm_config

    spec = resolve_pair(recipe_from_args({"target": str(tiny_target_dir), "draft": str(tiny_draft_dir), "gamma": 4}))
    llm = LLMConfig.model_validate(vllm_llm_config(spec, "H100"))
    assert llm.engine_kwargs["speculative_config"] == {"method": "draft_model", "model": str(tiny_draft_dir),
                                                      "num_speculative_tokens": 4}
    assert llm.accelerator_type == "H100"
    alone = resolve_pair(recipe_from_args({"target": str(tiny_target_dir), "speculative": False}))
    assert "speculative_config" not in vllm_llm_config(alone)["engine_kwargs"]
    assert serve_config(spec)["applications"][0]["import_path"] == "ray.serve.llm:build_openai_app"


def test_vllm_app_without_vllm_says_what_to_install(tiny_target_dir, tiny_draft_dir):
    try:
        import vllm  # noqa: F401
        pytest.skip("the vllm package is installed here: this test checks the error when it is absent")
    except ImportError:
        pass
    from apps.vllm_app import build_app
    from fastdraft.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"fastdraft\[gpu\]"):
        build_app({"target": str(tiny_target_dir), "draft": str(tiny_draft_dir)})


def test_a_generation_cut_by_a_dead_replica_continues_from_what_was_streamed():
    from fastdraft.serving.app import _continuation
    from fastdraft.speculative.types import SamplingParams

    base = {"prompt_ids": [1, 2, 3], "params": SamplingParams(max_new_tokens=10, seed=5, stop_token_ids=(0,)), "gamma": 3}
    rest = _continuation(base, [7, 8, 9, 10])
    assert rest["prompt_ids"] == [1, 2, 3, 7, 8, 9, 10] and rest["gamma"] == 3
    assert rest["params"].max_new_tokens == 6 and rest["params"].stop_token_ids == (0,)
    assert rest["params"].seed != 5  # the lost attempt's random draws are not replayed
    assert _continuation({**base, "params": SamplingParams(max_new_tokens=10)}, [7])["params"].seed is None


def test_bench_summary_counts_errors_and_percentiles():
    from jobs.bench_serve import Sample, pct, summarize

    samples = [Sample(True, 0.0, latency_s=t, ttft_s=t / 4, tokens=10,
                      spec={"drafted": 6, "accepted": 3, "target_passes": 4, "emitted": 10}) for t in (1.0, 2.0, 3.0, 4.0)]
    row = summarize("speculative", samples + [Sample(False, 0.0, error="HTTP 503")], wall_s=2.0)
    assert row["requests"] == 4 and row["errors"] == 1 and row["first_errors"] == ["HTTP 503"]
    assert row["output_tokens_per_s"] == 20 and row["latency_p50_s"] in (2.0, 3.0) and row["latency_p99_s"] == 4.0
    assert row["AR"] == 0.5 and row["tau"] == 2.5
    assert pct([], 50) is None
