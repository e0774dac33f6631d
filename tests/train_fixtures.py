"""Fixtures for the training tests: packed shards and alignment sets written directly with pyarrow
(the prepare and generate stages are not used, so these tests depend only on the contracts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


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
