"""Evaluation prompt sets load offline, deterministically, with the requested counts and clear errors."""

import json

import pytest

from fastdraft.config import EvalTaskConfig
from fastdraft.errors import FastdraftError
from fastdraft.evaluation.tasks import INSTRUCTIONS_FILE, load_task, read_jsonl
from fastdraft.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def task(kind, n=5, **kw):
    return EvalTaskConfig(name=kw.pop("name", kind), kind=kind, prompts=n, **kw)


@pytest.mark.parametrize("kind,n,domain,chat", [("humaneval", 7, "code", False), ("instructions", 9, "text", True),
                                                ("stdlib_prose", 4, "text", False)])
def test_builtin_tasks_load_offline_with_the_requested_count(tok, kind, n, domain, chat):
    t = load_task(task(kind, n), tok)
    assert len(t.prompts) == n and t.domain == domain and t.chat is chat
    assert len({p.id for p in t.prompts}) == n
    for p in t.prompts:
        assert p.ids and p.ids == tok(p.text, add_special_tokens=not chat)["input_ids"]


def test_humaneval_prompts_are_the_packages_function_stubs(tok):
    t = load_task(task("humaneval", 3), tok)
    assert all(p.id.startswith("HumanEval/") and "def " in p.text for p in t.prompts)


def test_instruction_prompts_use_the_chat_template(tok):
    t = load_task(task("instructions", 2), tok)
    for p in t.prompts:
        assert p.text.startswith("<|im_start|>user\n") and p.text.endswith("<|im_start|>assistant\n")


def test_prose_prompts_are_short_document_openings(tok):
    t = load_task(task("stdlib_prose", 3), tok)
    assert all(40 <= len(p.ids) <= 80 for p in t.prompts)


def test_the_instruction_set_is_64_distinct_hand_written_prompts():
    records = read_jsonl(INSTRUCTIONS_FILE)
    texts = [r["prompt"] for _, r in records]
    assert len(records) >= 64 and len(set(texts)) == len(texts)
    assert len({r["category"] for _, r in records}) >= 8  # diverse: writing, qa, coding, math, ...


def test_same_seed_same_prompts_other_seed_other_prompts(tok):
    a = [p.id for p in load_task(task("humaneval", 8), tok, seed=0).prompts]
    assert a == [p.id for p in load_task(task("humaneval", 8), tok, seed=0).prompts]
    assert a != [p.id for p in load_task(task("humaneval", 8), tok, seed=1).prompts]


def test_jsonl_with_template_and_messages(tok, tmp_path):
    path = tmp_path / "news.jsonl"
    rows = [{"id": f"n{i}", "article": f"Story number {i}. " * 200, "highlights": "x"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = task("jsonl", 4, name="news", path=str(path), template="Summarize the article below.\n\n{article}",
               max_prompt_tokens=32)
    t = load_task(cfg, tok)
    assert len(t.prompts) == 4 and not t.chat
    assert all(p.text.startswith("Summarize the article below.") and len(p.ids) < 60 for p in t.prompts)  # cut to 32

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    t = load_task(task("jsonl", 1, path=str(chats)), tok)
    assert t.chat and t.prompts[0].text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_dataset_saved_to_disk(tok, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"instruction": [f"Name {i} colours." for i in range(5)]}).save_to_disk(tmp_path / "dolly")
    t = load_task(task("hf", 3, path=str(tmp_path / "dolly"), text_field="instruction", chat=True), tok)
    assert len(t.prompts) == 3 and all("colours" in p.text for p in t.prompts)


def test_bad_input_gets_specific_errors(tok, tmp_path):
    with pytest.raises(FastdraftError, match="humaneval has 164 prompts, but the task asks for 500"):
        load_task(task("humaneval", 500), tok)
    with pytest.raises(FastdraftError, match="prompt file not found"):
        load_task(task("jsonl", 1, path=str(tmp_path / "missing.jsonl")), tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(FastdraftError, match=r"bad.jsonl:2: not valid JSON"):
        load_task(task("jsonl", 1, path=str(bad)), tok)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"question": "why?"}\n')
    with pytest.raises(FastdraftError, match="has no field 'prompt' \\(fields: question\\)"):
        load_task(task("jsonl", 1, path=str(nofield)), tok)
    with pytest.raises(FastdraftError, match="needs a 'path'"):
        load_task(task("jsonl", 1), tok)


def test_prose_with_a_template_is_an_offline_summarization_task(tok):
    cfg = task("stdlib_prose", 2, name="summarize", chat=True, max_prompt_tokens=200,
               template="Summarize the text below in two sentences.\n\n{prompt}")
    t = load_task(cfg, tok)
    assert t.chat and all("<|im_start|>user\nSummarize the text below" in p.text for p in t.prompts)
    assert max(len(p.ids) for p in t.prompts) > 100  # whole documents (up to 200 tokens), not 64-token openings


def test_no_recipe_trains_on_the_evaluation_instructions():
    from pathlib import Path

    from fastdraft.config import load_recipe

    for path in sorted(Path(INSTRUCTIONS_FILE).parents[1].glob("recipes/*.yaml")):
        recipe = load_recipe(path)
        used = [s.path for s in (recipe.generate.prompts if recipe.generate else []) if s.path]
        used += [s.path for c in (recipe.prepare.corpora.values() if recipe.prepare else []) for s in c.sources if s.path]
        assert not any("eval_instructions" in p for p in used), f"{path} trains on the evaluation prompts"
