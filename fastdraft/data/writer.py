"""The corpus directory: Parquet shards written as they arrive, a manifest, skip / resume / refuse.

    <run_dir>/data/<corpus>/
      train/part-<source>-<shard>-<k>.parquet        one column input_ids: list<int32>, exactly seq_len each
      validation/part-...parquet
      manifest.json                                  {"complete": false, ...} while running, then the summary

Each input shard's rows are written by the Ray Data actor that tokenizes it (`ShardOutput`), to
`*.parquet.partial` files renamed when the shard is finished; the driver (`CorpusWriter`) only records each
finished shard in the manifest, so no token passes through it. A re-run with the same recipe and tokenizer
deletes every file of a shard the manifest does not record (partial, or published just before an interruption)
and reads only those shards again.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fastdraft.errors import FastdraftError

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
ROWS_PER_FILE = 65_536
SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise FastdraftError(f"{path} is not valid JSON ({exc}); delete {root} to prepare this corpus again") from None


def existing_state(root: Path, fingerprint: str, section_hash: str) -> str:
    """'fresh', 'resume' or 'done' for an output directory; refuses one made by another recipe or tokenizer."""
    from fastdraft.tokenizer import check_fingerprints  # transformers: driver only, Ray workers skip the import

    if not root.exists() or not any(root.iterdir()):
        return "fresh"
    manifest = read_manifest(root)
    if manifest is None:
        raise FastdraftError(f"{root} exists and is not empty but has no {MANIFEST}: it was not written by "
                             f"`fastdraft prepare`; move it away or choose another workdir")
    check_fingerprints(fingerprint, manifest.get("tokenizer_fingerprint", "<none>"), "the recipe's target", str(root / MANIFEST))
    if manifest.get("section_hash") != section_hash:
        state = "finished" if manifest.get("complete") else "partial"
        raise FastdraftError(
            f"{root} holds a {state} corpus prepared with other settings (section_hash {manifest.get('section_hash')}, "
            f"this recipe: {section_hash}); refusing to mix two runs. Delete {root} or change the recipe's workdir"
        )
    return "done" if manifest.get("complete") else "resume"


def part_name(shard_id: str, k: int) -> str:
    return "part-" + re.sub(r"[^A-Za-z0-9_.]+", "-", shard_id) + f"-{k:03d}.parquet"


def rows_to_arrow(rows) -> pa.Array:
    """A (n, seq_len) int32 array as a list<int32> column (readable by plain pyarrow / datasets)."""
    n, seq_len = rows.shape
    offsets = pa.array(range(0, (n + 1) * seq_len, seq_len), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=pa.int32()))


class ShardOutput:
    """The files of one input shard while it is being read (in the actor that reads it): written as rows arrive,
    published (renamed) at the end."""

    def __init__(self, root: Path, shard_id: str):
        self.root, self.shard_id = root, shard_id
        self.open: dict[str, tuple[pq.ParquetWriter, Path, int]] = {}
        self.files: dict[str, list[Path]] = {s: [] for s in SPLITS}
        self.sequences = {s: 0 for s in SPLITS}

    def write(self, split: str, column: pa.Array) -> None:
        if len(column) == 0:
            return
        writer, path, rows = self.open.get(split) or self._new_file(split)
        writer.write_table(pa.table({"input_ids": column}, schema=SCHEMA))
        rows += len(column)
        self.open[split] = (writer, path, rows)
        self.sequences[split] += len(column)
        if rows >= ROWS_PER_FILE:
            writer.close()
            del self.open[split]

    def _new_file(self, split: str):
        path = self.root / split / (part_name(self.shard_id, len(self.files[split])) + ".partial")
        self.files[split].append(path)
        return pq.ParquetWriter(path, SCHEMA), path, 0

    def publish(self) -> dict[str, int]:
        """Close and rename every file (`*.partial` -> final); sequences written per split."""
        for writer, _, _ in self.open.values():
            writer.close()
        self.open.clear()
        for paths in self.files.values():
            for p in paths:
                p.replace(p.with_name(p.name.removesuffix(".partial")))
        return dict(self.sequences)


class CorpusWriter:
    """Owns `<run_dir>/data/<corpus>` on the driver: the manifest, where finished shards are recorded."""

    def __init__(self, root: Path, header: dict, resume: bool):
        self.root = root
        if resume:
            self.manifest = read_manifest(root)
            recorded = {part_name(sid, k) for sid, rec in self.done_shards.items()
                        for split in SPLITS for k in range(rec["files"][split])}
            for split in SPLITS:  # files of shards an interruption cut short, or published but never recorded
                for stale in (root / split).glob("part-*"):
                    if stale.name not in recorded:
                        stale.unlink()
        else:
            if root.exists():
                shutil.rmtree(root)
            self.manifest = {**header, "complete": False, "shards": {}}
        for split in SPLITS:
            (root / split).mkdir(parents=True, exist_ok=True)
        self.save()

    @property
    def done_shards(self) -> dict[str, dict]:
        return self.manifest["shards"]

    def record_shard(self, shard_id: str, record: dict) -> dict:
        """Record a shard its actor has written and published (its counts, sequences and files per split)."""
        self.done_shards[shard_id] = record
        self.save()
        return record

    def save(self) -> None:
        write_json_atomic(self.root / MANIFEST, self.manifest)

    def complete(self, summary: dict) -> dict:
        self.manifest.update(summary, complete=True)
        self.save()
        return self.manifest
