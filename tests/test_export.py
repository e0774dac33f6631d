"""`fastdraft export`: a draft written for transformers (hf) and OpenVINO GenAI (openvino) loads in that engine with
no fastdraft code, decodes greedily exactly as the target alone does, and is checked against its source; bad input
is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastdraft import cli
from fastdraft.checkpoint import load_model, read_metadata, write_metadata
from fastdraft.errors import FastdraftError, MissingDependencyError, TokenizerMismatchError
from fastdraft.export import CheckSettings, check_out_dir, check_prompts, export_draft, publish, resolve_draft
from fastdraft.models import HEAD_TOKENS_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = CheckSettings(prompts=2, max_new_tokens=16, gamma=3, threads=1)


@pytest.fixture(scope="module")
def pruned_draft(tiny_target_dir, tmp_path_factory) -> Path:
    """The tiny target's first layer as a draft (make-draft --init target): it agrees with the target often."""
    from fastdraft.models import make_draft

    return make_draft(tiny_target_dir, tmp_path_factory.mktemp("export") / "draft", layers=1, init="target")[0]


@pytest.fixture(scope="module")
def subset_draft(pruned_draft, tmp_path_factory) -> tuple[Path, list[int], torch.Tensor]:
    """The same draft with an output layer (a SubsetHead) over the tokens whose rows point along a direction u:
    the hidden state -u then gives every token in the subset a negative logit, where a zero row would win."""
    import shutil

    out = tmp_path_factory.mktemp("export") / "subset"
    shutil.copytree(pruned_draft, out)
    rows = load_model(pruned_draft).get_output_embeddings().weight.detach()
    u = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0))
    ids = torch.nonzero(rows @ u > 0).flatten().tolist()
    meta = read_metadata(out)
    meta.extra[HEAD_TOKENS_KEY] = ids
    write_metadata(out, meta)
    return out, ids, u


def meta_vocab(draft: Path) -> int:
    return json.loads((draft / "config.json").read_text())["vocab_size"]


def target_greedy(target_dir: Path, prompt: list[int], new: int, assistant=None) -> list[int]:
    target = load_model(target_dir)
    extra = {"assistant_model": assistant} if assistant is not None else {}
    with torch.inference_mode():
        out = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, pad_token_id=0, **extra)
    return out[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------------------------------
# hf
# ------------------------------------------------------------------------------------------------------------

def test_hf_export_is_a_plain_transformers_assistant_whose_greedy_output_is_the_targets(
        pruned_draft, tiny_target_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "hf"
    assert cli.main(["export", str(pruned_draft), "--format", "hf", "--out", str(out), "--prompts", "2",
                     "--max-new-tokens", "16", "--gamma", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| exported draft (f32) |" in printed and "| target alone |" in printed

    draft = AutoModelForCausalLM.from_pretrained(out / "draft", local_files_only=True)  # no fastdraft code involved
    assert type(draft) is LlamaForCausalLM
    assert AutoTokenizer.from_pretrained(out / "draft").get_vocab() == AutoTokenizer.from_pretrained(tiny_target_dir).get_vocab()
    prompt = check_prompts(tiny_target_dir, 1)[0]
    assert target_greedy(tiny_target_dir, prompt, 20, assistant=draft) == target_greedy(tiny_target_dir, prompt, 20)

    record = json.loads((out / "export.json").read_text())
    rows = {r["label"]: r for r in record["check"]["rows"]}
    assert record["check"]["identical"] and rows["exported draft (f32)"]["identical"]
    assert rows["exported draft (f32)"]["acceptance_rate"] == rows["source draft (f32)"]["acceptance_rate"]
    card = (out / "README.md").read_text()
    assert read_metadata(pruned_draft).tokenizer_fingerprint in card and "assistant_model=draft" in card


def test_hf_export_of_a_subset_head_never_proposes_a_token_outside_the_subset(subset_draft, tiny_target_dir, tmp_path):
    """Plain transformers has no SubsetHead: the other rows are the subset's mean, so their logit never wins."""
    from transformers import AutoModelForCausalLM

    draft_dir, ids, u = subset_draft
    result = export_draft(draft_dir, "hf", tmp_path / "hf", settings=QUICK)
    assert result.passed
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "draft", local_files_only=True).eval()
    source = load_model(draft_dir)
    outside = torch.ones(meta_vocab(draft_dir), dtype=torch.bool)
    outside[ids] = False
    for prompt in check_prompts(tiny_target_dir, 4):  # real prompts, and the target's answers to them, position by position
        seq = torch.tensor([prompt + target_greedy(tiny_target_dir, prompt, 24)])
        with torch.inference_mode():
            got, want = exported(seq).logits[0], source(seq).logits[0]
        assert not outside[got.argmax(-1)].any()
        torch.testing.assert_close(got[:, ~outside], want[:, ~outside], rtol=1e-5, atol=1e-5)
        assert (got[:, outside].max(-1).values < got[:, ~outside].max(-1).values).all()
    with torch.inference_mode():  # a hidden state where every subset logit is negative: a zero row (logit 0) would win
        logits = exported.lm_head(-u)
    assert (logits[ids] < 0).all() and not outside[logits.argmax()]
    prompt = check_prompts(tiny_target_dir, 1)[0]
    assert target_greedy(tiny_target_dir, prompt, 20, assistant=exported) == target_greedy(tiny_target_dir, prompt, 20)


# ------------------------------------------------------------------------------------------------------------
# openvino
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_openvino_int8_pair_runs_in_genai_with_a_draft_model_and_the_targets_greedy_output(pruned_draft, tmp_path):
    import openvino as ov
    import openvino_genai as ov_genai

    out = tmp_path / "ov"
    result = export_draft(pruned_draft, "openvino", out, with_target=True, settings=QUICK)
    record = json.loads((out / "export.json").read_text())
    assert record["weights"] == "int8" and record["files"] == {"draft": "draft", "target": "target"}
    constants = {str(op.get_element_type()) for op in ov.Core().read_model(out / "draft" / "openvino_model.xml").get_ops()
                 if op.get_type_name() == "Constant"}
    assert "<Type: 'uint8_t'>" in constants  # NNCF's int8 weights
    rows = {r.label: r for r in result.rows}
    assert rows["exported draft (int8)"].identical and rows["exported draft (int8)"].drafted > 0
    assert record["check"]["ar_goal_met"], record["check"]

    # Loaded as a GenAI user would: text in, the pair's own tokenizer, greedy.
    config = ov_genai.GenerationConfig(max_new_tokens=12, ignore_eos=True, do_sample=False)
    alone = ov_genai.LLMPipeline(str(out / "target"), "CPU")
    pair = ov_genai.LLMPipeline(str(out / "target"), "CPU", draft_model=ov_genai.draft_model(str(out / "draft"), "CPU"))
    speculative = ov_genai.GenerationConfig(max_new_tokens=12, ignore_eos=True, do_sample=False, num_assistant_tokens=3)
    assert pair.generate("The quick brown fox", speculative) == alone.generate("The quick brown fox", config)
    assert "num_assistant_tokens" in (out / "README.md").read_text()


@pytest.mark.timeout(600)
def test_openvino_export_of_a_subset_head_gives_minus_infinity_outside_the_subset(subset_draft, tiny_target_dir, tmp_path):
    """The IR keeps the SubsetHead's contract: its logits are -inf for every token outside the subset."""
    import numpy as np
    import openvino as ov

    draft_dir, ids, _ = subset_draft
    result = export_draft(draft_dir, "openvino", tmp_path / "ov", weights="f32", settings=QUICK)
    assert result.passed
    prompt = check_prompts(tiny_target_dir, 1)[0]
    from fastdraft.speculative.openvino import F32

    request = ov.Core().compile_model(tmp_path / "ov" / "draft" / "openvino_model.xml", "CPU", F32).create_infer_request()
    n = len(prompt)
    logits = request.infer({"input_ids": np.array([prompt]), "attention_mask": np.ones((1, n), dtype=np.int64),
                            "position_ids": np.arange(n)[None], "beam_idx": np.zeros(1, dtype=np.int32)})["logits"][0]
    inside = np.zeros(logits.shape[-1], dtype=bool)
    inside[ids] = True
    assert np.isneginf(logits[:, ~inside]).all() and np.isfinite(logits[:, inside]).all()
    with torch.inference_mode():
        want = load_model(draft_dir)(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(logits[:, inside], want[:, inside], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, weights, match", [
    ("onnx", None, "unknown export format 'onnx' .expected one of hf, openvino, gguf"),
    ("hf", "int8", "--weights int8 is not available for --format hf"),
    ("gguf", None, "--format gguf is not built yet"),
])
def test_an_unknown_format_or_weights_is_refused_and_nothing_is_written(pruned_draft, tmp_path, fmt, weights, match):
    with pytest.raises(FastdraftError, match=match):
        export_draft(pruned_draft, fmt, tmp_path / "out", weights=weights)
    assert not (tmp_path / "out").exists()


def test_a_missing_extra_names_it(pruned_draft, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)  # what `import nncf` does where the extra is not installed
    with pytest.raises(MissingDependencyError, match=r"'nncf' package.*pip install 'fastdraft\[openvino\]'"):
        export_draft(pruned_draft, "openvino", tmp_path / "out", weights="int8")
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_something_else_is_refused_and_left_as_it_was(pruned_draft, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["export", str(pruned_draft), "--format", "hf", "--out", str(out)]) == 2
    assert "is not empty and holds no previous export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_a_previous_export_is_accepted_and_replaced_only_when_the_new_one_is_published(tmp_path):
    out, staging = tmp_path / "ex", tmp_path / "ex.partial"
    out.mkdir()
    (out / "export.json").write_text("{}")
    (out / "old.txt").write_text("old")
    check_out_dir(out)  # a previous export: no error
    staging.mkdir()
    (staging / "export.json").write_text('{"new": true}')
    publish(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["export.json"] and not staging.exists()


def test_a_draft_whose_tokenizer_differs_from_the_targets_is_refused(pruned_draft, tmp_path):
    from fastdraft.assets import build_tiny_tokenizer, build_tiny_model

    build_tiny_tokenizer(tmp_path / "tok", vocab_size=400)
    other = tmp_path / "other-target"
    build_tiny_model(tmp_path / "tok", other, layers=1, hidden=32, heads=2, kv_heads=1)
    with pytest.raises(TokenizerMismatchError, match="vocabulary size"):
        export_draft(pruned_draft, "hf", tmp_path / "out", target=str(other))
    assert not (tmp_path / "out").exists()


def test_a_source_that_is_no_draft_is_refused(tmp_path):
    with pytest.raises(FastdraftError, match="neither a draft directory"):
        export_draft(tmp_path, "hf", tmp_path / "out")


def test_a_workdir_exports_its_draft_with_the_most_stages(pruned_draft, tmp_path):
    import shutil

    for stage, history in (("PT", ["PT"]), ("FT", ["PT", "CP", "FT"]), ("CP", ["PT", "CP"])):
        shutil.copytree(pruned_draft, tmp_path / "drafts" / stage)
        meta = read_metadata(pruned_draft)
        for name in history:
            meta = meta.with_stage(name, 1000)
        write_metadata(tmp_path / "drafts" / stage, meta)
    assert resolve_draft(tmp_path) == tmp_path / "drafts" / "FT"
