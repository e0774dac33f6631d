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
                  max_prompts=4, vocab_size=1000)


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
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", "between -100 and 100"),
    ({"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", "between -2 and 2"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "(0, 2]"),
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    ({"prompt": "hi", "prompt_logprobs": 30}, 400, "prompt_logprobs", "between 0 and 20"),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix", "fill-in-the-middle"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of", "not ranked"),
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format", "constrained decoding"),
    ({"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search", "beams"),
    ({"prompt": "hi", "guided_json": {"type": "object"}}, 400, "guided_json", "not served"),
    ({"prompt": "hi", "stop_token_ids": [5, 10 ** 6]}, 400, "stop_token_ids", "outside the vocabulary"),
    ({"prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids", "must not be empty"),
    ({"prompt": "hi", "min_tokens": -1}, 400, "min_tokens", ">= 0"),
    ({"prompt": "hi", "timeout": 700}, 400, "timeout", "serve.request_timeout_s"),
    ({"prompt": "hi", "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage", "boolean"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    ({"prompt": ["a"] * 5}, 400, "prompt", "at most 4 prompts"),
])
def test_bad_completion_requests_get_a_4xx_naming_the_field(body, status, param, words):
    err = _completion_error(body)
    assert err.status == status
    assert err.param == param
    assert words in err.message
    assert err.to_dict()["error"]["message"] == err.message


def _chat(body: dict):
    req = P.parse_request(json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode(),
                          P.ChatCompletionRequest)
    P.check_sampling(req, LIMITS)
    return req


# Every field of OpenAI's chat-completions schema, with a value this server honours (or that changes nothing).
OPENAI_CHAT_FIELDS = {
    "model": "fastdraft", "frequency_penalty": 0.5, "logit_bias": {"17": -3.0}, "logprobs": True, "top_logprobs": 2,
    "max_completion_tokens": 8, "metadata": {"team": "a"}, "modalities": ["text"], "n": 2, "parallel_tool_calls": True,
    "presence_penalty": 0.2, "prompt_cache_key": "k", "response_format": {"type": "text"}, "safety_identifier": "u1",
    "seed": 3, "service_tier": "auto", "stop": ["\n\n"], "store": False, "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False, "continuous_usage_stats": True},
    "temperature": 0.7, "tool_choice": "none", "tools": [], "top_p": 0.9, "user": "someone", "functions": [],
    "function_call": "none", "audio": None, "prediction": None, "reasoning_effort": None, "verbosity": None,
    "web_search_options": None, "max_tokens": None, "prompt_cache_retention": "in_memory",
    "prompt_cache_options": {"mode": "implicit"}, "moderation": None,
}
OPENAI_COMPLETION_FIELDS = {
    "model": "fastdraft", "prompt": "hi", "best_of": 1, "echo": True, "frequency_penalty": 0.1, "logit_bias": {"3": 1},
    "logprobs": None, "max_tokens": 8, "n": 1, "presence_penalty": 0.1, "seed": 1, "stop": "x", "stream": True,
    "stream_options": {"include_usage": False}, "suffix": None, "temperature": 0, "top_p": 1, "user": "u",
}
VLLM_FIELDS = {
    "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "length_penalty": 1.0, "use_beam_search": False,
    "stop_token_ids": [7], "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 2,
    "skip_special_tokens": False, "spaces_between_special_tokens": True, "truncate_prompt_tokens": 10,
    "allowed_token_ids": [3, 7, 9], "add_special_tokens": False, "priority": 0, "request_id": "r-1",
}


def test_the_schemas_know_every_field_of_the_openai_sdk():
    """The installed openai SDK's own parameter lists: none of them may be reported as unknown."""
    from openai.types import completion_create_params as completion
    from openai.types.chat import chat_completion_content_part_text_param as part
    from openai.types.chat import completion_create_params as chat

    assert set(chat.CompletionCreateParamsBase.__annotations__) <= set(P.ChatCompletionRequest.model_fields)
    assert set(completion.CompletionCreateParamsBase.__annotations__) <= set(P.CompletionRequest.model_fields)
    assert set(part.ChatCompletionContentPartTextParam.__annotations__) <= set(P.ChatContentPart.model_fields)


def test_every_openai_and_vllm_field_is_accepted_and_mapped_to_the_engine():
    req = _chat({**OPENAI_CHAT_FIELDS, **VLLM_FIELDS})
    assert P.ignored_fields(req) == []
    opts = P.engine_options(req)
    assert opts == {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "presence_penalty": 0.2,
                    "frequency_penalty": 0.5, "repetition_penalty": 1.1, "logit_bias": ((17, -3.0),),
                    "allowed_token_ids": (3, 7, 9), "logprobs": 2, "prompt_logprobs": None}
    raw = json.dumps({**OPENAI_COMPLETION_FIELDS, **VLLM_FIELDS}).encode()
    creq = P.parse_request(raw, P.CompletionRequest)
    P.check_sampling(creq, LIMITS)
    assert P.ignored_fields(creq) == [] and creq.echo and P.engine_options(creq)["logprobs"] is None
    scored = P.parse_request(b'{"prompt": "hi", "echo": true, "logprobs": 3, "prompt_logprobs": 1}', P.CompletionRequest)
    assert P.engine_options(scored)["prompt_logprobs"] == 3  # echo + logprobs scores the prompt too
    nulls = P.parse_request(b'{"prompt": "hi", "temperature": null, "n": null, "top_k": null}', P.CompletionRequest)
    assert (nulls.temperature, nulls.n, nulls.top_k) == (1.0, 1, 0)  # null = not given
    assert P.parse_request(b'{"prompt": "hi", "max_tokens": null}', P.CompletionRequest).max_tokens is None  # = all room


def test_unknown_fields_are_ignored_and_named_at_any_depth():
    req = _chat({"bogus": 1, "stream": True, "stream_options": {"include_usage": True, "colour": "red"}})
    req.messages  # noqa: B018
    nested = P.parse_request(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}],
                                                       "mood": "calm"}], "zz": None}).encode(), P.ChatCompletionRequest)
    assert P.ignored_fields(req) == ["bogus", "stream_options.colour"]
    assert P.ignored_fields(nested) == ["zz", "messages[0].mood", "messages[0].content[0].x"]


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
    ({"tool_choice": "required"}, "tool_choice", "tool calling"),
    ({"functions": [{"name": "f"}]}, "functions", "function calling"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format",
     "json_schema"),
    ({"n": 5}, "n", "serve.max_n"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio", "text only"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "predicted outputs"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "reasoning"),
    ({"moderation": {"model": "omni"}}, "moderation", "moderation"),
    ({"web_search_options": {}}, "web_search_options", "web search"),
    ({"top_logprobs": 3}, "top_logprobs", "'logprobs': true"),
    ({"logprobs": True, "top_logprobs": 25}, "top_logprobs", "between 0 and 20"),
    ({"chat_template": "{{ messages }}"}, "chat_template", "own chat template"),
    ({"echo": True}, "echo", "do not echo"),
    ({"continue_final_message": True}, "continue_final_message", "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content[0].type", "text only"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls", "tool calling"),
])
def test_fields_that_cannot_be_honoured_get_a_400_naming_them(body, param, words):
    with pytest.raises(P.APIError) as info:
        _chat(body)
    assert info.value.status == 400 and info.value.param == param and words in info.value.message
    assert param in info.value.message


def test_logprobs_objects_follow_openais_shapes():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids)

    entries = [[-0.5, [[1, -0.5], [2, -1.5]]], [float("-inf"), []]]
    comp = P.completion_logprobs(Tok(), [1, 3], entries, offset=4)
    assert comp == {"tokens": ["a", "c"], "token_logprobs": [-0.5, -9999.0], "top_logprobs": [{"a": -0.5, "b": -1.5}, {}],
                    "text_offset": [4, 5]}
    chat = P.chat_logprobs(Tok(), [1], entries[:1])
    assert chat == {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]}, {"token": "b", "logprob": -1.5, "bytes": [98]}]}], "refusal": None}


def test_text_stream_can_keep_the_stop_string_and_hides_the_stop_token():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("<eos>" if i == 0 and not skip_special_tokens else "" if i == 0 else chr(96 + i) for i in ids)

    keep = P.TextStream(Tok(), ["cd"], include_stop=True)
    assert keep.add([1, 2, 3, 4, 5]) == "abcd" and keep.stopped
    hidden = P.TextStream(Tok(), [], skip_special_tokens=False, stop_ids=(0, 7))
    assert hidden.add([1, 2]) + hidden.add([7]) + hidden.finish() == "ab"  # a stop token ends the text unseen
    shown = P.TextStream(Tok(), [], skip_special_tokens=False, include_stop=True, stop_ids=(0,))
    assert shown.add([1, 0]) + shown.finish() == "a<eos>"


def test_stop_sequences_wait_for_min_tokens_as_in_vllm():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids)

    late = P.TextStream(Tok(), ["ab", "de"], min_tokens=3)
    assert late.add([1, 2, 3]) == "abc" and not late.stopped  # "ab" came before the third token: not a stop
    assert late.add([4]) == "" and late.add([5]) == "" and late.stopped and late.text == "abc"
    edge = P.TextStream(Tok(), ["cd"], min_tokens=3)
    assert edge.add([1, 2, 3]) == "abc" and edge.add([4]) == "" and edge.stopped  # a stop ending after them counts


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
    b = P.speculative_usage({"drafted": 2, "accepted": 1, "target_passes": 2, "emitted": 5, "looked_up": 4,
                             "looked_up_accepted": 2}, 2)  # serve.lookup: 2 of 4 copied tokens accepted
    total = P.merge_speculative([a, b])
    assert total["acceptance_rate"] == 4 / 8 and total["tau"] == 11 / 5 and total["gamma"] == 2
    assert (total["looked_up"], total["looked_up_accepted"]) == (4, 2)  # apart from the draft's AR


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


def test_vllm_refuses_a_subset_head_draft_pointing_to_its_hf_export_and_a_vocabulary_mismatch(
        tiny_target_dir, tiny_draft_dir, copy_dir):
    from apps.vllm_app import vllm_llm_config
    from fastdraft.checkpoint import read_metadata, write_metadata
    from fastdraft.errors import FastdraftError
    from fastdraft.models import HEAD_TOKENS_KEY
    from fastdraft.serving.app import recipe_from_args, resolve_pair

    subset = copy_dir(tiny_draft_dir, "subset-draft")
    meta = read_metadata(subset)
    meta.extra[HEAD_TOKENS_KEY] = list(range(64))
    write_metadata(subset, meta)
    spec = resolve_pair(recipe_from_args({"target": str(tiny_target_dir), "draft": str(subset)}))
    with pytest.raises(FastdraftError, match=r"over 64 of .* tokens .* fastdraft export .* --format hf"):
        vllm_llm_config(spec)
    wide = copy_dir(tiny_draft_dir, "wide-draft")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    from fastdraft.serving.vllm import check_draft_for_vllm

    with pytest.raises(FastdraftError, match="vocabulary size to equal the target's"):
        check_draft_for_vllm(str(tiny_target_dir), str(wide))


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
    from fastdraft.serving.scheduler import continuation as _continuation
    from fastdraft.speculative.types import SamplingParams

    base = {"prompt_ids": [1, 2, 3], "params": SamplingParams(max_new_tokens=10, seed=5, stop_token_ids=(0,)), "gamma": 3}
    rest = _continuation(base, [7, 8, 9, 10])
    assert rest["prompt_ids"] == [1, 2, 3, 7, 8, 9, 10] and rest["gamma"] == 3
    assert rest["params"].max_new_tokens == 6 and rest["params"].stop_token_ids == (0,)
    assert rest["params"].seed != 5  # the lost attempt's random draws are not replayed
    assert _continuation({**base, "params": SamplingParams(max_new_tokens=10)}, [7])["params"].seed is None


def test_bench_summary_counts_errors_and_percentiles():
    from jobs.bench_serve import Sample, pct, summarize

    samples = [Sample(True, 0.0, latency_s=t, ttft_s=t / 4, tokens=10, max_tokens=4 if t < 3 else 64,
                      spec={"drafted": 6, "accepted": 3, "target_passes": 4, "emitted": 10}) for t in (1.0, 2.0, 3.0, 4.0)]
    row = summarize("speculative", 4, samples + [Sample(False, 0.0, error="HTTP 503", status=503)], wall_s=2.0)
    assert row["requests"] == 4 and row["errors"] == 1 and row["http_5xx"] == 1 and row["first_errors"] == ["HTTP 503"]
    assert row["latency_p99_by_max_tokens"] == {4: 2.0, 64: 4.0} and row["short_over_long_p99"] == 0.5
    assert row["output_tokens_per_s"] == 20 and row["latency_p50_s"] in (2.0, 3.0) and row["latency_p99_s"] == 4.0
    assert row["AR"] == 0.5 and row["tau"] == 2.5
    assert pct([], 50) is None
