"""What vLLM's draft-model speculation needs of a fastdraft draft (the GPU app: apps/vllm_app.py).

vLLM (0.33, `speculative_config={"method": "draft_model"}`) loads the draft directory as a plain transformers
checkpoint and refuses a draft whose vocabulary size differs from the target's. fastdraft's drafts keep the
target's vocabulary by construction, but one with an output layer over part of it (`draft.head_tokens`,
`fastdraft.models.SubsetHead`) stores the full embedding table and lists the subset in `fastdraft.json`, which
vLLM does not read: it would score every token with rows the draft never trained. Such a draft is served through
its Hugging Face export (`fastdraft export DRAFT --format hf --out DIR`), whose rows outside the subset never win.
"""

from __future__ import annotations

from pathlib import Path

from fastdraft.errors import FastdraftError


def check_draft_for_vllm(target: str, draft: str) -> None:
    """Refuse, before any GPU is asked for, a draft that vLLM would reject or run wrongly."""
    from fastdraft.checkpoint import load_config, read_metadata
    from fastdraft.models import HEAD_TOKENS_KEY

    t_vocab, d_vocab = load_config(target).vocab_size, load_config(draft).vocab_size
    if t_vocab != d_vocab:
        raise FastdraftError(f"vLLM needs the draft's vocabulary size to equal the target's: draft {draft} has "
                             f"{d_vocab:,}, target {target} has {t_vocab:,}")
    meta = read_metadata(draft) if (Path(draft) / "fastdraft.json").is_file() else None
    subset = (meta.extra.get(HEAD_TOKENS_KEY) if meta is not None else None) or []
    if subset:
        raise FastdraftError(
            f"draft {draft} has an output layer over {len(subset):,} of {d_vocab:,} tokens (draft.head_tokens); vLLM "
            f"would score the others with untrained rows. Export it first and serve the export: "
            f"fastdraft export {draft} --format hf --out {Path(draft).name}-hf")
