"""`fastdraft export`: a draft written for transformers (hf), OpenVINO GenAI (openvino) or llama.cpp (gguf) loads in
that engine (gguf: in gguf's own reader and in transformers) with no fastdraft code, decodes greedily exactly as the
target alone does, and is checked against its source; bad input is refused before anything is written."""

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
# gguf
# ------------------------------------------------------------------------------------------------------------

GGUF_LOGIT_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}
"""Largest |logit difference| from the float32 source allowed per weights type (the tiny draft's logits are O(1);
measured: f32 0, f16 4e-4, q8_0 1e-2)."""


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (shape, type name)}) of a GGUF file, as gguf's own reader sees it."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors}


def test_gguf_export_is_a_llama_cpp_file_that_gguf_reads_back_with_the_targets_tokenizer(
        pruned_draft, tiny_target_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "gguf"
    assert cli.main(["export", str(pruned_draft), "--format", "gguf", "--out", str(out), "--prompts", "2",
                     "--max-new-tokens", "16", "--gamma", "3"]) == 0
    assert "| exported draft (q8_0) |" in capsys.readouterr().out  # q8_0 is the default
    fields, tensors = gguf_fields(out / "draft" / "draft.gguf")
    config = json.loads((pruned_draft / "config.json").read_text())
    target_tok = AutoTokenizer.from_pretrained(tiny_target_dir)

    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.vocab_size"]) == (
        config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
        config["num_key_value_heads"], config["vocab_size"])
    # llama.cpp's byte-level BPE: every id's token as the tokenizer spells it, its merges, its special ids.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    by_id = {i: t for t, i in target_tok.get_vocab().items()}
    assert fields["tokenizer.ggml.tokens"] == [by_id[i] for i in range(config["vocab_size"])]
    merges = json.loads((tiny_target_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (
        target_tok.bos_token_id, target_tok.eos_token_id)
    assert fields["tokenizer.ggml.add_bos_token"] is (target_tok("a")["input_ids"][0] == target_tok.bos_token_id)
    control = {i for i, t in enumerate(fields["tokenizer.ggml.token_type"]) if t == 3}
    assert control == set(target_tok.all_special_ids) and fields["tokenizer.chat_template"] == target_tok.chat_template
    # llama.cpp's tensor names; norms stay float32, matrices are q8_0; a tied head writes no output.weight.
    hidden = config["hidden_size"]
    assert tensors["token_embd.weight"] == ((hidden, config["vocab_size"]), "Q8_0")
    assert tensors["blk.0.attn_q.weight"][1] == tensors["blk.0.ffn_down.weight"][1] == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"] == ((hidden,), "F32") and tensors["output_norm.weight"][1] == "F32"
    assert "output.weight" not in tensors
    # transformers builds the same tokenizer from the file alone.
    from_file = AutoTokenizer.from_pretrained(out / "draft", gguf_file="draft.gguf")
    text = "Why does ice float? <|im_end|> 1234"
    assert from_file.get_vocab() == target_tok.get_vocab() and from_file(text)["input_ids"] == target_tok(text)["input_ids"]

    record = json.loads((out / "export.json").read_text())
    assert record["files"] == {"draft": "draft/draft.gguf", "target": None} and record["gguf"]["tokenizer"] == "gpt2"
    assert record["check"]["identical"] and record["check"]["ar_goal_met"]
    card = (out / "README.md").read_text()
    assert "-md ./draft/draft.gguf" in card and 'gguf_file="draft.gguf"' in card and "TARGET_GGUF" in card


@pytest.mark.parametrize("weights", ["f32", "f16", "q8_0"])
def test_a_gguf_draft_loads_in_transformers_with_the_sources_logits_and_the_targets_greedy_output(
        pruned_draft, tiny_target_dir, tmp_path, weights):
    from transformers import LlamaForCausalLM

    result = export_draft(pruned_draft, "gguf", tmp_path / "gguf", weights=weights, settings=QUICK)
    assert result.passed
    exported = load_gguf_as_a_user(tmp_path / "gguf" / "draft" / "draft.gguf")
    assert type(exported) is LlamaForCausalLM
    source = load_model(pruned_draft)
    prompt = check_prompts(tiny_target_dir, 1)[0]
    seq = torch.tensor([prompt + target_greedy(tiny_target_dir, prompt, 24)])
    with torch.inference_mode():
        diff = (exported(seq).logits - source(seq).logits).abs().max().item()
    assert diff <= GGUF_LOGIT_TOLERANCE[weights]
    assert result.record["check"]["logits_max_abs_diff"] <= GGUF_LOGIT_TOLERANCE[weights]
    assert target_greedy(tiny_target_dir, prompt, 20, assistant=exported) == target_greedy(tiny_target_dir, prompt, 20)
    assert result.record["check"]["ar_goal_met"], result.record["check"]


def load_gguf_as_a_user(path: Path):
    """A GGUF file loaded as a transformers user would: no fastdraft code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_gguf_stores_q_and_k_in_llama_cpps_rotary_layout(pruned_draft, tmp_path):
    """Hugging Face rotates each head's two halves; llama.cpp rotates adjacent pairs: the file holds the rows of
    each Q and K head interleaved (first half's row i, then second half's row i), as llama.cpp's converter writes."""
    import gguf

    from fastdraft.gguf_format import permute_for_llama_cpp

    one_head = torch.arange(8.0)[:, None]  # head_dim 8: rows 0-3 are the first half, 4-7 the second
    assert permute_for_llama_cpp(one_head, heads=1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]

    export_draft(pruned_draft, "gguf", tmp_path / "gguf", weights="f32", settings=QUICK)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "gguf" / "draft" / "draft.gguf").tensors}
    config = load_model(pruned_draft).config
    attn = load_model(pruned_draft).model.layers[0].self_attn
    for name, proj, heads in (("attn_q", attn.q_proj, config.num_attention_heads),
                              ("attn_k", attn.k_proj, config.num_key_value_heads)):
        stored = torch.from_numpy(tensors[f"blk.0.{name}.weight"].data.copy())
        assert torch.equal(stored, permute_for_llama_cpp(proj.weight.detach(), heads))
        assert not torch.equal(stored, proj.weight.detach())
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_v.weight"].data.copy()), attn.v_proj.weight.detach())


def test_gguf_export_of_a_subset_head_writes_a_full_output_layer_whose_greedy_choice_stays_in_the_subset(
        subset_draft, tiny_target_dir, tmp_path):
    """llama.cpp has no SubsetHead either: output.weight is written over the whole vocabulary, the other rows the
    subset's mean (as for hf)."""
    draft_dir, ids, u = subset_draft
    result = export_draft(draft_dir, "gguf", tmp_path / "gguf", weights="f32", settings=QUICK)
    assert result.passed and not result.record["gguf"]["tied_output"]
    _, tensors = gguf_fields(tmp_path / "gguf" / "draft" / "draft.gguf")
    assert tensors["output.weight"][0] == tensors["token_embd.weight"][0]  # the whole vocabulary
    exported, source = load_gguf_as_a_user(tmp_path / "gguf" / "draft" / "draft.gguf"), load_model(draft_dir)
    outside = torch.ones(meta_vocab(draft_dir), dtype=torch.bool)
    outside[ids] = False
    prompt = check_prompts(tiny_target_dir, 1)[0]
    seq = torch.tensor([prompt + target_greedy(tiny_target_dir, prompt, 24)])
    with torch.inference_mode():
        got, want = exported(seq).logits[0], source(seq).logits[0]
        behind = exported.lm_head(-u)
    assert not outside[got.argmax(-1)].any() and not outside[behind.argmax()]
    torch.testing.assert_close(got[:, ~outside], want[:, ~outside], rtol=1e-5, atol=1e-5)
    assert target_greedy(tiny_target_dir, prompt, 20, assistant=exported) == target_greedy(tiny_target_dir, prompt, 20)


def test_gguf_with_target_writes_the_pair_and_checks_the_draft_against_the_exported_target(
        pruned_draft, tiny_target_dir, tmp_path):
    out = tmp_path / "pair"
    result = export_draft(pruned_draft, "gguf", out, weights="f16", with_target=True, settings=QUICK)
    assert result.passed and result.record["files"] == {"draft": "draft/draft.gguf", "target": "target/target.gguf"}
    fields, _ = gguf_fields(out / "target" / "target.gguf")
    assert fields["llama.block_count"] == json.loads((tiny_target_dir / "config.json").read_text())["num_hidden_layers"]
    target, exported_target = load_model(tiny_target_dir), load_gguf_as_a_user(out / "target" / "target.gguf")
    prompt = torch.tensor([check_prompts(tiny_target_dir, 1)[0]])
    with torch.inference_mode():
        torch.testing.assert_close(exported_target(prompt).logits, target(prompt).logits, rtol=0, atol=GGUF_LOGIT_TOLERANCE["f16"])
    assert "llama-speculative -m ./target/target.gguf -md ./draft/draft.gguf" in (out / "README.md").read_text()


def test_llama_cpp_loads_the_gguf_draft_with_the_targets_tokens_and_the_sources_logits(pruned_draft, tiny_target_dir,
                                                                                      tmp_path):
    """The reader the file is for: llama.cpp itself, through llama-cpp-python (not a dependency: it compiles
    llama.cpp from source; skipped where it is not installed). Measured on this draft: largest logit difference
    3e-4 for f32 (llama.cpp keeps its KV cache in f16), 1.2e-2 for q8_0."""
    import numpy as np
    from transformers import AutoTokenizer

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    export_draft(pruned_draft, "gguf", tmp_path / "gguf", settings=QUICK)  # q8_0
    text = "The quick brown fox jumps over the lazy dog. Why does ice float? <|im_end|> 12345"
    ids = AutoTokenizer.from_pretrained(tiny_target_dir)(text)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "draft" / "draft.gguf"), n_ctx=256, logits_all=True,
                          verbose=False, n_threads=1)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()
    with torch.inference_mode():
        want = load_model(pruned_draft)(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max().item() <= GGUF_LOGIT_TOLERANCE["q8_0"]


def test_llama_cpp_speculative_decoding_with_the_gguf_pair_keeps_the_targets_greedy_output(pruned_draft,
                                                                                          tiny_target_dir, tmp_path):
    """llama-cpp-python's speculative loop (the target verifies what a draft proposes), with both files of a
    `--with-target` export in llama.cpp: greedy output equal to the target's alone (skipped where llama-cpp-python
    is not installed)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from llama_cpp.llama_speculative import LlamaDraftModel

    result = export_draft(pruned_draft, "gguf", tmp_path / "pair", weights="f32", with_target=True, settings=QUICK)
    gamma, new = QUICK.gamma, QUICK.max_new_tokens

    class GreedyGGUFDraft(LlamaDraftModel):
        """The draft file in llama.cpp, proposing `gamma` greedy tokens after the context it is given."""

        def __init__(self):
            self.llm = llama_cpp.Llama(model_path=str(tmp_path / "pair" / "draft" / "draft.gguf"), n_ctx=256,
                                       logits_all=True, verbose=False, n_threads=1)

        def __call__(self, input_ids, **kwargs):
            self.llm.reset()
            self.llm.eval(input_ids.tolist())
            proposed = []
            for _ in range(gamma):
                proposed.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
                self.llm.eval(proposed[-1:])
            return np.array(proposed, dtype=np.intc)

    def greedy(llm, prompt: list[int]) -> list[int]:
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == new:
                return out

    target_file = str(tmp_path / "pair" / "target" / "target.gguf")
    draft = GreedyGGUFDraft()
    alone = llama_cpp.Llama(model_path=target_file, n_ctx=256, verbose=False, n_threads=1)
    paired = llama_cpp.Llama(model_path=target_file, n_ctx=256, verbose=False, n_threads=1, draft_model=draft)
    try:
        for prompt in check_prompts(tiny_target_dir, QUICK.prompts):
            assert greedy(paired, prompt) == greedy(alone, prompt)
    finally:
        for llm in (alone, paired, draft.llm):
            llm.close()
    assert result.passed


def test_a_draft_gguf_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    from fastdraft.assets import build_tiny_model, build_tiny_tokenizer
    from fastdraft.models import make_draft

    build_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    build_tiny_model(tmp_path / "tok", tmp_path / "qwen", family="qwen2", layers=1, hidden=32, heads=2, kv_heads=1)
    draft, _ = make_draft(tmp_path / "qwen", tmp_path / "draft", layers=1, init="target")
    with pytest.raises(FastdraftError, match="--format gguf writes plain Llama drafts; this one has model type 'qwen2'"):
        export_draft(draft, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, weights, match", [
    ("onnx", None, "unknown export format 'onnx' .expected one of hf, openvino, gguf"),
    ("hf", "int8", "--weights int8 is not available for --format hf"),
    ("gguf", "int8", r"--weights int8 is not available for --format gguf \(choose f32, f16, q8_0; gguf's int8 is q8_0\)"),
    ("gguf", "int4", r"--weights int4 is not available for --format gguf \(choose f32, f16, q8_0"),
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


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_folder_holding_something_else_is_refused_and_left_as_it_was(pruned_draft, tmp_path, capsys, fmt):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["export", str(pruned_draft), "--format", fmt, "--out", str(out)]) == 2
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
