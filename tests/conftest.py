"""Shared fixtures: tiny offline assets (built once per session) and one Ray instance per session.

Tiny assets are hermetic: a byte-level BPE tokenizer trained on the standard library's text and
small Llama models built from it, in seconds. A few integration tests use the embedded SmolLM2.
"""

from __future__ import annotations

import contextlib
import functools
import os
import json
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(assets_dir) -> Path:
    from fastdraft.assets import build_tiny_tokenizer

    out = assets_dir / "tokenizer"
    build_tiny_tokenizer(out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tiny_target_dir(assets_dir, tiny_tokenizer_dir) -> Path:
    """A 4-layer, 128-wide Llama 'target' (random weights) in the tiny vocabulary."""
    from fastdraft.assets import build_tiny_model

    out = assets_dir / "target"
    build_tiny_model(tiny_tokenizer_dir, out, layers=4, hidden=128, heads=4, kv_heads=2, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_draft_dir(assets_dir, tiny_target_dir) -> Path:
    """An untrained draft for the tiny target, made by the draft factory (with metadata)."""
    from fastdraft.models import make_draft

    out, _ = make_draft(tiny_target_dir, assets_dir / "draft", layers=1, hidden=64, seed=2)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default target (converted from its GGUF once, then cached)."""
    from fastdraft.assets import embedded_target_dir

    return embedded_target_dir()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 cores: keep fractional CPUs in tests)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch on one intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    tiny models gain nothing from two, and on a shared 2-core machine two spinning threads can run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def copy_dir(tmp_path):
    """Copy a directory into this test's tmp_path (to modify it without touching session assets)."""

    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return _copy


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_ray_head(log_dir: Path, temp: Path):
    """A real `ray start --head` cluster with a dashboard (for `ray job submit`), on free ports, its temp dir `temp`
    (short: Ray's socket paths have a length limit).

    Yields the dashboard address (http://127.0.0.1:PORT). Started in its own session and stopped with
    SIGTERM to its process group, so it never touches another Ray instance on this machine.
    """
    import secrets
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    ray_bin = Path(sys.executable).with_name("ray")
    dash, gcs = _free_port(), _free_port()
    log = open(log_dir / "ray_head.log", "w")
    # The job agent's and client server's fixed default ports may be held by the session's `ray.init()`
    # instance: move them. (Moving the other agent ports made the head time out at startup here.)
    cmd = [str(ray_bin), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    # Token auth (on by default in Ray 2.60): the head and every `ray job submit` share this token.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 300  # a loaded 2-core machine takes ~40 s
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answered (401 without the token): the dashboard is up
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                raise RuntimeError(f"ray head did not start; see {log.name}")
            time.sleep(1)
    try:
        yield address
    finally:
        stop_ray_head(proc, temp)


def stop_ray_head(proc, temp: Path) -> None:
    """SIGTERM to the head's process group (what `ray stop` does to a head started with --block), SIGKILL to what
    is left after a few seconds, then clean up. (One of the head's Python processes takes ~30 s to exit on SIGTERM,
    and `ray start --block` waits for it: half a minute per module, of a test cluster whose state is thrown away.)"""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real `ray start --head` (see `started_ray_head`), module-scoped: it stops when the module's tests end, so
    it never overlaps the in-process `ray_session` instance of later tests longer than needed (put a module's
    `ray job submit` tests together)."""
    with started_ray_head(tmp_path_factory.mktemp("ray_head"), Path("/tmp") / f"rh{os.getpid()}") as address:
        yield address


def submit_ray_job(address: str, *cmd: str, timeout: float = 600, runtime_env: dict | None = None) -> tuple[int, str]:
    """`ray job submit --working-dir <repo> [--runtime-env-json ENV] -- CMD...` against the head at `address`;
    returns (exit code, output)."""
    import json
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": address}
    env.pop("FASTDRAFT_OUTPUT_DIR", None)  # what the job sees comes from `runtime_env` only
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    for _ in range(30):  # the dashboard answers before its node agent is ready to take jobs
        res = subprocess.run([str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(repo),
                              *extra, "--", *cmd], capture_output=True, text=True, env=env, cwd=repo, timeout=timeout)
        if "No available agent to submit job" not in res.stdout + res.stderr:
            break
        time.sleep(5)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture
def ray_job(ray_head):
    """Run `ray job submit --working-dir <repo> -- CMD...` against `ray_head`; returns (exit code, output)."""
    return functools.partial(submit_ray_job, ray_head)


@pytest.fixture
def recipe_file(tmp_path, tiny_target_dir):
    """A prepare + generate recipe on the tiny target (a 40-document corpus and 4 prompts), as a YAML file."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"note {i}: " + "the quick brown fox " * (i % 7 + 1)}) + "\n"
                            for i in range(40)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                               for w in ["cats", "rivers", "numbers", "trees"]))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pipe", "workdir": str(tmp_path / "run"), "target": {"model": str(tiny_target_dir)},
        "prepare": {"seq_len": 32, "validation_fraction": 0.1, "max_actors": 1, "cpus_per_actor": 0.5,
                    "corpora": {"notes": {"sources": [{"name": "notes", "kind": "jsonl", "path": str(docs)}]}}},
        "generate": {"prompts": [{"name": "p", "kind": "jsonl", "path": str(prompts), "format": "plain"}],
                     "sampling": [{"temperature": 0.0, "max_new_tokens": 8}], "batch_size": 4, "cpus_per_actor": 0.5},
    }))
    return path
