"""Sources, the split, budgets and one shard's tokenize-and-pack, without Ray (the pure parts of prepare)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastdraft.config import CorpusConfig, PrepareConfig, SourceConfig
from fastdraft.data.packing import join_with_eos
from fastdraft.data.pipeline import Budgets, ShardTokenizer, in_validation, interleave, source_budgets, split_caps
from fastdraft.data.sources import plan_shards, read_shard
from fastdraft.errors import FastdraftError, RecipeError
from fastdraft.tokenizer import load_tokenizer


def write_jsonl(path: Path, records: list, raw_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def read_all(src: SourceConfig):
    return [doc for shard in plan_shards(src) for doc in read_shard(shard, src)]


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def test_code_directory_keeps_chosen_extensions_and_counts_binary_non_utf8_and_empty_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "b.rs").write_text("fn main() {}\n")
    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / "blob.py").write_bytes(b"\x7fELF\x00\x00\x01")
    (tmp_path / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.py").write_text("  \n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "hook.py").write_text("print('hidden')\n")
    docs = read_all(SourceConfig(name="code", kind="files", path=str(tmp_path), extensions=[".py", ".rs"]))
    assert {d.id: d.skip for d in docs} == {"b.rs": None, "blob.py": "binary", "empty.py": "empty", "latin1.py": "non_utf8", "pkg/a.py": None}
    assert next(d for d in docs if d.id == "pkg/a.py").text == "def f():\n    return 1\n"


def test_jsonl_glob_skips_empty_non_utf8_and_invalid_lines(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "first"}, {"body": ""}, {"body": None}],
                raw_lines=[b'{"body": "caf\xe9"}', b"{not json"])
    write_jsonl(tmp_path / "b.jsonl", [{"body": "second"}])
    docs = read_all(SourceConfig(name="j", kind="jsonl", path=str(tmp_path / "*.jsonl"), text_field="body"))
    assert [(d.id, d.text, d.skip) for d in docs] == [
        ("a.jsonl#1", "first", None), ("a.jsonl#2", None, "empty"), ("a.jsonl#3", None, "empty"),
        ("a.jsonl#4", None, "non_utf8"), ("a.jsonl#5", None, "invalid_json"), ("b.jsonl#1", "second", None)]


def test_a_missing_text_field_is_refused_naming_source_field_and_file(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"content": "x"}])
    with pytest.raises(FastdraftError, match=r"source 'j': .*bad\.jsonl has no field 'text'.*fields found: content"):
        plan_shards(SourceConfig(name="j", kind="jsonl", path=str(tmp_path)))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(FastdraftError, match=r"source 'p': .*p\.parquet has no field 'text'"):
        plan_shards(SourceConfig(name="p", kind="parquet", path=str(tmp_path / "*.parquet")))


def test_a_source_with_no_files_says_which_path(tmp_path):
    with pytest.raises(FastdraftError, match=r"source 'j' \(jsonl\): no files match path"):
        plan_shards(SourceConfig(name="j", kind="jsonl", path=str(tmp_path / "nothing" / "*.jsonl")))


def test_parquet_row_groups_are_read_in_order_with_stable_ids(tmp_path):
    texts = [f"row {i}" for i in range(25)]
    pq.write_table(pa.table({"content": texts, "n": list(range(25))}), tmp_path / "p.parquet", row_group_size=10)
    docs = read_all(SourceConfig(name="p", kind="parquet", path=str(tmp_path / "p.parquet"), text_field="content"))
    assert [d.text for d in docs] == texts
    assert docs[12].id == "p.parquet#12"


def test_hf_source_reads_a_save_to_disk_directory_offline(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["alpha", "", "gamma"], "id": ["a", "b", "c"]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = read_all(SourceConfig(name="web", kind="hf", path=str(tmp_path / "ds"), split="train"))
    assert [(d.id, d.text, d.skip) for d in docs] == [("web:a", "alpha", None), ("web:b", None, "empty"), ("web:c", "gamma", None)]
    with pytest.raises(FastdraftError, match="no split 'test'"):
        plan_shards(SourceConfig(name="web", kind="hf", path=str(tmp_path / "ds"), split="test"))


def test_stdlib_sources_plan_into_several_code_shards_and_one_prose_shard():
    code = plan_shards(SourceConfig(name="code", kind="stdlib_code"))
    assert len(code) > 2 and all(s["files"] for s in code)
    prose = SourceConfig(name="prose", kind="stdlib_prose")
    first = next(read_shard(plan_shards(prose)[0], prose))
    assert first.skip is None and len(first.text) >= 200


# --------------------------------------------------------------------------------------------
# Split, budgets, mixing order
# --------------------------------------------------------------------------------------------
def test_validation_split_is_a_deterministic_function_of_the_document_id():
    ids = [f"doc-{i}" for i in range(20_000)]
    picked = [i for i in ids if in_validation(i, 0.05)]
    assert picked == [i for i in ids if in_validation(i, 0.05)]
    assert 0.04 < len(picked) / len(ids) < 0.06
    assert not any(in_validation(i, 0.0) for i in ids[:100])


def test_budgets_share_the_corpus_total_by_weight_after_fixed_budgets():
    corpus = CorpusConfig(tokens="1M", sources=[
        SourceConfig(name="code", kind="stdlib_code", tokens="400k"),
        SourceConfig(name="web", kind="stdlib_prose", weight=2),
        SourceConfig(name="more", kind="stdlib_prose", weight=1)])
    assert source_budgets("cp", corpus) == {"code": 400_000, "web": 400_000, "more": 200_000}
    assert source_budgets("pt", CorpusConfig(sources=[SourceConfig(name="a", kind="stdlib_prose")])) == {"a": None}


def test_budget_recipe_mistakes_are_named():
    with pytest.raises(RecipeError, match=r"prepare.corpora.cp: sources \['a'\] have a 'weight' but the corpus has no 'tokens'"):
        source_budgets("cp", CorpusConfig(sources=[SourceConfig(name="a", kind="stdlib_prose", weight=1)]))
    with pytest.raises(RecipeError, match="must be unique"):
        source_budgets("cp", CorpusConfig(sources=[SourceConfig(name="a", kind="stdlib_prose")] * 2))


def test_a_budget_gives_validation_its_fraction_in_whole_rows_and_never_lets_a_split_pass_its_cap():
    caps = {"web": split_caps(1000, 0.1, 32), "all": split_caps(None, 0.1, 32)}
    assert caps["web"] == {"train": 904, "validation": 96}
    budgets = Budgets(caps, 32, {src: {"train": 0, "validation": 0} for src in caps})
    assert budgets.take("web", "train", 100) == 904 // 32 and budgets.take("web", "train", 1) == 0
    assert not budgets.full("web")
    assert budgets.take("web", "validation", 2) == 2 and budgets.take("web", "validation", 5) == 1
    assert budgets.full("web") and budgets.counts["web"] == {"train": 896, "validation": 96}
    assert budgets.take("all", "train", 10**6) == 10**6 and not budgets.full("all")


def test_interleave_spreads_each_source_over_the_whole_order():
    order = interleave({"a": [{"id": f"a{i}"} for i in range(4)], "b": [{"id": "b0"}, {"id": "b1"}]})
    assert [s["id"] for s in order] == ["a0", "b0", "a1", "a2", "b1", "a3"]


# --------------------------------------------------------------------------------------------
# One shard through the tokenizing actor's code (called directly, in this process)
# --------------------------------------------------------------------------------------------
def test_a_shard_packs_exactly_the_documents_of_each_split_in_order(tmp_path, tiny_tokenizer_dir):
    texts = [f"Document {i}: " + "the quick brown fox " * (i % 13) for i in range(200)] + ["word " * 3000]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts] + [{"text": "   "}])
    src = SourceConfig(name="j", kind="jsonl", path=str(tmp_path / "a.jsonl"))
    cfg = PrepareConfig(seq_len=32, validation_fraction=0.2, docs_per_batch=16)
    tok = load_tokenizer(tiny_tokenizer_dir)
    actor = ShardTokenizer(tok.backend_tokenizer.to_str(), tok.eos_token_id, cfg.model_dump(), {"j": src.model_dump()})
    out = pa.concat_tables(list(actor.process(plan_shards(src)[0])))
    stats = json.loads(out.filter(pa.compute.equal(out["split"], "done"))["stats"][0].as_py())
    assert stats["documents"] == len(texts) and stats["skipped"] == {"empty": 1}
    for split in ("train", "validation"):
        rows = out.filter(pa.compute.equal(out["split"], split))["input_ids"].to_pylist()
        assert rows and all(len(r) == 32 for r in rows)
        mine = [t for i, t in enumerate(texts) if in_validation(f"a.jsonl#{i + 1}", 0.2) == (split == "validation")]
        expected = join_with_eos([tok(t, add_special_tokens=False)["input_ids"] for t in mine], tok.eos_token_id)
        np.testing.assert_array_equal(np.concatenate(rows), expected[: len(rows) * 32])  # the tail (< 32) is dropped
        assert len(expected) - len(rows) * 32 < 32
    assert stats["dropped_tail_tokens"] == stats["tokens_read"] - len(out) * 32 + 32  # the done row has no ids


def test_text_files_take_every_visible_file_as_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README").write_text("second document")
    (tmp_path / ".cache").write_text("hidden")
    docs = read_all(SourceConfig(name="t", kind="text_files", path=str(tmp_path)))
    assert [(d.id, d.text) for d in docs] == [("a.txt", "first document"), ("sub/README", "second document")]


def test_hf_source_streams_a_local_directory_of_data_files_offline(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": f"row {i}"} for i in range(5)])
    src = SourceConfig(name="local", kind="hf", path=str(tmp_path / "data"), split="train")
    assert [d.text for d in read_all(src)] == [f"row {i}" for i in range(5)]
    with pytest.raises(FastdraftError, match=r"source 'missing' \(hf\): cannot open"):
        plan_shards(SourceConfig(name="missing", kind="hf", path="no-such-org/no-such-dataset"))
