"""Shared fixtures: tiny offline assets (built once per session) and one Ray instance per session.

Tiny assets are hermetic: a byte-level BPE tokenizer trained on the standard library's text and
small Llama models built from it, in seconds. A few integration tests use the embedded SmolLM2.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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


@pytest.fixture
def copy_dir(tmp_path):
    """Copy a directory into this test's tmp_path (to modify it without touching session assets)."""

    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return _copy
