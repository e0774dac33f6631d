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
MAX_TOKENS_CAP = 48


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
                         "cpus_per_replica": 0.5, "api_key_env": KEY_ENV})
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

    greedy.tok = tok
    return greedy


PROMPTS = ["def fibonacci(n):\n    ", "The standard library provides", "import os\nimport sys\n"]


def test_completions_equal_the_targets_greedy_output(server, reference):
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
