"""`fastdraft run RECIPE`: stages run as a graph, finished ones are skipped, `--from` and changed sections rerun.

Uses a recipe with the two cheapest stages (prepare, generate) on the tiny target; the whole chain on the
embedded target is `test_demo.py`.
"""

import json

import pytest

from fastdraft.cli import main
from fastdraft.config import load_recipe
from fastdraft.pipeline import run_pipeline

pytestmark = pytest.mark.timeout(600)


def test_stages_run_then_skip_then_rerun_from_a_stage(ray_session, recipe_file, capsys):
    recipe = load_recipe(recipe_file)
    first = run_pipeline(recipe)
    assert set(first) == {"prepare", "generate"} and not first["prepare"].get("skipped")
    out = capsys.readouterr().out
    assert "generate: starting (alongside prepare)" in out  # independent stages run at the same time
    assert "rerunning" not in out  # a first run runs; nothing to move aside
    record = json.loads((recipe.run_dir / "pipeline.json").read_text())["stages"]
    assert record["prepare"]["status"] == record["generate"]["status"] == "done"
    alignment = sorted(p.name for p in (recipe.run_dir / "alignment").iterdir())
    capsys.readouterr()

    # Same recipe again: nothing runs.
    again = run_pipeline(recipe)
    out = capsys.readouterr().out
    assert "prepare: outputs exist and match" in out and "generate: outputs exist and match" in out
    assert again["prepare"]["skipped"] and again["generate"]["skipped"]

    # --from generate: prepare is skipped; the old alignment set is moved aside (kept), then regenerated.
    run_pipeline(recipe, from_stage="generate")
    out = capsys.readouterr().out
    assert "prepare: outputs exist and match" in out and "generate: rerunning (--from)" in out
    kept = list((recipe.run_dir / "superseded").glob("*/alignment"))
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == alignment
    assert (recipe.run_dir / "alignment" / "manifest.json").is_file()

    # A changed generate section reruns generate only.
    changed = load_recipe(recipe_file, ["generate.sampling.0.max_new_tokens=6"])
    run_pipeline(changed)
    out = capsys.readouterr().out
    assert "prepare: outputs exist and match" in out and "generate: rerunning (its recipe sections" in out


def test_a_failing_stage_stops_the_chain_with_its_own_error(ray_session, recipe_file, tmp_path, capsys):
    bad = load_recipe(recipe_file, [f"prepare.corpora.notes.sources.0.path={tmp_path / 'missing.jsonl'}"])
    assert main(["run", str(recipe_file), "--set", f"prepare.corpora.notes.sources.0.path={tmp_path / 'missing.jsonl'}"]) == 2
    captured = capsys.readouterr()
    assert "prepare: failed" in captured.out and "missing.jsonl" in captured.err
    # generate reads nothing of prepare's: it ran alongside, finished, and is recorded, so a rerun skips it.
    assert "generate: starting (alongside prepare)" in captured.out
    record = json.loads((bad.run_dir / "pipeline.json").read_text())["stages"]
    assert record["prepare"]["status"] == "failed" and record["generate"]["status"] == "done"
    assert main(["run", str(recipe_file)]) == 0  # the path fixed (the recipe's own): prepare runs, generate is kept
    out = capsys.readouterr().out
    assert "prepare: starting" in out and "generate: outputs exist and match" in out


def test_from_a_stage_the_recipe_lacks_is_an_error(recipe_file, capsys):
    assert main(["run", str(recipe_file), "--from", "distill"]) == 2
    assert "has no 'distill' section" in capsys.readouterr().err
