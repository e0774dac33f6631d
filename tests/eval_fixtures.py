"""Fixtures for the evaluation tests: a tiny target/draft pair that agrees *partially*.

The shared tiny target has random weights at init scale, so its greedy output repeats one token and any
two such models agree all the time or never. Scaling its layers' weights makes its output depend on
context; a draft made of the same weights plus small noise then agrees with it part of the time, which
is what acceptance measurements need to be tested on (not only 0 or 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastdraft.checkpoint import DraftMetadata, save_draft
from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

LAYER_SCALE = 4.0
DRAFT_NOISE = 0.004


def perturbed_copy(model: torch.nn.Module, scale: float = 1.0, noise: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """Scale (then add Gaussian noise to) every non-norm weight of the transformer layers, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and "norm" not in name:
                p.mul_(scale)
                if noise:
                    p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model


@pytest.fixture(scope="session")
def eval_pair(tmp_path_factory, tiny_target_dir) -> tuple[Path, Path]:
    """(target_dir, draft_dir): a context-sensitive tiny target and a noisy copy as its draft (with metadata)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval_pair")
    tok = load_tokenizer(tiny_target_dir)
    meta = DraftMetadata(target=str(root / "target"), tokenizer_fingerprint=tokenizer_fingerprint(tok))
    target = perturbed_copy(AutoModelForCausalLM.from_pretrained(tiny_target_dir), LAYER_SCALE)
    save_draft(target, tok, root / "target", meta)
    draft = perturbed_copy(AutoModelForCausalLM.from_pretrained(tiny_target_dir), LAYER_SCALE, DRAFT_NOISE, seed=1)
    save_draft(draft, tok, root / "draft", meta.with_stage("FT", 1000, "test"))
    return root / "target", root / "draft"

