"""Document sources: each `SourceConfig.kind` is planned into *shards* and read shard by shard.

A shard is a small JSON-able dict (a group of files, a range of Parquet row groups, one shard of a
Hugging Face dataset) so that Ray can hand shards to actors, and a finished shard can be recorded
for resume. Reading a shard streams `Doc`s: the document id (stable across runs and machines: it
decides the validation split), its text, or the reason it was skipped (empty, binary, non_utf8,
invalid_json, not_text). Problems that make a whole source unusable (no files, a missing text
field) raise a `FastdraftError` naming the source, the file and the field, before anything is written.

    shards = plan_shards(source_config)          # validates the source; cheap (metadata only)
    for doc in read_shard(shards[0]): ...        # streams; never holds more than one batch
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from fastdraft.config import SourceConfig
from fastdraft.errors import FastdraftError

SHARD_BYTES = 2 << 20
"""Files of a directory source are grouped into shards of about this many bytes (one tail lost per shard)."""
PARQUET_SHARD_ROWS = 100_000
"""Row groups of Parquet files are grouped into shards of about this many rows."""
HF_SHARD_ROWS = 50_000
READ_BATCH = 1024


class Doc(NamedTuple):
    id: str
    text: str | None
    skip: str | None = None


# --------------------------------------------------------------------------------------------
# Checking one document
# --------------------------------------------------------------------------------------------
def classify_text(value) -> str | None:
    """Why a text field's value cannot be a document (None if it can)."""
    if value is None:
        return "empty"
    if not isinstance(value, str):
        return "not_text"
    if not value.strip():
        return "empty"
    if "\x00" in value:
        return "binary"
    return None


def decode_file(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) for a UTF-8 text file, else (None, reason): binary (NUL bytes), non_utf8, empty."""
    if b"\x00" in data[:8192]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    return (None, "empty") if not text.strip() else (text, None)


def _doc(doc_id: str, value) -> Doc:
    reason = classify_text(value)
    return Doc(doc_id, None if reason else value, reason)


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------
def _glob_base(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard (document ids are relative to it)."""
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return Path(*parts[:i]) if i else Path(".")
    return Path(pattern).parent


def expand_paths(src: SourceConfig, suffixes: tuple[str, ...]) -> tuple[Path, list[Path]]:
    """(base directory, sorted files) of a file, a directory (files ending in `suffixes`) or a glob."""
    path = Path(os.path.expanduser(src.path))
    if any(c in src.path for c in "*?["):
        base, files = _glob_base(str(path)), [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_dir():
        base, files = path, [p for p in path.rglob("*") if p.name.endswith(suffixes)]
    else:
        base, files = path.parent, [path] if path.exists() else []
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise FastdraftError(f"source '{src.name}' ({src.kind}): no files match path '{src.path}' (looked for {', '.join(suffixes)})")
    return base, files


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _group_files(files: list[Path]) -> list[list[str]]:
    """Consecutive files grouped to about SHARD_BYTES each (deterministic: files are sorted)."""
    groups, current, size = [], [], 0
    for f in files:
        current.append(str(f))
        size += f.stat().st_size
        if size >= SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
    return groups + ([current] if current else [])


# --------------------------------------------------------------------------------------------
# Planning: source -> shards (validates the source)
# --------------------------------------------------------------------------------------------
def plan_shards(src: SourceConfig) -> list[dict]:
    """The shards of one source, in reading order; raises FastdraftError if the source is unusable."""
    planners = {"files": _plan_files, "text_files": _plan_files, "stdlib_code": _plan_files, "stdlib_prose": _plan_prose,
                "jsonl": _plan_jsonl, "parquet": _plan_parquet, "hf": _plan_hf}
    shards = planners[src.kind](src)
    for i, shard in enumerate(shards):
        shard.update(source=src.name, kind=src.kind, text_field=src.text_field, index=i, id=f"{src.name}/{i:05d}")
    return shards


def _plan_files(src: SourceConfig) -> list[dict]:
    if src.kind == "stdlib_code":
        from fastdraft.assets import iter_stdlib_code_files, stdlib_root

        base, files = stdlib_root(), list(iter_stdlib_code_files())
    else:
        suffixes = tuple(src.extensions) if src.kind == "files" else ("",)
        base, files = expand_paths(src, suffixes)
        files = [f for f in files if not any(part.startswith(".") for part in Path(_rel(f, base)).parts)]  # .git etc.
    return [{"files": group, "base": str(base)} for group in _group_files(files)]


def _plan_prose(src: SourceConfig) -> list[dict]:
    return [{}]  # one generator over the stdlib's docstrings and pydoc topics (~0.6M tokens)


def _open_lines(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _plan_jsonl(src: SourceConfig) -> list[dict]:
    base, files = expand_paths(src, (".jsonl", ".jsonl.gz", ".json"))
    for f in files:  # a missing field stops here, before anything is written
        with _open_lines(f) as fh:
            first = next((line for line in fh if line.strip()), None)
        if first is None:
            continue
        try:
            record = json.loads(first)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FastdraftError(f"source '{src.name}': {f} line 1 is not JSON ({exc})") from None
        _check_field(src, record if isinstance(record, dict) else {}, f)
    return [{"file": str(f), "base": str(base)} for f in files]


def _check_field(src: SourceConfig, columns, where) -> None:
    if src.text_field not in columns:
        shown = ", ".join(map(str, list(columns)[:12])) or "none"
        raise FastdraftError(
            f"source '{src.name}': {where} has no field '{src.text_field}' (text_field); fields found: {shown}"
        )


def _plan_parquet(src: SourceConfig) -> list[dict]:
    import pyarrow.parquet as pq

    base, files = expand_paths(src, (".parquet",))
    shards = []
    for f in files:
        meta = pq.ParquetFile(f).metadata
        _check_field(src, meta.schema.to_arrow_schema().names, f)
        start, rows = 0, 0
        for rg in range(meta.num_row_groups):
            rows += meta.row_group(rg).num_rows
            if rows >= PARQUET_SHARD_ROWS or rg == meta.num_row_groups - 1:
                shards.append({"file": str(f), "base": str(base), "row_groups": [start, rg + 1]})
                start, rows = rg + 1, 0
    return shards


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_hf(src: SourceConfig):
    """A `datasets` Dataset (a `save_to_disk` dir: memory-mapped) or IterableDataset (streaming), offline by default."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the hub only when the user asks for it (HF_DATASETS_OFFLINE=0)
    import datasets

    path = Path(os.path.expanduser(src.path))
    try:
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise FastdraftError(f"source '{src.name}': {path} has no split '{src.split}' (splits: {', '.join(ds)})")
                ds = ds[src.split]
            return ds
        return datasets.load_dataset(str(src.path), src.hf_config, split=src.split, streaming=True)
    except FastdraftError:
        raise
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, ValueError, ConnectionError ...)
        raise FastdraftError(f"source '{src.name}' (hf): cannot open '{src.path}' (config {src.hf_config}, split {src.split}) "
                             f"offline: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _plan_hf(src: SourceConfig) -> list[dict]:
    import datasets

    ds = open_hf(src)
    if isinstance(ds, datasets.Dataset):
        _check_field(src, ds.column_names, src.path)
        n = max(1, min(256, -(-len(ds) // HF_SHARD_ROWS)))
    else:
        columns = ds.column_names or list(next(iter(ds), {}).keys())
        _check_field(src, columns, src.path)
        n = max(1, ds.num_shards)
    return [{"hf_shard": [i, n]} for i in range(n)]


# --------------------------------------------------------------------------------------------
# Reading a shard
# --------------------------------------------------------------------------------------------
def read_shard(shard: dict, src: SourceConfig | None = None) -> Iterator[Doc]:
    """Stream the documents of one planned shard."""
    kind = shard["kind"]
    if kind in ("files", "text_files", "stdlib_code"):
        yield from _read_files(shard)
    elif kind == "stdlib_prose":
        from fastdraft.assets import iter_stdlib_prose

        for i, text in enumerate(iter_stdlib_prose()):
            yield _doc(f"stdlib_prose#{i}", text)
    elif kind == "jsonl":
        yield from _read_jsonl(shard)
    elif kind == "parquet":
        yield from _read_parquet(shard)
    elif kind == "hf":
        yield from _read_hf(shard, src)
    else:
        raise FastdraftError(f"unknown source kind '{kind}'")


def _read_files(shard: dict) -> Iterator[Doc]:
    base = Path(shard["base"])
    for name in shard["files"]:
        path = Path(name)
        text, reason = decode_file(path.read_bytes())
        yield Doc(_rel(path, base), text, reason)


def _read_jsonl(shard: dict) -> Iterator[Doc]:
    path, field = Path(shard["file"]), shard["text_field"]
    rel = _rel(path, Path(shard["base"]))
    with _open_lines(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            doc_id = f"{rel}#{lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield Doc(doc_id, None, "non_utf8")
                continue
            except ValueError:
                yield Doc(doc_id, None, "invalid_json")
                continue
            if not isinstance(record, dict) or field not in record:
                raise FastdraftError(f"source '{shard['source']}': {path} line {lineno} has no field '{field}' (text_field)")
            yield _doc(doc_id, record[field])


def _read_parquet(shard: dict) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    path, field = Path(shard["file"]), shard["text_field"]
    rel, (first, last) = _rel(path, Path(shard["base"])), shard["row_groups"]
    pf = pq.ParquetFile(path)
    row = sum(pf.metadata.row_group(rg).num_rows for rg in range(first))
    for batch in pf.iter_batches(batch_size=READ_BATCH, row_groups=list(range(first, last)), columns=[field]):
        for value in batch.column(0).to_pylist():
            yield _doc(f"{rel}#{row}", value)
            row += 1


def _read_hf(shard: dict, src: SourceConfig | None) -> Iterator[Doc]:
    import datasets

    if src is None:
        raise FastdraftError("reading an hf shard needs its SourceConfig")
    index, n = shard["hf_shard"]
    ds = open_hf(src).shard(num_shards=n, index=index, contiguous=True)
    field = src.text_field
    has_id = "id" in (ds.column_names or [])
    if isinstance(ds, datasets.Dataset):
        columns = [field, "id"] if has_id else [field]
        ds = ds.select_columns(columns).to_iterable_dataset()
    for i, record in enumerate(ds):
        if field not in record:
            raise FastdraftError(f"source '{src.name}': {src.path} shard {index}/{n} row {i} has no field '{field}' (text_field)")
        doc_id = f"{src.name}:{record['id']}" if has_id else f"{src.name}:{index}/{n}#{i}"
        yield _doc(doc_id, record[field])
