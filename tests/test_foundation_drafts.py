"""The draft factory, checkpoint I/O and the CLI's handling of bad input."""

import shutil

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from fastdraft.checkpoint import check_safetensors, load_model, read_metadata
from fastdraft.cli import main
from fastdraft.errors import FastdraftError
from fastdraft.models import count_params, make_draft
from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

COMMON = dict(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON, rope_theta=500000.0),
    "mistral": lambda: MistralConfig(**COMMON, rope_theta=1e6, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, rope_theta=1e6),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=64, rope_theta=1e6),
    "phi3": lambda: Phi3Config(**{**COMMON, "num_key_value_heads": 8}, rope_theta=10000.0),
}


def _target_of_family(family, tiny_tokenizer_dir, root):
    """A target directory (config + tokenizer files) of the given family; make-draft needs no weights."""
    out = root / family
    shutil.copytree(tiny_tokenizer_dir, out)
    FAMILIES[family]().save_pretrained(out)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_draft_factory_scales_each_family_down_within_budget(family, tiny_tokenizer_dir, tmp_path):
    target = _target_of_family(family, tiny_tokenizer_dir, tmp_path)
    budget = 3_000_000
    out, summary = make_draft(target, tmp_path / "draft", params=budget)
    tcfg, dcfg = AutoConfig.from_pretrained(target), AutoConfig.from_pretrained(out)
    assert dcfg.model_type == tcfg.model_type
    assert dcfg.vocab_size == tcfg.vocab_size
    assert dcfg.num_hidden_layers < tcfg.num_hidden_layers
    assert dcfg.hidden_size <= tcfg.hidden_size
    assert getattr(dcfg, "rope_parameters", None) == getattr(tcfg, "rope_parameters", None)
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # noqa: E731
    assert head_dim(dcfg) == head_dim(tcfg)
    total, _ = count_params(dcfg)
    assert abs(total - budget) / budget <= 0.10, summary
    model = load_model(out)
    assert abs(sum(p.numel() for p in model.parameters()) - total) / total < 0.01
    assert f"{total / 1e6:.1f}M parameters" in summary
    # the tokenizer is the target's, byte for byte; metadata records it
    assert (out / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()
    assert read_metadata(out).tokenizer_fingerprint == tokenizer_fingerprint(load_tokenizer(target))


def test_layers_and_hidden_override_the_budget(tiny_target_dir, tmp_path):
    out, _ = make_draft(tiny_target_dir, tmp_path / "d", layers=3, hidden=64)
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (3, 64)
    target_cfg = AutoConfig.from_pretrained(tiny_target_dir)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        target_cfg.bos_token_id, target_cfg.eos_token_id, target_cfg.pad_token_id)


def test_large_vocabulary_share_is_called_out(tiny_tokenizer_dir, tmp_path):
    target = tmp_path / "bigvocab"
    shutil.copytree(tiny_tokenizer_dir, target)
    LlamaConfig(**{**COMMON, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32}).save_pretrained(target)
    from fastdraft.models import choose_shape, draft_config

    shape = choose_shape(AutoConfig.from_pretrained(target), 150_000_000, None, None)
    total, emb = count_params(draft_config(AutoConfig.from_pretrained(target), shape))
    assert abs(total - 150e6) / 150e6 <= 0.1 and emb / total > 0.5


def test_round_trip_keeps_weights_and_metadata(tiny_draft_dir):
    model = load_model(tiny_draft_dir)
    again = load_model(tiny_draft_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    meta = read_metadata(tiny_draft_dir)
    assert meta.extra["init"] == "random" and meta.stages == []


def test_pickled_weights_are_refused(tiny_target_dir, copy_dir):
    pickled = copy_dir(tiny_target_dir, "pickled")
    model = load_model(pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the legacy pickled format
    with pytest.raises(FastdraftError, match="pickled weights .* can run arbitrary code"):
        check_safetensors(pickled)
    with pytest.raises(FastdraftError, match="pickled weights"):
        load_model(pickled)


def test_bad_input_to_make_draft_writes_nothing(tiny_target_dir, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["make-draft", "--target", str(tmp_path / "missing"), "--params", "1M", "--out", str(out)]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert main(["make-draft", "--target", str(tiny_target_dir), "--params", "10", "--out", str(out)]) == 2
    assert "too small for even one layer" in capsys.readouterr().err
    assert main(["make-draft", "--target", str(tiny_target_dir), "--params", "lots", "--out", str(out)]) == 2
    assert "--params" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_tokenizer_dir, gpt2)
    AutoConfig.for_model("gpt2", vocab_size=512).save_pretrained(gpt2)
    assert main(["make-draft", "--target", str(gpt2), "--params", "1M", "--out", str(out)]) == 2
    assert "model type 'gpt2' is not supported" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_make_draft_cli_prints_count_and_embedding_share(tiny_target_dir, tmp_path, capsys):
    assert main(["make-draft", "--target", str(tiny_target_dir), "--params", "300k", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "embeddings+head" in out and "saved to" in out


def test_an_unbuilt_stage_exits_with_one_line(monkeypatch, capsys):
    import fastdraft.cli as cli

    monkeypatch.setitem(cli.STAGES, "prepare", "fastdraft.not_a_module:run_prepare")
    assert main(["prepare", "jobs/recipes/demo.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastdraft prepare: error: stage 'prepare' is not built yet (fastdraft.not_a_module does not exist)"]


def test_cli_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ["demo", "run", "prepare", "pretrain", "generate", "distill", "evaluate", "serve", "make-draft",
                    "check-pair"]:
        assert command in out
