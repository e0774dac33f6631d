"""The tokenizer contract: a stable fingerprint and a specific report of every difference."""

import json
import subprocess
import sys

import pytest

from fastdraft.errors import TokenizerMismatchError
from fastdraft.tokenizer import check_compatible, compare_tokenizers, load_tokenizer, tokenizer_fingerprint


def _fingerprint_in_subprocess(path) -> str:
    code = f"from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint as f; print(f(load_tokenizer({str(path)!r})))"
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_fingerprint_is_stable_across_save_load_and_processes(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    fp = tokenizer_fingerprint(tok)
    assert fp.startswith("tok-")
    tok.save_pretrained(tmp_path / "resaved")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "resaved")) == fp
    assert _fingerprint_in_subprocess(tiny_tokenizer_dir) == fp


def test_identical_tokenizers_are_compatible(tiny_tokenizer_dir, tiny_draft_dir):
    assert check_compatible(tiny_tokenizer_dir, tiny_draft_dir).ok


def _edit_tokenizer_json(directory, edit):
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_different_vocabulary_size_is_reported(tiny_tokenizer_dir, tmp_path):
    from fastdraft.assets import build_tiny_tokenizer

    other = tmp_path / "other"
    build_tiny_tokenizer(other, vocab_size=400)
    report = compare_tokenizers(load_tokenizer(tiny_tokenizer_dir), load_tokenizer(other))
    assert not report.ok
    assert any(p.startswith("vocabulary size: target has 512 tokens, draft has 400") for p in report.problems)


def test_one_changed_token_is_reported_with_its_id(tiny_tokenizer_dir, copy_dir):
    changed = copy_dir(tiny_tokenizer_dir, "changed")
    vocab = json.loads((changed / "tokenizer.json").read_text())["model"]["vocab"]
    victim, victim_id = max(vocab.items(), key=lambda kv: kv[1])  # the last merge's token: swap its string

    def edit(data):
        v = data["model"]["vocab"]
        v["zzzz_new"] = v.pop(victim)
        data["model"]["merges"] = [m for m in data["model"]["merges"]
                                   if "".join(m if isinstance(m, list) else m.split(" ")) != victim]

    _edit_tokenizer_json(changed, edit)
    with pytest.raises(TokenizerMismatchError) as err:
        check_compatible(tiny_tokenizer_dir, changed)
    message = str(err.value)
    assert f"1 token ids map to different tokens (e.g. id {victim_id}:" in message
    assert "zzzz_new" in message
    assert tokenizer_fingerprint(load_tokenizer(changed)) != tokenizer_fingerprint(load_tokenizer(tiny_tokenizer_dir))


def test_a_changed_special_token_is_reported(tiny_tokenizer_dir, copy_dir):
    changed = copy_dir(tiny_tokenizer_dir, "special")
    cfg_path = changed / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    original = cfg["eos_token"]
    cfg["eos_token"] = cfg["bos_token"]
    cfg_path.write_text(json.dumps(cfg))
    report = compare_tokenizers(load_tokenizer(tiny_tokenizer_dir), load_tokenizer(changed))
    assert any(p.startswith("special token eos_token:") and repr(original) in p for p in report.problems), report


def test_a_changed_chat_template_is_reported(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    other = load_tokenizer(tiny_tokenizer_dir)
    other.chat_template = (tok.chat_template or "") + "{# changed #}"
    other.save_pretrained(tmp_path / "templ")
    report = compare_tokenizers(tok, load_tokenizer(tmp_path / "templ"))
    assert report.problems == ["chat template differs"]
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(other)


def test_check_pair_cli_exit_codes(tiny_tokenizer_dir, tiny_draft_dir, tmp_path):
    from fastdraft.assets import build_tiny_tokenizer
    from fastdraft.cli import main

    assert main(["check-pair", str(tiny_tokenizer_dir), str(tiny_draft_dir)]) == 0
    build_tiny_tokenizer(tmp_path / "other", vocab_size=400)
    assert main(["check-pair", str(tiny_tokenizer_dir), str(tmp_path / "other")]) == 2
