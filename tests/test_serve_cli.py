"""`fastdraft serve RECIPE` as a user runs it: its own Ray, a real port, answers, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fastdraft serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200 and "is up at" in log.read_text():
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"fastdraft serve was not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(300)
def test_fastdraft_serve_starts_answers_and_stops_on_sigterm(tiny_target_dir, tiny_draft_dir, tmp_path):
    port = _free_port()
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-serve", "workdir": str(tmp_path / "run"), "target": {"model": str(tiny_target_dir)},
        "serve": {"draft": str(tiny_draft_dir), "port": port, "cpus_per_replica": 0.5, "max_tokens_cap": 32,
                  "model_name": "tiny"},
    }))
    log = tmp_path / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as on a laptop
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fastdraft.cli", "serve", str(recipe), "--set", "serve.gamma=2"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log, 200)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "def f(x):", "max_tokens": 12,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1 and r.json()["usage"]["speculative"]["gamma"] == 2
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert f"is up at {url}/v1" in text
    assert "no API key configured" in text  # said at start-up when serve.api_key_env is unset
    assert "[serve] stopping" in text
