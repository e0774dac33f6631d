"""Fixtures for the training tests: packed shards and alignment sets written directly with pyarrow
(the prepare and generate stages are not used, so these tests depend only on the contracts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SEQ_LEN = 32  # rows of the pretraining tests' shards


def write_shards(corpus_dir: Path, tokenizer_dir: Path, seq_len: int, train_rows: int, val_rows: int,
                 fingerprint: str | None = None, files: int = 2, offset_docs: int = 0) -> dict:
    """Tokenize the standard library's prose with the tiny tokenizer, pack with EOS, write Parquet + manifest."""
    from fastdraft.assets import tiny_training_texts
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(tokenizer_dir)
    stream: list[int] = []
    for text in tiny_training_texts(2000)[offset_docs:]:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= (train_rows + val_rows) * seq_len:
            break
    assert len(stream) >= (train_rows + val_rows) * seq_len, "not enough text for the requested rows"
    rows = np.asarray(stream[: (train_rows + val_rows) * seq_len], dtype=np.int32).reshape(-1, seq_len)
    splits = {"train": rows[:train_rows], "validation": rows[train_rows:]}
    for split, data in splits.items():
        (corpus_dir / split).mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(np.array_split(data, files if split == "train" else 1)):
            col = pa.array(list(part), type=pa.list_(pa.int32()))
            pq.write_table(pa.table({"input_ids": col}), corpus_dir / split / f"part-{i:05d}.parquet")
    manifest = {
        "complete": True, "tokenizer_fingerprint": fingerprint or tokenizer_fingerprint(tok), "seq_len": seq_len,
        "target": str(tokenizer_dir),
        "splits": {s: {"sequences": len(d), "tokens": int(d.size), "files": files if s == "train" else 1} for s, d in splits.items()},
        "sources": {"stdlib_prose": {"documents": 0, "tokens": int(rows.size), "skipped": {}}},
        "recipe": {}, "section_hash": f"test-{seq_len}-{train_rows}-{offset_docs}",
    }
    (corpus_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def write_alignment(directory: Path, target_dir: Path, prompts: int, new_tokens: int, topk: int = 0,
                    fingerprint: str | None = None, prompt_len: int = 8, endings: list[int] | None = None) -> dict:
    """The target's greedy answers to stdlib prompts, in the alignment contract (one batched decode loop:
    `generate` per prompt is too slow on a shared 2-core machine). With `endings`, prompt p ends with
    endings[p % len(endings)], so held-out prompts share their last token with training prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastdraft.assets import tiny_training_texts
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in tiny_training_texts(2 * prompts + 50)]
    ids = torch.tensor([e[:prompt_len] for e in encoded if len(e) >= prompt_len][:prompts])
    if endings:
        ids[:, -1] = torch.tensor(endings).repeat(len(ids))[: len(ids)]
    seqs, logits = ids, []
    with torch.no_grad():
        for _ in range(new_tokens):
            step = model(input_ids=seqs).logits[:, -1].float()
            logits.append(step)
            seqs = torch.cat([seqs, step.argmax(-1, keepdim=True)], dim=1)
    logprobs = torch.log_softmax(torch.stack(logits, 1), -1)
    rows = []
    for p in range(len(ids)):
        response = seqs[p, prompt_len:].tolist()
        row = {"key": f"p{p}-t0-s0", "prompt_id": f"p{p}", "prompt_ids": ids[p].tolist(), "response_ids": response,
               "prompt_text": tok.decode(ids[p]), "response_text": tok.decode(response), "temperature": 0.0, "top_p": 1.0,
               "top_k": 0, "sample_index": 0, "source": "stdlib", "finish_reason": "length"}
        if topk:
            top = logprobs[p].topk(topk, -1)
            row["topk_ids"], row["topk_logprobs"] = top.indices.tolist(), top.values.tolist()
        rows.append(row)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "part-00000.parquet")
    manifest = {"complete": True, "target": str(target_dir), "tokenizer_fingerprint": fingerprint or tokenizer_fingerprint(tok),
                "settings": [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "n": 1}], "counts": {"rows": len(rows)},
                "section_hash": f"test-{prompts}-{new_tokens}-{topk}"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def recipe_for(run_dir, target_dir, init=None, **pretrain):
    """A pretrain recipe on the tiny target: one 3,000-token PT stage on 2 workers unless `pretrain` says otherwise."""
    from fastdraft.config import recipe_from_dict

    base = {"stages": [{"name": "PT", "corpus": "pt", "tokens": 3000}], "micro_batch_size": 4,
            "optim": {"lr": 3e-3, "warmup_steps": 2}, "compute": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1},
            "eval_every": 4, "eval_batches": 2, "ckpt_every": 4}
    base.update(pretrain)
    return recipe_from_dict({"name": "t", "workdir": str(run_dir), "target": {"model": str(target_dir)},
                             "draft": {"init": str(init)} if init else {"layers": 1, "hidden": 64}, "pretrain": base})
