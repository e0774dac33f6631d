"""The speculative pair behind real Ray Serve and real HTTP: exact greedy output, streaming, the official
openai client, batching under concurrency, 4xx errors that leave the replica healthy, auth, metrics.

One Serve application for the whole module (tiny target 4x128 + draft 1x64), on a free port.
"""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import torch

pytestmark = pytest.mark.timeout(300)

KEY_ENV, KEY = "FASTDRAFT_TEST_SERVE_KEY", "sk-test-0123456789"
MAX_TOKENS_CAP = 960  # room for a long generation to cancel


@dataclass
class Server:
    url: str
    headers: dict

    def post(self, path: str, body, headers: dict | None = None) -> httpx.Response:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        return httpx.post(self.url + path, headers=self.headers if headers is None else headers, timeout=120, **kw)

    def sse(self, path: str, body: dict) -> list:
        """POST with stream: true; the parsed `data:` events, `[DONE]` last."""
        events = []
        with httpx.stream("POST", self.url + path, json={**body, "stream": True}, headers=self.headers, timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
        return events


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_target_dir, tiny_draft_dir):
    from ray import serve

    from fastdraft.serving.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    os.environ[KEY_ENV] = KEY  # the builder forwards it to the ingress replica's environment
    try:
        app = build_app({"target": str(tiny_target_dir), "draft": str(tiny_draft_dir), "model_name": "tiny-pair",
                         "max_tokens_cap": MAX_TOKENS_CAP, "max_n": 3, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
                         "cpus_per_replica": 0.5, "api_key_env": KEY_ENV,
                         "lookup": {"tokens": 4}})  # as the demo serves: context lookup beside the draft
    finally:
        del os.environ[KEY_ENV]
    serve.run(app, name="fastdraft-test", route_prefix="/", blocking=False)
    try:
        yield Server(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"})
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_target_dir):
    """The target's own greedy output (transformers generate), the oracle for lossless serving."""
    from transformers import AutoModelForCausalLM

    from fastdraft.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_target_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, len(prompt_ids):].tolist()
        return tok.decode(new, skip_special_tokens=True), len(new)

    greedy.tok, greedy.model = tok, model
    return greedy


def penalized_greedy(model, prompt_ids: list[int], max_new: int, eos: int, presence=0.0, frequency=0.0,
                     bias: dict | None = None) -> tuple[list[int], list[list[float]]]:
    """Plain target greedy with OpenAI's penalties and logit_bias written out token by token; also the log-softmax
    of the processed logits at each step (the logprobs the server must report)."""
    ids, out, lps = list(prompt_ids), [], []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        for t, b in (bias or {}).items():
            logits[t] += b
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        tok = int(logits.argmax())
        lps.append(logits.log_softmax(-1))
        out.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return out, lps


PROMPTS = ["def fibonacci(n):\n    ", "The standard library provides", "import os\nimport sys\n"]


def test_completions_equal_the_targets_greedy_output(server, reference):
    """Served with context lookup beside the draft (`serve.lookup`): copied and drafted tokens alike, the text is the
    target's own greedy text, and copies are counted apart from the draft's acceptance."""
    copied = 0
    for prompt in PROMPTS:
        r = server.post("/v1/completions", {"model": "tiny-pair", "prompt": prompt, "max_tokens": 32, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        text, n = reference(reference.tok(prompt)["input_ids"], 32)
        assert body["choices"][0]["text"] == text
        assert body["usage"]["completion_tokens"] == n
        spec = body["usage"]["speculative"]
        assert spec["gamma"] == 3 and spec["drafted"] > 0 and spec["target_passes"] > 0
        assert spec["tau"] == spec["emitted"] / spec["target_passes"] >= 1
        assert spec["emitted"] <= spec["accepted"] + spec["looked_up_accepted"] + spec["target_passes"]
        copied += spec["looked_up"]
    assert copied > 0, "the tiny target's greedy text repeats itself: some rounds copy"


def test_chat_template_is_applied_server_side(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    r = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    ids = reference.tok(reference.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]
    text, n = reference(ids, 24)
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == n


def test_streamed_chunks_concatenate_to_the_non_streamed_text(server):
    req = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stream_options": {"include_usage": True}}
    whole = server.post("/v1/completions", req).json()
    events = server.sse("/v1/completions", req)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    chunks = [e for e in events[:-2]]
    assert len(chunks) > 2  # token by token, not one blob
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert usage["speculative"]["drafted"] == whole["usage"]["speculative"]["drafted"]

    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 20, "temperature": 0}
    whole = server.post("/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    events = server.sse("/v1/chat/completions", chat)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == whole


def test_the_official_openai_client_works(server, reference):
    import openai  # in the [dev] extra that CI installs
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-pair"]
    out = client.completions.create(model="tiny-pair", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    assert out.choices[0].text == reference(reference.tok(PROMPTS[1])["input_ids"], 16)[0]
    chat = client.chat.completions.create(model="tiny-pair", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=12, temperature=0)
    streamed = client.chat.completions.create(model="tiny-pair", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-pair", prompt="x", max_tokens=MAX_TOKENS_CAP + 1)


def test_speculation_off_or_another_gamma_per_request_gives_the_same_greedy_text(server):
    base = {"prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0}
    spec = server.post("/v1/completions", base).json()
    alone = server.post("/v1/completions", {**base, "speculative": False}).json()
    g1 = server.post("/v1/completions", {**base, "gamma": 1}).json()
    assert spec["choices"][0]["text"] == alone["choices"][0]["text"] == g1["choices"][0]["text"]
    assert alone["usage"]["speculative"]["drafted"] == 0
    assert alone["usage"]["speculative"]["target_passes"] == alone["usage"]["speculative"]["emitted"]
    assert g1["usage"]["speculative"]["gamma"] == 1


def test_concurrent_requests_are_batched_and_stay_exact(server, reference):
    prompts = [f"{p} # {i}" for i in range(3) for p in PROMPTS[:2]]
    expected = [reference(reference.tok(p)["input_ids"], 20)[0] for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: server.post("/v1/completions", {"prompt": p, "max_tokens": 20, "temperature": 0}),
                            prompts))
    assert [r.json()["choices"][0]["text"] for r in got] == expected
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    count = lambda name: float(next(line.rsplit(" ", 1)[1] for line in metrics.splitlines()  # noqa: E731
                                    if line.startswith(name)))
    # Some generations shared an engine call: fewer observations fall in the "1 row" bucket than in all.
    assert count('fastdraft_batch_rows_bucket{le="1.0"}') < count("fastdraft_batch_rows_count")


def test_n_samples_with_a_seed_are_reproducible(server):
    req = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "n": 3, "seed": 7}
    a, b = server.post("/v1/completions", req).json(), server.post("/v1/completions", req).json()
    texts = [c["text"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in b["choices"]]
    assert len(set(texts)) > 1  # each choice samples on its own


def test_stop_sequences_end_the_text_before_them(server):
    base = {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0}
    full = server.post("/v1/completions", base).json()["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    r = server.post("/v1/completions", {**base, "stop": [stop, "zzzz-never"]}).json()
    assert r["choices"][0] == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    streamed = server.sse("/v1/completions", {**base, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == cut
    # The model replica follows the text too: the engine stops within the round that completes the stop sequence.
    long = server.post("/v1/completions", {**base, "stop": stop, "max_tokens": MAX_TOKENS_CAP, "ignore_eos": True}).json()
    assert long["choices"][0]["text"] == cut and long["choices"][0]["finish_reason"] == "stop"
    assert long["usage"]["speculative"]["emitted"] <= long["usage"]["completion_tokens"] + 4 < 60


@pytest.mark.parametrize("body, status, param", [
    (b'{"prompt": "x", "max_tokens": 5', 400, None),
    (b'\xc3\x28 not utf-8', 400, None),
    ({"prompt": "x", "max_tokens": MAX_TOKENS_CAP + 1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "n": 4}, 400, "n"),
    ({"prompt": "x", "model": "gpt-4o"}, 404, "model"),
    ({"prompt": [10 ** 6]}, 400, "prompt"),
    ({"prompt": "x", "stop": {"a": 1}}, 400, "stop"),
    ({"prompt": "x" * 1500, "max_tokens": 10}, 400, "max_tokens"),  # beyond the 1024-token context
    (b'{"prompt": "' + b"y" * (2 << 20) + b'"}', 413, None),
])
def test_bad_requests_get_openai_style_4xx_and_the_server_stays_healthy(server, body, status, param):
    r = server.post("/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"


def test_chat_errors_name_the_message_field(server):
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


def test_the_api_key_is_required_when_configured(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # probes need no key


def test_metrics_endpoint_reports_requests_tokens_and_acceptance(server):
    server.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
    text = httpx.get(server.url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['fastdraft_requests_total{endpoint="completions",status="200"}'] >= 1
    assert values['fastdraft_requests_total{endpoint="completions",status="400"}'] >= 1
    assert values["fastdraft_completion_tokens_total"] >= 8
    assert values["fastdraft_drafted_tokens_total"] > 0
    assert 0 <= values["fastdraft_acceptance_rate"] <= 1 and values["fastdraft_tau"] >= 1
    assert values["fastdraft_queue_time_seconds_count"] >= 1
    assert values['fastdraft_time_to_first_token_seconds_count{endpoint="completions"}'] >= 1


# ------------------------------------------------------------------------------------------
# The protocol as clients send it (issue 20)
# ------------------------------------------------------------------------------------------
def _client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models_carry_the_targets_tokenizer_fingerprint(server, tiny_target_dir):
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    [entry] = _client(server).models.list().data
    assert entry.model_extra["tokenizer_fingerprint"] == tokenizer_fingerprint(load_tokenizer(tiny_target_dir))
    assert entry.model_extra["tokenizer_fingerprint"].startswith("tok-")


def test_every_openai_field_is_accepted_and_greedy_stays_exact(server, reference):
    client = _client(server)
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    chat = client.chat.completions.create(
        model="tiny-pair", messages=messages, max_completion_tokens=16, temperature=0, top_p=1, n=1, seed=1,
        frequency_penalty=0, presence_penalty=0, logit_bias={}, response_format={"type": "text"}, user="u", store=False,
        metadata={"k": "v"}, service_tier="auto", modalities=["text"], parallel_tool_calls=False, tool_choice="none",
        prompt_cache_key="c", safety_identifier="s", stop=["never-here"])
    tok = reference.tok
    ids = tok(tok.apply_chat_template([{"role": m["role"], "content": "Be brief." if i == 0 else "Hi"}
                                       for i, m in enumerate(messages)], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert chat.choices[0].message.content == reference(ids, 16)[0]
    out = client.completions.create(model="tiny-pair", prompt=PROMPTS[0], max_tokens=16, temperature=0, best_of=1,
                                    echo=False, suffix=None, user="u", logit_bias={}, stream=False)
    assert out.choices[0].text == reference(tok(PROMPTS[0])["input_ids"], 16)[0]


def test_unknown_fields_are_ignored_logged_and_named_in_a_header(server, reference):
    raw = _client(server).completions.with_raw_response.create(
        model="tiny-pair", prompt=PROMPTS[1], max_tokens=12, temperature=0,
        extra_body={"frobnicate": True, "stream_options_x": 1})
    assert raw.headers["x-fastdraft-ignored-fields"] == "frobnicate,stream_options_x"
    assert raw.parse().choices[0].text == reference(reference.tok(PROMPTS[1])["input_ids"], 12)[0]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.headers, timeout=120,
                      json={"messages": [{"role": "user", "content": "x", "mood": 1}], "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-fastdraft-ignored-fields"] == "messages[0].mood"
    plain = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert "x-fastdraft-ignored-fields" not in plain.headers
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert float(next(line.split()[1] for line in metrics.splitlines()
                      if line.startswith("fastdraft_requests_with_ignored_fields_total"))) >= 2


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    ({"n": 4}, "n"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
])
def test_fields_that_cannot_be_honoured_get_a_400_naming_them(server, kwargs, param):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        _client(server).chat.completions.create(model="tiny-pair", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, **kwargs)
    assert info.value.body["param"] == param and param in info.value.body["message"]


def test_penalties_and_logit_bias_are_lossless_wrt_the_penalized_target(server, reference):
    client, tok = _client(server), reference.tok
    prompt = PROMPTS[2]
    ids = tok(prompt)["input_ids"]
    plain = reference(ids, 30)[0]
    bias_token = tok(" the", add_special_tokens=False)["input_ids"][-1]
    for kw in (dict(presence_penalty=1.5), dict(frequency_penalty=1.0, presence_penalty=0.3),
               dict(logit_bias={str(bias_token): 8.0})):
        want, _ = penalized_greedy(reference.model, ids, 30, tok.eos_token_id, presence=kw.get("presence_penalty", 0.0),
                                   frequency=kw.get("frequency_penalty", 0.0),
                                   bias={int(k): v for k, v in kw.get("logit_bias", {}).items()})
        got = client.completions.create(model="tiny-pair", prompt=prompt, max_tokens=30, temperature=0, **kw)
        assert got.choices[0].text == tok.decode(want, skip_special_tokens=True), kw
        assert got.choices[0].text != plain
        assert got.usage.model_extra["speculative"]["drafted"] > 0
    with torch.no_grad():  # vLLM's repetition_penalty: transformers' rule, over prompt and output
        ref = reference.model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, repetition_penalty=1.3,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(ids):]
    got = client.completions.create(model="tiny-pair", prompt=prompt, max_tokens=30, temperature=0,
                                    extra_body={"repetition_penalty": 1.3})
    assert got.choices[0].text == tok.decode(ref, skip_special_tokens=True)


def test_logprobs_are_the_targets_own(server, reference):
    client, tok = _client(server), reference.tok
    ids = tok(PROMPTS[0])["input_ids"]
    want, lps = penalized_greedy(reference.model, ids, 20, tok.eos_token_id, frequency=0.4)
    out = client.completions.create(model="tiny-pair", prompt=PROMPTS[0], max_tokens=20, temperature=0, logprobs=2,
                                    frequency_penalty=0.4)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([float(d[t]) for d, t in zip(lps, want)], abs=2e-4)
    # top_logprobs is keyed by token text: two ids with one text (a partial UTF-8 character) share an entry
    assert lp.tokens == [tok.decode([t]) for t in want] and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(t in top for top, t in zip(lp.top_logprobs, lp.tokens))  # greedy: the chosen token is the top one
    assert lp.text_offset[0] == 0 and "".join(lp.tokens).startswith(out.choices[0].text)
    messages = [{"role": "user", "content": "Name a prime."}]
    chat = client.chat.completions.create(model="tiny-pair", messages=messages, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3)
    cids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    cwant, clps = penalized_greedy(reference.model, cids, 12, tok.eos_token_id)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([float(d[t]) for d, t in zip(clps, cwant)], abs=2e-4)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)  # greedy = top 1
    streamed = client.chat.completions.create(model="tiny-pair", messages=messages, max_tokens=12, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    chunks = [c for c in streamed if c.choices and c.choices[0].logprobs]
    assert [x.logprob for c in chunks for x in c.choices[0].logprobs.content] == [c.logprob for c in content]


def test_echo_returns_the_prompt_before_the_completion(server, reference):
    client = _client(server)
    out = client.completions.create(model="tiny-pair", prompt=PROMPTS[1], max_tokens=10, temperature=0, echo=True)
    assert out.choices[0].text == PROMPTS[1] + reference(reference.tok(PROMPTS[1])["input_ids"], 10)[0]
    streamed = client.completions.create(model="tiny-pair", prompt=PROMPTS[1], max_tokens=10, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_with_the_target(server, reference):
    client, tok = _client(server), reference.tok
    ids = tok(PROMPTS[2])["input_ids"]
    with torch.no_grad():
        plp = reference.model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    out = client.completions.create(model="tiny-pair", prompt=PROMPTS[2], max_tokens=8, temperature=0, echo=True,
                                    logprobs=1)
    text, n = reference(ids, 8)
    choice = out.choices[0]
    assert choice.text == PROMPTS[2] + text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + n and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(plp[i, t]) for i, t in enumerate(ids[1:])], abs=2e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ids)] == len("".join(lp.tokens[:len(ids)]))
    chunks = list(client.completions.create(model="tiny-pair", prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                            echo=True, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    # vLLM's prompt_logprobs, on chat too: None first, then the prompt token's own entry with its rank
    body = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                "prompt_logprobs": 2}).json()
    plps = body["choices"][0]["prompt_logprobs"]
    assert len(plps) == body["usage"]["prompt_tokens"] and plps[0] is None
    assert all(1 <= len(e) <= 3 and all(v["rank"] >= 1 for v in e.values()) for e in plps[1:])


def test_vllm_sampling_extensions(server, reference):
    client, tok = _client(server), reference.tok
    prompt = PROMPTS[0]
    free = reference(tok(prompt)["input_ids"], 40)[0]
    n = client.completions.create(model="tiny-pair", prompt=prompt, max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True, "min_tokens": 40})
    assert n.usage.completion_tokens == 40 and n.choices[0].finish_reason == "length"
    ids = tok(prompt)["input_ids"]
    gen = reference.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                   eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    stop_id = gen[5]
    k = gen.index(stop_id)
    cut = client.completions.create(model="tiny-pair", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [stop_id]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == k + 1
    assert cut.choices[0].text == tok.decode(gen[:k], skip_special_tokens=True)  # the stop token's text is not shown
    kept = client.completions.create(model="tiny-pair", prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"stop_token_ids": [stop_id], "include_stop_str_in_output": True})
    assert kept.choices[0].text == tok.decode(gen[:k + 1], skip_special_tokens=True)
    stop = free[len(free) // 2: len(free) // 2 + 3]
    with_stop = client.completions.create(model="tiny-pair", prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                          extra_body={"include_stop_str_in_output": True})
    assert with_stop.choices[0].text == free[: free.index(stop) + len(stop)]
    chunks = list(client.chat.completions.create(
        model="tiny-pair", messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    assert all(c.usage is not None for c in chunks)  # usage so far on every chunk, the role chunk first with none yet
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 20


def test_vllm_prompt_extensions(server, reference):
    tok, messages = reference.tok, [{"role": "user", "content": "Name a prime."}]
    bare = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False),
               add_special_tokens=False)["input_ids"]
    r = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0,
                                             "add_generation_prompt": False}).json()
    assert r["usage"]["prompt_tokens"] == len(bare)
    ids = tok(PROMPTS[0])["input_ids"]
    r = server.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0,
                                        "truncate_prompt_tokens": 4}).json()
    assert r["usage"]["prompt_tokens"] == 4 and r["choices"][0]["text"] == reference(ids[-4:], 10)[0]
    allowed = sorted(set(ids))
    r = _client(server).completions.create(model="tiny-pair", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                           logprobs=0, extra_body={"allowed_token_ids": allowed})
    texts = {tok.decode([a]) for a in allowed}
    assert len(r.choices[0].logprobs.tokens) == 10 and set(r.choices[0].logprobs.tokens) <= texts


def test_a_client_disconnect_stops_its_generation_within_a_round(server):
    import time

    before = httpx.get(server.url + "/health", timeout=30).json()["engine"]["cancelled"]
    body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS_CAP, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=120) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    for _ in range(100):
        engine = httpx.get(server.url + "/health", timeout=30).json()["engine"]
        if engine["cancelled"] > before:
            break
        time.sleep(0.1)
    assert engine["cancelled"] == before + 1
    assert 0 < engine["last_cancelled_tokens"] < MAX_TOKENS_CAP
    # a client that gives up on a non-streamed answer is a disconnect too
    before = engine["cancelled"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, headers=server.headers, timeout=0.15)
    for _ in range(100):
        engine = httpx.get(server.url + "/health", timeout=30).json()["engine"]
        if engine["cancelled"] > before:
            break
        time.sleep(0.1)
    assert engine["cancelled"] == before + 1 and engine["last_cancelled_tokens"] < MAX_TOKENS_CAP
    # the replica is free again; the ingress counted a client that went away
    r = server.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    assert 'fastdraft_requests_total{endpoint="completions",status="499"}' in httpx.get(server.url + "/metrics", timeout=30).text


def test_a_request_past_its_timeout_gets_a_504_and_the_rest_go_on(server, reference):
    import openai

    client = _client(server)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(lambda: client.completions.create(
            model="tiny-pair", prompt=PROMPTS[0], max_tokens=MAX_TOKENS_CAP, temperature=0,
            extra_body={"ignore_eos": True, "timeout": 0.05}))  # all 960 tokens take ~0.5 s here
        fine = pool.submit(lambda: client.completions.create(model="tiny-pair", prompt=PROMPTS[1], max_tokens=16,
                                                             temperature=0))
        with pytest.raises(openai.APIStatusError) as info:
            slow.result()
        assert fine.result().choices[0].text == reference(reference.tok(PROMPTS[1])["input_ids"], 16)[0]
    assert info.value.status_code == 504 and info.value.body["param"] == "timeout"
    assert httpx.get(server.url + "/health", timeout=30).json()["engine"]["timed_out"] >= 1


# ------------------------------------------------------------------------------------------
# Isolation inside a model replica (the deployment class itself, a fake engine, no Serve)
# ------------------------------------------------------------------------------------------
class _FlakyRun:
    """A fake of `speculative.engine.Run`: each round, every row's next token is its last one + 1; a round whose
    batch holds a prompt containing 13 fails once that row has 2 tokens."""

    def __init__(self, on_tokens, should_stop):
        from types import SimpleNamespace

        self.on_tokens, self.should_stop = on_tokens, should_stop
        self.batch = SimpleNamespace(rows=[], tokens=[])
        self.results, self.limits, self.prompts, self.gamma = [], [], [], 3

    @property
    def done(self):
        return not self.batch.rows

    @property
    def sequences(self):
        return list(self.batch.rows)

    @property
    def size(self):
        return len(self.batch.rows)

    def add(self, prompts, prior_output=None, max_new_tokens=None, stop_token_ids=None, params=None):
        from fastdraft.speculative.types import GenerationResult

        seqs = []
        for p, m in zip(prompts, max_new_tokens or [r.max_new_tokens for r in params]):
            self.batch.tokens.append(list(p))
            self.prompts.append(list(p))
            self.results.append(GenerationResult([], "length"))
            self.limits.append(m)
            seqs.append(len(self.results) - 1)
        self.batch.rows += seqs
        return seqs

    def step(self):
        if any(13 in self.prompts[s] and len(self.results[s].token_ids) >= 2 for s in self.batch.rows):
            raise RuntimeError("poisoned prompt")
        finished = []
        for s in list(self.batch.rows):
            tok = (self.prompts[s] + self.results[s].token_ids)[-1] + 1
            self.results[s].token_ids.append(tok)
            self.on_tokens(s, [tok])
            if len(self.results[s].token_ids) >= self.limits[s] or self.should_stop(s):
                finished.append(s)
        self.batch.rows = [s for s in self.batch.rows if s not in finished]
        return finished


class _FlakyEngine:
    """A fake engine (no model: failures on demand) with the engine's Run API."""

    def __init__(self):
        from types import SimpleNamespace

        self.target, self.draft = SimpleNamespace(ragged=True), None

    def start(self, params, gamma=None, on_tokens=None, should_stop=None, on_prompt_logprobs=None):
        return _FlakyRun(on_tokens, should_stop)


def _replica(engine):
    from fastdraft.serving.app import SpeculativePair
    from fastdraft.serving.scheduler import Scheduler

    cls = SpeculativePair.func_or_class
    pair = object.__new__(cls)
    pair.engine, pair.info_, pair.stall_timeout_s = engine, {}, 0.5
    pair.counters = {"cancelled": 0, "timed_out": 0, "failed": 0, "retried_alone": 0, "last_cancelled_tokens": None}
    pair.scheduler = Scheduler(engine, None, max_batch_size=8, batch_wait_timeout_s=0.05, counters=pair.counters)
    return pair


def test_an_engine_failure_fails_only_its_own_request():
    import asyncio

    from fastdraft.speculative.types import SamplingParams

    pair = _replica(_FlakyEngine())
    params = SamplingParams(max_new_tokens=5)

    async def one(prompt):
        return [e async for e in type(pair).generate(pair, {"prompt_ids": prompt, "params": params, "gamma": 3})]

    async def main():  # three requests at once: one batch, whose rounds fail once the poisoned row has 2 tokens
        return await asyncio.gather(one([1, 2]), one([5, 13]), one([20]))

    good, bad, other = asyncio.run(main())
    assert [t for e in good for t in e["token_ids"]] == [3, 4, 5, 6, 7] and good[-1]["finish_reason"] == "length"
    assert [t for e in other for t in e["token_ids"]] == [21, 22, 23, 24, 25]
    assert "poisoned prompt" in bad[-1]["error"] and "finish_reason" not in bad[-1]
    assert pair.counters["failed"] == 1 and pair.counters["retried_alone"] == 3


def test_a_short_request_joins_a_running_batch_and_finishes_before_the_long_one():
    """Continuous batching in the replica: a 3-token request that arrives while a 40-token one is running joins its
    batch at the next round and is answered long before it."""
    import asyncio

    from fastdraft.speculative.types import SamplingParams

    class SlowEngine(_FlakyEngine):
        def start(self, *a, **k):
            run = super().start(*a, **k)
            step = run.step
            run.step = lambda: (__import__("time").sleep(0.01), step())[1]  # a round takes 10 ms
            return run

    pair = _replica(SlowEngine())
    order = []

    async def one(name, n, delay):
        await asyncio.sleep(delay)
        events = [e async for e in type(pair).generate(pair, {"prompt_ids": [1], "params": SamplingParams(max_new_tokens=n),
                                                              "gamma": 3})]
        order.append(name)
        return events

    async def main():
        return await asyncio.gather(one("long", 40, 0.0), one("short", 3, 0.1))

    long, short = asyncio.run(main())
    assert order == ["short", "long"]
    assert short[-1]["batch_rows"] == 2  # it joined the running batch
    assert [t for e in long for t in e["token_ids"]] == list(range(2, 42))


def test_requests_with_different_sampling_settings_share_one_batch_and_only_gamma_splits_batches():
    """The scheduler batches on gamma alone: greedy, nucleus, top-k and penalized requests with their own seeds and
    lengths arriving together run as one batch, each row with its own settings; another gamma runs beside them."""
    import asyncio

    from fastdraft.speculative.types import SamplingParams

    pair = _replica(_FlakyEngine())
    settings = [SamplingParams(max_new_tokens=5), SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=6, seed=1),
                SamplingParams(temperature=1.0, top_k=5, max_new_tokens=7, seed=2),
                SamplingParams(temperature=1.0, presence_penalty=0.5, max_new_tokens=4)]

    async def one(params, gamma):
        return [e async for e in type(pair).generate(pair, {"prompt_ids": [1], "params": params, "gamma": gamma})]

    async def main():
        return await asyncio.gather(*[one(p, 3) for p in settings], one(settings[0], 1))

    *same_gamma, other_gamma = asyncio.run(main())
    # Each joined the batch the ones before it were in (`batch_rows`: its rows once this request was added).
    assert sorted(e[-1]["batch_rows"] for e in same_gamma) == [1, 2, 3, 4]
    assert other_gamma[-1]["batch_rows"] == 1
    assert [sum(len(e["token_ids"]) for e in events) for events in same_gamma] == [p.max_new_tokens for p in settings]


def test_health_check_fails_when_the_engine_thread_stops_making_progress():
    import time

    pair = _replica(_FlakyEngine())
    pair.check_health()
    pair.scheduler.live, pair.scheduler.progress = 1, time.monotonic() - 5  # work in hand, nothing committed for 5 s
    with pytest.raises(RuntimeError, match="no progress"):
        pair.check_health()
    pair.scheduler.live = 0
    pair.check_health()  # idle is not stalled


class _PrefillFlakyRun(_FlakyRun):
    """A `_FlakyRun` whose prefill fails for prompts containing 17 (`PrefillError`: those rows leave, the rest go on)."""

    def __init__(self, on_tokens, should_stop):
        super().__init__(on_tokens, should_stop)
        self.prefilled: set[int] = set()

    def step(self):
        from fastdraft.errors import PrefillError

        bad = [s for s in self.batch.rows if s not in self.prefilled and 17 in self.prompts[s]]
        self.prefilled.update(self.batch.rows)
        if bad:
            self.batch.rows = [s for s in self.batch.rows if s not in bad]
            raise PrefillError(bad, RuntimeError("poisoned prefill"))
        return super().step()


class _PrefillFlakyEngine(_FlakyEngine):
    def start(self, params, gamma=None, on_tokens=None, should_stop=None, on_prompt_logprobs=None):
        return _PrefillFlakyRun(on_tokens, should_stop)


def test_a_failed_prefill_fails_only_its_own_request_and_the_running_rows_go_on():
    import asyncio

    from fastdraft.speculative.types import SamplingParams

    pair = _replica(_PrefillFlakyEngine())
    params = SamplingParams(max_new_tokens=5)

    async def one(prompt):
        return [e async for e in type(pair).generate(pair, {"prompt_ids": prompt, "params": params, "gamma": 3})]

    async def main():
        return await asyncio.gather(one([1, 2]), one([5, 17]), one([20]))

    good, bad, other = asyncio.run(main())
    assert [t for e in good for t in e["token_ids"]] == [3, 4, 5, 6, 7]
    assert [t for e in other for t in e["token_ids"]] == [21, 22, 23, 24, 25]
    assert "poisoned prefill" in bad[-1]["error"]
    # A prefill failing for one request fails it alone at once; the running rows were never continued on their own.
    assert pair.counters["failed"] == 1 and pair.counters["retried_alone"] == 0
