"""Installs that resolve, and the accelerator paths this machine cannot run, checked as far as it can.

The `[gaudi]` extra must install beside fastdraft's own requirements (optimum-habana cannot: it pins
transformers < 4.56). Gaudi's PyTorch bridge is not on PyPI, so its absence must be explained by naming where it
comes from, and the training loop must call `mark_step()` for lazy mode (a fake bridge stands in for Gaudi here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastdraft.config import ComputeConfig, OptimConfig
from fastdraft.errors import MissingDependencyError
from fastdraft.training import backends
from fastdraft.training.loop import LoopConfig, train_step
from fastdraft.training.losses import ChunkedLMLoss

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_the_gaudi_extra_resolves_with_pips_dry_run_beside_transformers_5(tmp_path):
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                          "--report", str(report), "torch==2.13.0", f"{ROOT}[gaudi]"],
                         capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stderr[-3000:]
    versions = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert versions["transformers"].startswith("5."), versions["transformers"]
    assert "optimum-habana" not in versions


def test_hpu_without_habanas_bridge_says_where_the_bridge_comes_from():
    if "habana_frameworks" in sys.modules:
        pytest.skip("Habana's bridge is installed: this checks the message for its absence")
    with pytest.raises(MissingDependencyError) as err:
        backends.check_available(ComputeConfig(device="hpu", num_workers=1), {"CPU": 2})
    message = str(err.value)
    assert "habana_frameworks" in message and "Gaudi PyTorch image" in message and "[gaudi]" in message
    assert "[hpu]" not in message  # no such extra


def test_the_loop_calls_mark_step_after_each_backward_and_the_optimizer_step_with_a_fake_gaudi_bridge(
        tiny_draft_dir, monkeypatch):
    from fastdraft.checkpoint import load_model

    calls: list[str] = []
    core = types.ModuleType("habana_frameworks.torch.core")
    core.mark_step = lambda: calls.append("mark_step")
    for name, module in {"habana_frameworks": types.ModuleType("habana_frameworks"),
                         "habana_frameworks.torch": types.ModuleType("habana_frameworks.torch"),
                         "habana_frameworks.torch.core": core}.items():
        monkeypatch.setitem(sys.modules, name, module)
    model = load_model(tiny_draft_dir)
    cfg = LoopConfig(stage="PT", init_dir=str(tiny_draft_dir), seq_len=8, micro_batch_size=2, grad_accum=2,
                     total_steps=1, optim=OptimConfig(lr=1e-3), compute=ComputeConfig(device="hpu"))
    micro = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 8))} for _ in range(2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # The tensors stay on the CPU; only the device the loop is told about is Gaudi's.
    loss, _ = train_step(ChunkedLMLoss(model, "ce"), optimizer, micro, [None, None], cfg, torch.device("hpu"), world=1)
    assert loss > 0
    assert calls == ["mark_step"] * 3  # after each of the 2 backward passes, then after the optimizer step
