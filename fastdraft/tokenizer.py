"""The tokenizer contract: a draft must speak its target's exact vocabulary.

`tokenizer_fingerprint` is a stable hash of everything that decides which ids a text becomes and how
a chat is rendered: the vocabulary, the BPE merges, the special tokens and the chat template. Every
artifact records it; every stage that pairs two artifacts calls `check_compatible`, which raises a
`TokenizerMismatchError` with a specific report (vocabulary size, how many tokens differ with examples,
special tokens, chat template).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fastdraft.errors import FastdraftError, TokenizerMismatchError


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (never from the hub).

    `embedded:<name>` resolves to the embedded default target's cached directory.
    """
    from fastdraft.assets import resolve_model_path

    path = resolve_model_path(str(path))
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FastdraftError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None


def _merges(tok: PreTrainedTokenizerBase) -> list:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return []
    model = json.loads(backend.to_str()).get("model", {})
    # Merges are stored either as "a b" strings or as [a, b] pairs depending on the tokenizers version.
    return [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]


def special_tokens(tok: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """Name -> id of the special tokens that decoding depends on (bos, eos, pad, unk)."""
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tok, name, None)
        out[name] = None if token is None else tok.convert_tokens_to_ids(token)
    return out


def tokenizer_summary(tok: PreTrainedTokenizerBase) -> dict:
    """The parts of a tokenizer that the fingerprint covers, as plain data."""
    added = sorted((t.content, i) for i, t in tok.added_tokens_decoder.items())
    return {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "merges": _merges(tok),
        "special_tokens": special_tokens(tok),
        "added_tokens": added,
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template),
    }


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A stable hex digest of vocabulary, merges, special tokens and chat template."""
    blob = json.dumps(tokenizer_summary(tok), sort_keys=True, ensure_ascii=False).encode()
    return "tok-" + hashlib.sha256(blob).hexdigest()[:24]


@dataclass
class CompatibilityReport:
    """What differs between two tokenizers; `ok` when nothing does."""

    left: str
    right: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"tokenizers are compatible: {self.left} and {self.right}"
        lines = [f"tokenizers differ between {self.left} and {self.right}:"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])


def compare_tokenizers(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, left: str = "target", right: str = "draft", examples: int = 5
) -> CompatibilityReport:
    """Compare two tokenizers part by part and say specifically what differs."""
    report = CompatibilityReport(left, right)
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        report.problems.append(f"vocabulary size: {left} has {len(va)} tokens, {right} has {len(vb)}")
    ia = {i: t for t, i in va.items()}
    ib = {i: t for t, i in vb.items()}
    differing = [i for i in sorted(set(ia) | set(ib)) if ia.get(i) != ib.get(i)]
    if differing:
        shown = ", ".join(f"id {i}: {ia.get(i)!r} vs {ib.get(i)!r}" for i in differing[:examples])
        report.problems.append(f"{len(differing)} token ids map to different tokens (e.g. {shown})")
    if _merges(a) != _merges(b):
        report.problems.append("BPE merges differ (the same text would tokenize differently)")
    sa, sb = special_tokens(a), special_tokens(b)
    for name in sa:
        if sa[name] != sb[name]:
            report.problems.append(
                f"special token {name}: {left} {getattr(a, name, None)!r} (id {sa[name]}) vs "
                f"{right} {getattr(b, name, None)!r} (id {sb[name]})"
            )
    if a.chat_template != b.chat_template:
        which = "missing on one side" if (a.chat_template is None) != (b.chat_template is None) else "differs"
        report.problems.append(f"chat template {which}")
    if not report.problems and tokenizer_fingerprint(a) != tokenizer_fingerprint(b):
        report.problems.append("added tokens differ")
    return report


def check_compatible(
    a: PreTrainedTokenizerBase | str | Path, b: PreTrainedTokenizerBase | str | Path, left: str = "target", right: str = "draft"
) -> CompatibilityReport:
    """Raise `TokenizerMismatchError` with the full report unless `a` and `b` are compatible."""
    ta = a if isinstance(a, PreTrainedTokenizerBase) else load_tokenizer(a)
    tb = b if isinstance(b, PreTrainedTokenizerBase) else load_tokenizer(b)
    report = compare_tokenizers(ta, tb, left, right)
    if not report.ok:
        raise TokenizerMismatchError(str(report))
    return report


def check_fingerprints(expected: str, found: str, expected_from: str, found_from: str) -> None:
    """Refuse to pair two artifacts whose recorded tokenizer fingerprints differ."""
    if expected != found:
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {expected_from} has fingerprint {expected} but {found_from} has {found}; "
            f"they were made with different tokenizers (run `fastdraft check-pair` for details)"
        )
