"""The CLI works as a Ray job: `ray job submit --working-dir . -- python -m fastdraft.cli ...` on a real head."""

import pytest


@pytest.mark.timeout(400)
def test_check_pair_runs_as_a_ray_job(ray_job, tiny_tokenizer_dir, tiny_draft_dir, tmp_path):
    from fastdraft.assets import build_tiny_tokenizer

    code, out = ray_job("python", "-m", "fastdraft.cli", "check-pair", str(tiny_tokenizer_dir), str(tiny_draft_dir))
    assert code == 0, out
    assert "tokenizers are compatible" in out and "succeeded" in out
    build_tiny_tokenizer(tmp_path / "other", vocab_size=400)
    code, out = ray_job("python", "-m", "fastdraft.cli", "check-pair", str(tiny_tokenizer_dir), str(tmp_path / "other"))
    assert code != 0 and "vocabulary size: target has 512 tokens, draft has 400" in out
