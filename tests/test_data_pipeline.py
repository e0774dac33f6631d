"""`fastdraft prepare` end to end on a real Ray session: shard contract, budgets, mixing, split, skip/refuse/resume."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fastdraft.cli import main
from fastdraft.config import load_recipe
from fastdraft.data.packing import join_with_eos
from fastdraft.data.pipeline import in_validation, run_prepare
from fastdraft.errors import FastdraftError, TokenizerMismatchError
from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

SEQ = 32
WORDS = "alpha beta gamma delta river stone cloud market garden window".split()


def text(i: int, words: int) -> str:
    rng = np.random.default_rng(i)
    return f"doc-{i} " + " ".join(rng.choice(WORDS, size=words))


def build_inputs(root: Path) -> dict:
    """A JSONL glob, a Parquet file, a code directory (with bad files) and a save_to_disk dataset."""
    import datasets

    (root / "jsonl").mkdir()
    for f in range(6):
        with open(root / "jsonl" / f"part{f}.jsonl", "w") as fh:
            for i in range(60):
                fh.write(json.dumps({"text": text(1000 * f + i, 40)}) + "\n")
    pq.write_table(pa.table({"content": [text(10_000 + i, 40) for i in range(300)]}), root / "web.parquet", row_group_size=50)
    code = root / "code"
    code.mkdir()
    for i in range(20):
        (code / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 5)
    (code / "lib.so.py").write_bytes(b"\x00\x01binary")
    (code / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (code / "README.md").write_text("not collected")
    hf = datasets.Dataset.from_dict({"text": [text(20_000 + i, 15) for i in range(150)] + [""], "id": [f"w{i}" for i in range(151)]})
    hf.save_to_disk(str(root / "hf"))
    return {"jsonl": str(root / "jsonl" / "*.jsonl"), "parquet": str(root / "web.parquet"), "code": str(code), "hf": str(root / "hf")}


def write_recipe(path: Path, tokenizer_dir: Path, workdir: Path, paths: dict) -> Path:
    recipe = {
        "name": "data-test", "workdir": str(workdir), "target": {"model": str(tokenizer_dir)},
        "prepare": {
            "seq_len": SEQ, "validation_fraction": 0.2, "docs_per_batch": 16, "min_actors": 1, "max_actors": 2, "cpus_per_actor": 0.5,
            "corpora": {
                "mix": {"tokens": 6000, "sources": [
                    {"name": "notes", "kind": "jsonl", "path": paths["jsonl"], "weight": 3},
                    {"name": "web", "kind": "parquet", "path": paths["parquet"], "text_field": "content", "weight": 1}]},
                "code": {"sources": [
                    {"name": "py", "kind": "files", "path": paths["code"], "extensions": [".py"]},
                    {"name": "hfweb", "kind": "hf", "path": paths["hf"], "split": "train"}]},
            },
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_dir, ray_session):
    """One `fastdraft prepare` run (two corpora, four source kinds) and its console output."""
    root = tmp_path_factory.mktemp("prepare")
    recipe = write_recipe(root / "recipe.yaml", tiny_tokenizer_dir, root / "run", build_inputs(root))
    return recipe, root / "run"


def rows_of(files) -> list[list[int]]:
    return [r for f in sorted(files) for r in pq.read_table(f).column("input_ids").to_pylist()]


@pytest.mark.timeout(240)
def test_prepare_writes_the_shard_contract_and_a_second_run_skips(prepared, tiny_tokenizer_dir, capsys):
    recipe, run = prepared
    assert main(["prepare", str(recipe)]) == 0
    fingerprint = tokenizer_fingerprint(load_tokenizer(tiny_tokenizer_dir))
    for name in ("mix", "code"):
        manifest = json.loads((run / "data" / name / "manifest.json").read_text())
        assert manifest["complete"] and manifest["tokenizer_fingerprint"] == fingerprint and manifest["seq_len"] == SEQ
        assert manifest["target"] == str(tiny_tokenizer_dir) and manifest["recipe"]["seq_len"] == SEQ and manifest["section_hash"]
        for split in ("train", "validation"):
            files = sorted((run / "data" / name / split).glob("part-*.parquet"))
            assert pq.read_schema(files[0]).field("input_ids").type == pa.list_(pa.int32())
            rows = rows_of(files)
            assert rows and all(len(r) == SEQ for r in rows)
            assert manifest["splits"][split] == {"sequences": len(rows), "tokens": len(rows) * SEQ, "files": len(files)}
        assert not list((run / "data" / name).rglob("*.partial"))
    out = capsys.readouterr().out
    assert re.search(r"\[prepare mix\] .*tok/s", out)
    assert main(["prepare", str(recipe)]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_budgets_and_mixing_weights_hold_to_within_one_row_and_stop_reading(prepared):
    manifest = json.loads((prepared[1] / "data" / "mix" / "manifest.json").read_text())
    notes, web = manifest["sources"]["notes"], manifest["sources"]["web"]
    assert 4500 - SEQ < notes["tokens"] <= 4500 and 1500 - SEQ < web["tokens"] <= 1500  # weights 3:1 of 6000
    assert notes["budget"] == 4500 and web["budget"] == 1500
    available = 6 * 60 * 45  # ~45 tokens or more per JSONL document; reading stopped long before the end
    assert notes["tokens_read"] < available / 2


@pytest.mark.timeout(60)
def test_bad_documents_are_counted_and_the_split_is_disjoint_and_exact(prepared, tiny_tokenizer_dir):
    code = prepared[1] / "data" / "code"
    manifest = json.loads((code / "manifest.json").read_text())
    assert manifest["sources"]["py"]["skipped"] == {"binary": 1, "non_utf8": 1}
    assert manifest["sources"]["py"]["documents"] == 20
    assert manifest["sources"]["hfweb"]["skipped"] == {"empty": 1}
    tok = load_tokenizer(tiny_tokenizer_dir)
    marks = {}
    for split in ("train", "validation"):
        rows = rows_of((code / split).glob("part-hfweb-*.parquet"))
        marks[split] = set(re.findall(r"doc-\d+", tok.decode(np.concatenate(rows).tolist())))
        # one shard, no budget: the rows are that split's documents joined with EOS, in order, minus the tail
        docs = [text(20_000 + i, 15) for i in range(150) if in_validation(f"hfweb:w{i}", 0.2) == (split == "validation")]
        expected = join_with_eos([tok(d, add_special_tokens=False)["input_ids"] for d in docs], tok.eos_token_id)
        np.testing.assert_array_equal(np.concatenate(rows), expected[: len(rows) * SEQ])
    assert marks["train"] and marks["validation"] and not marks["train"] & marks["validation"]


@pytest.mark.timeout(180)
def test_an_interrupted_corpus_resumes_only_its_missing_shards(prepared, tmp_path, capsys):
    recipe, run = prepared
    shutil.copytree(run, tmp_path / "run")
    code = tmp_path / "run" / "data" / "code"
    manifest = json.loads((code / "manifest.json").read_text())
    before = {p.relative_to(code): pq.read_table(p) for p in code.glob("*/part-*.parquet")}
    # as if the run died while the hf shard was in flight: no record, its train files still *.partial; its
    # validation files already published by the actor but never recorded by the driver; a stray file of an older try
    interrupted = {**manifest, "complete": False, "shards": {k: v for k, v in manifest["shards"].items() if not k.startswith("hfweb/")}}
    (code / "manifest.json").write_text(json.dumps(interrupted))
    for p in code.glob("train/part-hfweb-*.parquet"):
        p.rename(p.with_name(p.name + ".partial"))
    stray = next(code.glob("validation/part-hfweb-*.parquet"))
    shutil.copy2(stray, stray.with_name(stray.name.replace(".parquet", "-099.parquet")))
    summary = run_prepare(load_recipe(recipe, [f"workdir={tmp_path / 'run'}"]))
    assert summary["mix"]["skipped"] and not summary["code"]["skipped"]
    assert "resuming" in capsys.readouterr().out
    after = json.loads((code / "manifest.json").read_text())
    assert after["complete"] and after["splits"] == manifest["splits"] and after["sources"] == manifest["sources"]
    assert {p.relative_to(code): pq.read_table(p) for p in code.glob("*/part-*.parquet")} == before
    assert not list(code.rglob("*.partial"))


@pytest.mark.timeout(60)
def test_other_settings_or_another_tokenizer_are_refused_without_touching_the_corpus(prepared, tmp_path):
    recipe, run = prepared
    manifest_path = run / "data" / "mix" / "manifest.json"
    before = manifest_path.read_text()
    with pytest.raises(FastdraftError, match=r"data/(mix|code) holds a finished corpus prepared with other settings .*refusing to mix"):
        run_prepare(load_recipe(recipe, ["prepare.seq_len=64"]))
    assert manifest_path.read_text() == before
    shutil.copytree(run, tmp_path / "run")
    copy = tmp_path / "run" / "data" / "mix" / "manifest.json"
    copy.write_text(json.dumps({**json.loads(before), "tokenizer_fingerprint": "tok-other"}))
    with pytest.raises(TokenizerMismatchError, match="tok-other"):
        run_prepare(load_recipe(recipe, [f"workdir={tmp_path / 'run'}"]))
    stray = tmp_path / "stray"
    (stray / "data" / "mix").mkdir(parents=True)
    (stray / "data" / "mix" / "notes.txt").write_text("someone else's")
    with pytest.raises(FastdraftError, match="has no manifest.json"):
        run_prepare(load_recipe(recipe, [f"workdir={stray}"]))


@pytest.mark.timeout(60)
def test_a_missing_text_field_stops_before_anything_is_written(prepared, tmp_path, capsys):
    recipe, _ = prepared
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    overrides = [f"workdir={tmp_path / 'run'}", f"prepare.corpora.mix.sources.0.path={bad}"]
    assert main(["prepare", str(recipe), *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert "source 'notes'" in err and "bad.jsonl has no field 'text'" in err
    assert not (tmp_path / "run" / "data" / "mix").exists()


@pytest.mark.timeout(120)
def test_a_field_missing_further_down_a_file_stops_the_run_naming_file_and_line_and_keeps_the_partial_corpus(prepared, tmp_path, capsys):
    recipe, _ = prepared
    bad = tmp_path / "late.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "fine"}, {"text": "also fine"}, {"body": "no text"}]))
    overrides = [f"workdir={tmp_path / 'run'}", f"prepare.corpora.mix.sources.0.path={bad}"]
    assert main(["prepare", str(recipe), *[a for o in overrides for a in ("--set", o)]]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdraft prepare: error:")]
    assert error == [f"fastdraft prepare: error: source 'notes': {bad} line 3 has no field 'text' (text_field)"]
    assert json.loads((tmp_path / "run" / "data" / "mix" / "manifest.json").read_text())["complete"] is False
