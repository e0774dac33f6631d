"""`fastdraft evaluate RECIPE` end to end on tiny models, with real Ray tasks and fastdraft's engine."""

import json
import shutil

import pytest
import yaml
from transformers import AutoModelForCausalLM

from eval_fixtures import DRAFT_NOISE, LAYER_SCALE, eval_pair, perturbed_copy  # noqa: F401
from fastdraft.checkpoint import read_metadata, save_draft
from fastdraft.cli import main
from fastdraft.config import recipe_from_dict
from fastdraft.errors import FastdraftError, TokenizerMismatchError
from fastdraft.evaluation import report as rep
from fastdraft.evaluation.pipeline import run_evaluate
from fastdraft.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, eval_pair, tiny_target_dir):  # noqa: F811
    """A run whose drafts/FT is the close draft and drafts/PT a noisier one (a 'before alignment' draft)."""
    target_dir, draft_dir = eval_pair
    root = tmp_path_factory.mktemp("eval_run")
    shutil.copytree(draft_dir, root / "drafts" / "FT")
    meta = read_metadata(draft_dir)
    noisy = perturbed_copy(AutoModelForCausalLM.from_pretrained(tiny_target_dir), LAYER_SCALE, 3 * DRAFT_NOISE, seed=5)
    save_draft(noisy, load_tokenizer(draft_dir), root / "drafts" / "PT", type(meta)(meta.target, meta.tokenizer_fingerprint).with_stage("PT", 10))
    return root


def recipe_dict(target_dir, run_dir, **evaluate) -> dict:
    return {"name": "evaltest", "workdir": str(run_dir), "target": {"model": str(target_dir)},
            "evaluate": {"tasks": [{"name": "code", "kind": "humaneval", "prompts": 3, "max_new_tokens": 20},
                                   {"name": "chat", "kind": "instructions", "prompts": 3, "max_new_tokens": 20}],
                         "gamma": 3, "gammas": [1, 3, 5], "temperature": 0.6, "dynamic_gamma": True, **evaluate}}


@pytest.mark.timeout(300)
def test_evaluate_cli_writes_the_report_and_engine_counters_match_the_offline_sweep(ray_session, eval_pair, run_dir,  # noqa: F811
                                                                                   tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(eval_pair[0], run_dir)))
    assert main(["evaluate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| draft | task |" in out and "report:" in out

    ev = run_dir / "eval"
    for name in ("report.json", "report.md", "report.html", "acceptance_vs_gamma.png", "speedup_vs_gamma.png",
                 "per_position.png", "drafts.png"):
        assert (ev / name).is_file(), name
    report = json.loads((ev / "report.json").read_text())
    assert list(report["drafts"]) == ["PT", "FT"]  # found in the run's drafts/ in stage order
    for d in report["drafts"].values():  # draft_weights auto: float32 Llama drafts on CPU run as int8
        assert d["weights"] == "int8" and 0.25 < d["c_bytes"] / d["c_params"] < 0.3, d
    rows = report["rows"]
    engine = [r for r in rows if r["method"] == "engine"]
    assert len(engine) == 2 * 2 * 2  # drafts x tasks x decodings, at the headline gamma
    for r in engine:
        assert r["gamma"] == 3 and r["wall_clock_speedup"] > 0 and r["speculative_tokens_per_s"] > 0
        if r["decoding"] == "greedy":
            assert r["greedy_identical"] is True  # lossless: same output as the target alone
            # the teacher-forced sweep predicts the engine's exact greedy counters
            [off] = [o for o in rows if o["method"] == "offline" and o["gamma"] == 3 and
                     all(o[k] == r[k] for k in ("draft", "task", "decoding"))]
            counters = ("drafted", "accepted", "target_passes", "emitted", "truncated")
            assert [off[k] for k in counters] == [r[k] for k in counters]

    dynamic = [r for r in rows if r["method"] == "engine-dynamic"]
    assert len(dynamic) == len(engine)  # reported as their own rows, beside static gamma
    for r in dynamic:
        assert r["gamma"] == pytest.approx(r["drafted"] / r["target_passes"])  # the mean gamma it chose
        assert r["greedy_identical"] in (True, None) and r["wall_clock_speedup"] > 0

    def ar(draft, task, decoding="greedy"):
        return next(r["acceptance_rate"] for r in engine if (r["draft"], r["task"], r["decoding"]) == (draft, task, decoding))

    assert ar("FT", "code") > ar("PT", "code") and ar("FT", "chat") > ar("PT", "chat")  # the closer draft is accepted more

    # a second run resumes: every part is reused, nothing is recomputed
    summary = run_evaluate(recipe_from_dict(recipe_dict(eval_pair[0], run_dir)))
    assert capsys.readouterr().out.count("done before, reusing") == 2 * 2  # one part per task x decoding
    assert set(summary["headline"]) >= {"FT/code/sampled", "PT/chat/greedy"}


@pytest.mark.timeout(300)
def test_engine_drafts_times_only_the_named_pairs_and_measures_the_others_offline(ray_session, eval_pair, run_dir,  # noqa: F811
                                                                                 tmp_path):
    """evaluate.engine_drafts: [FT]: FT's pair runs in the engine (wall clock, greedy identity); PT is measured
    offline only, and its headline rows are the offline ones at the headline gamma. evaluate.lookup: FT's pair also
    runs with context lookup beside its draft (method engine+lookup), lossless, its copies counted apart."""
    work = tmp_path / "run"
    shutil.copytree(run_dir / "drafts", work / "drafts")
    lookup = {"tokens": 4, "min_ngram": 1, "max_ngram": 2}  # 1-grams: tiny models' short outputs copy often enough
    run_evaluate(recipe_from_dict(recipe_dict(eval_pair[0], work, engine_drafts=["FT"], dynamic_gamma=False,
                                              lookup=lookup)))
    report = json.loads((work / "eval" / "report.json").read_text())
    engine = [r for r in report["rows"] if r["method"] == "engine"]
    assert {r["draft"] for r in engine} == {"FT"} and len(engine) == 2 * 2  # tasks x decodings
    assert all(r["wall_clock_speedup"] > 0 for r in engine)
    looked = [r for r in report["rows"] if r["method"] == "engine+lookup"]
    assert {r["draft"] for r in looked} == {"FT"} and len(looked) == 2 * 2
    assert sum(r.get("looked_up", 0) for r in looked) > 0 and all(r["wall_clock_speedup"] > 0 for r in looked)
    for r in looked:
        assert r["greedy_identical"] in (True, None)  # lossless with copies too
        assert r["emitted"] + r["truncated"] == r["accepted"] + r.get("looked_up_accepted", 0) + r["target_passes"]
    pays, lines = rep.verdict(report, "FT", "engine+lookup")
    assert len(lines) == 2 and all("the target alone" in line for line in lines)
    pt_offline = [r for r in report["rows"] if r["draft"] == "PT" and r["method"] == "offline"]
    assert len(pt_offline) == 2 * 2 * 3  # tasks x decodings x gammas: PT still has its acceptance and MBSU
    headline = rep.headline_rows(report)
    assert {(r["draft"], r["method"]) for r in headline} == {("FT", "engine"), ("FT", "engine+lookup"),
                                                             ("PT", "offline")} and len(headline) == 12
    with pytest.raises(FastdraftError, match=r"evaluate.engine_drafts: no draft labelled CP \(the drafts are PT, FT\)"):
        run_evaluate(recipe_from_dict(recipe_dict(eval_pair[0], work, engine_drafts=["CP"])))


def test_a_draft_with_another_tokenizer_is_refused_before_any_work(eval_pair, tmp_path):  # noqa: F811
    from fastdraft.assets import build_tiny_model, build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path / "other_tok", vocab_size=300)
    build_tiny_model(tmp_path / "other_tok", tmp_path / "other", layers=1, hidden=32, heads=2, kv_heads=1)
    recipe = recipe_from_dict(recipe_dict(eval_pair[0], tmp_path / "run", drafts=[str(tmp_path / "other")]))
    with pytest.raises(TokenizerMismatchError, match=r"(?s)draft other .*vocabulary size: target .* has 512 tokens"):
        run_evaluate(recipe)
    assert not (tmp_path / "run" / "eval").exists()


def test_no_drafts_is_a_clear_error(eval_pair, tmp_path):  # noqa: F811
    with pytest.raises(FastdraftError, match=r"no drafts to evaluate: none of .*drafts/PT.*set evaluate.drafts"):
        run_evaluate(recipe_from_dict(recipe_dict(eval_pair[0], tmp_path / "empty")))
    with pytest.raises(FastdraftError, match="evaluate.drafts: not a model directory"):
        run_evaluate(recipe_from_dict(recipe_dict(eval_pair[0], tmp_path, drafts=[str(tmp_path / "nope")])))


@pytest.mark.timeout(300)
def test_timed_prompts_time_the_first_prompts_and_every_prompt_counts_for_acceptance(eval_pair, run_dir):  # noqa: F811
    """tasks[].timed_prompts: 2 of 5: the target alone and the pair run batch 1 on the first 2 prompts only (their
    tokens are the wall clock's); the other 3 continuations come from the target in one batch, and the offline sweep
    reads all 5. Under greedy decoding those continuations are the target's own, so the sweep is exactly the one of
    an evaluation that times every prompt."""
    from fastdraft.config import EvalTaskConfig
    from fastdraft.evaluation.pipeline import decodings, measure_job, stop_tokens
    from fastdraft.evaluation.tasks import load_task

    target_dir, _ = eval_pair
    tok = load_tokenizer(target_dir)
    greedy = decodings(recipe_from_dict(recipe_dict(target_dir, run_dir)).section("evaluate"), stop_tokens(target_dir))["greedy"]
    drafts = {"FT": str(run_dir / "drafts" / "FT")}
    cache: dict = {}
    runs = {}
    for timed in (None, 2):
        task = load_task(EvalTaskConfig(name="chat", kind="instructions", prompts=5, max_new_tokens=12, timed_prompts=timed), tok)
        assert task.describe()["timed_prompts"] == (5 if timed is None else 2)
        runs[timed] = measure_job(str(target_dir), drafts, task, "greedy", greedy, [1, 3], 3, "float32", True, cache=cache)
    subset, every = runs[2]["engine"]["FT"], runs[None]["engine"]["FT"]
    assert subset["greedy_identical"] and every["greedy_identical"]
    assert 0 < subset["target_tokens"] <= 2 * 12 < every["target_tokens"]  # the wall clock covers the first 2 prompts
    assert subset["speculative_tokens"] == subset["target_tokens"] and subset["speculative_s"] > 0
    assert runs[2]["sweep"] == runs[None]["sweep"]  # all 5 prompts read offline, the same continuations
    assert runs[2]["sweep"]["FT"][3]["emitted"] + runs[2]["sweep"]["FT"][3]["truncated"] == every["target_tokens"]
    # more timed prompts than prompts (e.g. the demo's tasks with `--set evaluate.tasks.1.prompts=4`): all are timed
    assert load_task(EvalTaskConfig(name="chat", kind="instructions", prompts=3, timed_prompts=16), tok).describe()["timed_prompts"] == 3
