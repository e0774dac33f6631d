"""Helpers shared by the speculative-engine tests: transformers' greedy output (the oracle), counter checks, prompts."""

from __future__ import annotations

import torch
from transformers import GenerationConfig


def hf_greedy(model, prompt: list[int], max_new: int, stop: int) -> list[int]:
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=stop, pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt):].tolist()


def check_counters(results, engine) -> None:
    total = 0
    for r in results:
        s = r.stats
        assert s.emitted == len(r.token_ids)
        assert s.emitted + s.truncated == s.accepted + s.looked_up_accepted + s.target_passes
        assert 0 <= s.looked_up_accepted <= s.looked_up
        assert s.drafted == sum(s.per_position_drafted) and s.accepted == sum(s.per_position_accepted)
        assert all(a <= d for a, d in zip(s.per_position_accepted, s.per_position_drafted))
        assert all(x >= y for x, y in zip(s.per_position_accepted, s.per_position_accepted[1:]))  # prefix acceptance
        total += s.emitted
    assert engine.last_stats.emitted == total


def make_prompts(n: int, seed: int, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
