"""Prompt sources for the alignment set: formats, chat template, length policy, bad rows, Magpie prefix.

No Ray here: these are the pure parts of `fastdraft.generation.prompts` on the tiny tokenizer
(ChatML template, like SmolLM2's) and, where it matters, SmolLM2's own tokenizer.
"""

from __future__ import annotations

import gzip
import json

import pytest

from fastdraft.config import PromptSourceConfig
from fastdraft.errors import FastdraftError, RecipeError
from fastdraft.generation.prompts import (
    MalformedRow, Prompt, PromptEncoder, check_source, iter_jsonl, iter_stdlib_functions, load_prompts,
    magpie_prefix, reserved_eval_texts, row_to_messages,
)
from fastdraft.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("row, fmt, expected", [
    ({"instruction": "Sum these.", "input": "1 2"}, "alpaca", [("user", "Sum these.\n\n1 2")]),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", [("user", "Say hi.")]),
    ({"instruction": "Summarize.", "context": "Ray scales Python.", "response": "x"}, "dolly",
     [("user", "Summarize.\n\nRay scales Python.")]),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                        {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Later turn"}]}, "sharegpt",
     [("system", "Be brief."), ("user", "Hi?")]),
    ({"messages": [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "A"},
                   {"role": "user", "content": "Second?"}]}, "messages", [("user", "First?")]),
    ({"prompt": "  Tell me a joke. "}, "plain", [("user", "Tell me a joke.")]),
])
def test_each_format_becomes_the_first_user_turn(row, fmt, expected):
    assert row_to_messages(row, fmt) == (expected, False)
    assert row_to_messages(row, "auto") == (expected, False)  # auto-detection picks the same format


def test_code_rows_are_marked_as_code_to_be_continued():
    assert row_to_messages({"prompt": "def f(x):\n"}, "code") == ([("user", "def f(x):\n")], True)  # kept exactly


@pytest.mark.parametrize("row, reason", [
    ({"instruction": "   "}, "empty"),
    ({"instruction": 5}, "not_text"),
    ({"foo": "bar"}, "unknown_format"),
    ({"conversations": [{"from": "gpt", "value": "answer only"}]}, "no_user_turn"),
    ({"conversations": [{"from": "alien", "value": "?"}]}, "malformed_turn"),
    ({"messages": "not a list"}, "missing_field"),
])
def test_unusable_rows_name_their_reason(row, reason):
    with pytest.raises(MalformedRow) as exc:
        row_to_messages(row, "auto")
    assert exc.value.reason == reason


# ---------------------------------------------------------------------------------------------- encoding
def test_chat_prompts_are_rendered_with_the_targets_template(tok):
    enc = PromptEncoder(tok, max_prompt_tokens=512)
    p = enc.encode(Prompt("s", (("user", "Name a color."),)))
    assert p.prompt_text == "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    assert p.prompt_ids == tok(p.prompt_text, add_special_tokens=False)["input_ids"]
    assert p.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # special tokens kept as single ids


def test_overlong_prompts_are_skipped_or_truncated_to_fit(tok):
    long = ("the quick brown fox jumps over the lazy dog " * 40).strip()
    chat = Prompt("s", (("user", long),))
    with pytest.raises(MalformedRow, match="overlong"):
        PromptEncoder(tok, 64, "skip").encode(chat)
    cut = PromptEncoder(tok, 64, "truncate").encode(chat)
    assert cut.truncated and len(cut.prompt_ids) <= 64
    assert cut.prompt_text.startswith("<|im_start|>user\nthe quick") and cut.prompt_text.endswith("<|im_start|>assistant\n")
    raw = PromptEncoder(tok, 32, "truncate").encode(Prompt("s", (("user", long + " END"),), raw=True))
    assert len(raw.prompt_ids) == 32 and raw.prompt_text.endswith("END")  # a raw prompt keeps the part it continues


def test_a_prompt_whose_template_alone_exceeds_the_limit_is_skipped(tok):
    with pytest.raises(MalformedRow, match="overlong"):
        PromptEncoder(tok, 4, "truncate").encode(Prompt("s", (("user", "hello there"),)))


# ---------------------------------------------------------------------------------------------- sources
def test_jsonl_source_counts_every_bad_row_and_dedupes(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "Write a haiku."}, "{not json", {"instruction": ""}, {"x": 1},
        {"instruction": "Write a haiku."}, {"prompt": "x " * 600}, {"conversations": [{"from": "human", "value": "Hi"}]},
    ])
    source = PromptSourceConfig(name="inst", kind="jsonl", path=str(path))
    prompts, stats = load_prompts(source, PromptEncoder(tok, 128, "skip"))
    assert [p.prompt_text.split("\n")[1] for p in prompts] == ["Write a haiku.<|im_end|>", "Hi<|im_end|>"]
    assert dict(stats.skipped) == {"invalid_json": 1, "empty": 1, "unknown_format": 1, "duplicate": 1, "overlong": 1}
    assert len({p.prompt_id for p in prompts}) == 2 and all(p.prompt_id.startswith("inst:") for p in prompts)


def test_json_arrays_gzip_and_limits(tmp_path, tok):
    (tmp_path / "alpaca_data.json").write_text(json.dumps([{"instruction": f"Task {i}", "input": ""} for i in range(5)]))
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"instruction": "Gzipped task"}) + "\n")
    assert len(list(iter_jsonl(str(tmp_path)))) == 6
    source = PromptSourceConfig(name="a", kind="jsonl", path=str(tmp_path / "alpaca_data.json"), limit=3)
    prompts, _ = load_prompts(source, PromptEncoder(tok, 128))
    assert len(prompts) == 3


def test_parquet_and_local_hf_sources(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Explain Ray.", "context": "", "response": "..."}, {"instruction": "List colors.", "context": "", "response": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dolly.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "dolly_hf"))
    enc = PromptEncoder(tok, 128)
    from_parquet, _ = load_prompts(PromptSourceConfig(name="d", kind="parquet", path=str(tmp_path / "*.parquet"), format="dolly"), enc)
    from_hf, _ = load_prompts(PromptSourceConfig(name="d", kind="hf", path=str(tmp_path / "dolly_hf")), enc)
    assert [p.prompt_text for p in from_parquet] == [p.prompt_text for p in from_hf]
    assert len(from_hf) == 2


def test_missing_files_fail_before_anything_runs(tmp_path):
    with pytest.raises(FastdraftError, match="no files match"):
        check_source(PromptSourceConfig(name="x", kind="jsonl", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(FastdraftError, match="never downloads"):
        check_source(PromptSourceConfig(name="x", kind="hf", path="tatsu-lab/alpaca"))


def test_stdlib_code_prompts_are_signature_and_docstring_continued_raw(tok):
    funcs = [f for _, f in zip(range(5), iter_stdlib_functions(per_file=2))]
    assert len(funcs) == 5
    for code in funcs:
        assert code.startswith(("def ", "async def ")) and code.rstrip().endswith(('"""', "'''"))
        compile(code + "    pass\n", "<prompt>", "exec")  # a complete header: only the body is missing
    prompts, _ = load_prompts(PromptSourceConfig(name="code", kind="stdlib_code", limit=4), PromptEncoder(tok, 512))
    assert len(prompts) == 4 and all(p.prompt_text.startswith(("def ", "async def ")) for p in prompts)
    assert all(p.prompt_text.endswith(('"""\n', "'''\n")) for p in prompts)  # the body starts on the next line
    wrapped, _ = load_prompts(PromptSourceConfig(name="code", kind="stdlib_code", limit=1, template="chat"), PromptEncoder(tok, 512))
    assert wrapped[0].prompt_text.startswith("<|im_start|>user\nComplete the following Python function")


def test_chat_template_required_when_asked_for(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    plain.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    with pytest.raises(RecipeError, match="no chat template"):
        load_prompts(PromptSourceConfig(name="p", kind="jsonl", path=str(path), template="chat"), PromptEncoder(plain, 64))
    prompts, _ = load_prompts(PromptSourceConfig(name="p", kind="jsonl", path=str(path)), PromptEncoder(plain, 64))
    assert prompts[0].prompt_text == "hello"  # auto: no template -> the text as it is
    with pytest.raises(RecipeError, match="chat template"):
        magpie_prefix(plain)


def test_magpie_prefix_is_the_template_up_to_the_users_words(tok, smollm2_dir):
    assert magpie_prefix(tok) == "<|im_start|>user\n"
    smol = load_tokenizer(smollm2_dir)
    prefix = magpie_prefix(smol)
    assert prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_end|>\n<|im_start|>user\n")


def test_evaluation_prompts_never_become_training_prompts(tmp_path, tok):
    from fastdraft.assets import humaneval_problems
    from fastdraft.evaluation.tasks import iter_instruction_texts

    reserved = reserved_eval_texts()
    held_out = next(iter(iter_instruction_texts()))
    humaneval = humaneval_problems()[0]["prompt"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": held_out.upper()}, {"prompt": "A fresh question?"},
                                             {"prompt": humaneval, "format": "code"}])
    prompts, stats = load_prompts(PromptSourceConfig(name="p", kind="jsonl", path=str(path)), PromptEncoder(tok, 512), reserved)
    assert [p.prompt_text.split("\n")[1] for p in prompts] == ["A fresh question?<|im_end|>"]
    assert stats.skipped["reserved_for_eval"] == 2


def test_magpie_asks_in_chunks_with_the_same_indices_and_seeds_as_one_call(tmp_path, tok, tiny_target_dir):
    """The driver holds one chunk of the target's answers at a time; the user turns kept do not depend on the chunk."""
    from fastdraft.generation import prompts as P
    from fastdraft.generation.backends import TransformersBackend

    target, calls = TransformersBackend(tiny_target_dir), []

    def ask(requests):  # the real (tiny) target: each row samples from its own seed, whatever its batch
        calls.append(len(requests))
        return target.generate(requests)

    source = PromptSourceConfig(name="m", kind="magpie", limit=5)
    one = P.magpie_queries(source, PromptEncoder(tok, 256), ask, tmp_path / "one.json", seed=3)
    calls.clear()
    chunked = P.magpie_queries(source, PromptEncoder(tok, 256), ask, tmp_path / "chunked.json", seed=3, chunk=2)
    assert max(calls) == 2 and chunked == one  # same kept texts, indices, seeds and skip counts
    assert one["kept"] and sum(one["skipped"].values()) > 0  # both kinds of outcome occur
    stats = P.SourceStats()
    encoded = list(P.iter_magpie_prompts(source, PromptEncoder(tok, 256), chunked, stats))
    assert len(encoded) == stats.prompts == len(chunked["kept"]) and stats.skipped["duplicate"] == chunked["skipped"].get("duplicate", 0)
