"""OpenVINO GenAI (the `openvino` extra, installed by CI): a pair exported from memory runs GenAI's target-alone and
speculative pipelines, and both give transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch

from fastdraft.errors import FastdraftError
from fastdraft.speculative.openvino import GenAIPipeline, export_ir
from fastdraft.speculative.pairs import agreeing_pair
from spec_fixtures import make_prompts


@pytest.mark.timeout(300)
def test_exported_pair_runs_genai_alone_and_speculative_with_transformers_greedy_output(tmp_path):
    """The exported models' EOS is a token the target emits mid-output: GenAI must run on past it, as transformers
    does without an eos_token_id, and never mask it out (its greedy output would then part from the target's)."""
    target, draft = agreeing_pair(vocab_size=512, hidden=128, layers=3, draft_layers=1, heads=2, kv_heads=1,
                                  intermediate=256, seed=4)
    prompts = make_prompts(3, seed=8)
    target.generation_config.eos_token_id = None
    with torch.inference_mode():
        refs = [target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=20, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
    for model in (target, draft):
        model.config.eos_token_id = model.generation_config.eos_token_id = refs[0][5]
    target_ir, draft_ir = export_ir(target, tmp_path / "target"), export_ir(draft, tmp_path / "draft")
    for name in ("openvino_model.xml", "openvino_model.bin", "config.json", "openvino_tokenizer.xml"):
        assert (target_ir / name).is_file(), name
    alone, speculative = GenAIPipeline(target_ir, threads=1), GenAIPipeline(target_ir, draft_ir, threads=1)
    for prompt, ref in zip(prompts, refs):
        assert alone.generate(prompt, 20) == ref
        for gamma in (1, 4):
            assert speculative.generate(prompt, 20, gamma) == ref


def test_export_refuses_a_model_that_is_not_float32(tmp_path):
    target, _ = agreeing_pair(vocab_size=64, hidden=64, layers=1, heads=1, kv_heads=1, intermediate=64,
                              dtype=torch.float64)
    with pytest.raises(FastdraftError, match="float32 IR from a float32 model, got torch.float64"):
        export_ir(target, tmp_path / "t")


def test_export_refuses_a_folder_that_holds_something_else(tmp_path):
    target, _ = agreeing_pair(vocab_size=64, hidden=64, layers=1, heads=1, kv_heads=1, intermediate=64)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FastdraftError, match="is not empty and holds no OpenVINO export"):
        export_ir(target, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
