"""Recipes: every shipped recipe validates; unknown keys, wrong types and bad overrides name key and file."""

from pathlib import Path

import pytest

from fastdraft.config import Recipe, load_recipe, parse_count, recipe_from_dict
from fastdraft.errors import RecipeError

RECIPES = Path(__file__).resolve().parent.parent / "jobs" / "recipes"


@pytest.mark.parametrize("name", ["demo", "phi3-mini", "llama31-8b"])
def test_shipped_recipes_validate_with_every_stage(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert isinstance(recipe, Recipe)
    for stage in ("prepare", "pretrain", "generate", "distill", "evaluate", "serve"):
        assert recipe.section(stage) is not None
    # every pretrain stage trains on a corpus the prepare section defines
    assert {s.corpus for s in recipe.pretrain.stages} <= set(recipe.prepare.corpora)


def test_paper_recipes_carry_the_papers_numbers():
    phi3 = load_recipe(RECIPES / "phi3-mini.yaml")
    llama = load_recipe(RECIPES / "llama31-8b.yaml")
    assert phi3.draft.params == 50_000_000 and llama.draft.params == 150_000_000
    assert [s.name for s in phi3.pretrain.stages] == ["PT", "CP"]
    assert [s.tokens for s in phi3.pretrain.stages] == [5_000_000_000, 7_500_000_000]


@pytest.mark.parametrize("text,value", [("5B", 5_000_000_000), ("2.5B", 2_500_000_000), ("300M", 300_000_000),
                                        ("64k", 64_000), (1234, 1234), ("1234", 1234)])
def test_parse_count_accepts_suffixes(text, value):
    assert parse_count(text) == value


def test_overrides_apply_to_nested_keys_and_list_items():
    recipe = load_recipe(RECIPES / "demo.yaml", ["pretrain.optim.lr=3e-4", "pretrain.stages.0.tokens=500k",
                                                 "workdir=/tmp/x"])
    assert recipe.pretrain.optim.lr == 3e-4
    assert recipe.pretrain.stages[0].tokens == 500_000
    assert recipe.run_dir == Path("/tmp/x")


def test_unknown_key_is_an_error_naming_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\npretrain:\n  stages: [{name: PT, corpus: pt, tokens: 1M}]\n  learning_rate: 1e-3\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*pretrain\.learning_rate.*unknown key"):
        load_recipe(path)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nprepare:\n  seq_len: long\n")
    with pytest.raises(RecipeError, match=r"prepare\.seq_len"):
        load_recipe(path)


def test_context_lookup_settings_are_checked_and_reach_the_engine(tmp_path):
    """evaluate.lookup / serve.lookup: an n-gram range upside down names both fields; the demo's reaches the engine as
    keyword arguments; a recipe without it keeps its evaluate identity (finished evaluations are not redone)."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nserve:\n  lookup: {tokens: 4, min_ngram: 3, max_ngram: 2}\n")
    with pytest.raises(RecipeError, match=r"lookup\.min_ngram \(3\) must be <= lookup\.max_ngram \(2\)"):
        load_recipe(path)
    demo = load_recipe(RECIPES / "demo.yaml")
    assert demo.serve.lookup.engine_args() == {"lookup_tokens": 6, "lookup_ngram": (2, 3)}
    assert "lookup" not in load_recipe(RECIPES / "demo.yaml", ["evaluate.lookup=null"]).evaluate.identity()
    assert demo.evaluate.identity()["lookup"] == {"tokens": 6, "min_ngram": 2, "max_ngram": 3}


def test_bad_override_names_the_key():
    with pytest.raises(RecipeError, match=r"pretrain\.optim\.nope"):
        load_recipe(RECIPES / "demo.yaml", ["pretrain.optim.nope=1"])
    with pytest.raises(RecipeError, match="must look like key.sub=value"):
        load_recipe(RECIPES / "demo.yaml", ["pretrain.optim.lr"])


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(bad)


def test_missing_section_is_named():
    recipe = load_recipe(RECIPES / "demo.yaml")
    bare = Recipe(name="bare")
    with pytest.raises(RecipeError, match="has no 'generate' section"):
        bare.section("generate")
    # the section hash changes exactly when a stage's inputs change
    changed = load_recipe(RECIPES / "demo.yaml", ["pretrain.optim.lr=1e-4"])
    assert recipe.section_hash("prepare") == changed.section_hash("prepare")
    assert recipe.section_hash("pretrain") != changed.section_hash("pretrain")


def test_scheduling_fields_do_not_change_a_stage_identity():
    """Threads, CPUs, actors and retries change how a stage runs, not its outputs: `fastdraft run` must not
    redo a finished stage when only they change. Anything else does change the identity."""
    from fastdraft.pipeline import demo_recipe

    base = demo_recipe().section_hash("pretrain", "generate", "distill")
    scheduling = demo_recipe(overrides=["pretrain.compute.torch_threads=1", "pretrain.in_memory_mb=0", "pretrain.compute.cpus_per_worker=0.5",
                                        "distill.compute.max_failures=5", "generate.torch_threads=1",
                                        "generate.max_actors=2", "generate.cpus_per_actor=0.5"])
    assert scheduling.section_hash("pretrain", "generate", "distill") == base
    assert "torch_threads" not in scheduling.pretrain.identity()["compute"]
    for change in ("pretrain.optim.lr=3e-4", "pretrain.compute.num_workers=2", "generate.batch_size=8",
                   "generate.dtype=float32", "distill.epochs=3"):
        assert demo_recipe(overrides=[change]).section_hash("pretrain", "generate", "distill") != base, change


def test_a_relative_workdir_is_made_absolute_where_the_recipe_loads(tmp_path, monkeypatch):
    """Ray Train V2 runs its workers in another directory: every path they get must already be absolute."""
    monkeypatch.delenv("FASTDRAFT_OUTPUT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert recipe_from_dict({"name": "r", "workdir": "runs/r"}).run_dir == tmp_path / "runs" / "r"
    assert recipe_from_dict({"name": "r"}).run_dir == tmp_path / "runs" / "r"  # the default, runs/${name}
    assert recipe_from_dict({"name": "r", "workdir": "/abs/r"}).run_dir == Path("/abs/r")
    monkeypatch.setenv("FASTDRAFT_OUTPUT_DIR", "/mnt/shared")
    assert recipe_from_dict({"name": "r", "workdir": "runs/r"}).run_dir == Path("/mnt/shared/runs/r")
    monkeypatch.setenv("FASTDRAFT_OUTPUT_DIR", "shared")
    with pytest.raises(RecipeError, match="FASTDRAFT_OUTPUT_DIR must be an absolute path"):
        recipe_from_dict({"name": "r"})


def test_a_relative_workdir_inside_rays_job_copy_is_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the job in a copy Ray deletes with the session."""
    monkeypatch.delenv("FASTDRAFT_OUTPUT_DIR", raising=False)
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(RecipeError, match="relative.*Ray's temporary copy.*FASTDRAFT_OUTPUT_DIR"):
        recipe_from_dict({"name": "r", "workdir": "runs/r"})
    assert recipe_from_dict({"name": "r", "workdir": str(tmp_path / "out")}).run_dir == tmp_path / "out"
    monkeypatch.setenv("FASTDRAFT_OUTPUT_DIR", str(tmp_path / "durable"))
    assert recipe_from_dict({"name": "r", "workdir": "runs/r"}).run_dir == tmp_path / "durable" / "runs" / "r"
