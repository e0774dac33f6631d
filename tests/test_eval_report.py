"""The report: report.json with the documented structure, report.md / report.html tables, PNG plots."""

import json

import pytest

from fastdraft.config import recipe_from_dict
from fastdraft.evaluation import report as rep
from fastdraft.evaluation.metrics import CostRatio
from fastdraft.evaluation.tasks import EvalPrompt, EvalTask
from fastdraft.speculative.types import SamplingParams, SpecStats

GAMMAS = [1, 3]


def stats(d, a, f, n, pos_d, pos_a) -> dict:
    return SpecStats(drafted=d, accepted=a, target_passes=f, emitted=n,
                     per_position_drafted=pos_d, per_position_accepted=pos_a).to_dict()


@pytest.fixture
def report(tmp_path):
    recipe = recipe_from_dict({"name": "r", "evaluate": {"tasks": [{"name": "code", "kind": "humaneval"},
                                                                   {"name": "chat", "kind": "instructions"}],
                                                         "gamma": 3, "gammas": GAMMAS, "temperature": 0.6}})
    tasks = [EvalTask("code", "humaneval", [EvalPrompt("a", "x", [1, 2])], 8, False),
             EvalTask("chat", "instructions", [EvalPrompt("b", "y", [3])], 8, True)]
    drafts = {"PT": tmp_path / "PT", "FT": tmp_path / "FT"}
    costs = {"PT": CostRatio(0.1, 0.05), "FT": CostRatio(0.1, 0.05)}
    params = {"sampled": SamplingParams(temperature=0.6), "greedy": SamplingParams()}
    # gamma 1: 4 passes, 3 drafted, 2 accepted, 6 emitted; gamma 3: 2 passes, 5 drafted, 4 accepted, 6 emitted
    per_gamma = {1: stats(3, 2, 4, 6, [3], [2]), 3: stats(5, 4, 2, 6, [2, 2, 1], [2, 1, 1])}
    sweeps = {(t.name, d): {label: per_gamma for label in drafts} for t in tasks for d in params}
    engine_runs = {"engine": {"FT": {"code/greedy": {"stats": per_gamma[3], "speculative_s": 0.5, "speculative_tokens": 6,
                                                     "target_s": 1.0, "target_tokens": 6, "greedy_identical": True}}}}
    return rep.build_report(recipe=recipe, target_dir=tmp_path / "target", target_size=(1000, 4000), drafts=drafts,
                            costs=costs, tasks=tasks, params=params, gammas=GAMMAS, sweeps=sweeps, engine_runs=engine_runs)


def test_report_json_has_the_documented_structure(report):
    assert report["schema"] == "fastdraft.eval/1"
    assert set(report) >= {"created", "recipe", "target", "settings", "drafts", "tasks", "rows"}
    assert report["settings"]["gamma"] == 3 and report["settings"]["gammas"] == GAMMAS
    assert report["drafts"]["PT"]["params"] == 100 and report["drafts"]["PT"]["c_bytes"] == 0.05
    assert report["tasks"]["code"]["domain"] == "code" and report["tasks"]["chat"]["domain"] == "text"
    offline = [r for r in report["rows"] if r["method"] == "offline"]
    assert len(offline) == 2 * 2 * 2 * len(GAMMAS)  # drafts x tasks x decodings x gammas
    row = next(r for r in offline if r["gamma"] == 3)
    assert row["acceptance_rate"] == pytest.approx(4 / 5) and row["tau"] == pytest.approx(3.0)
    assert row["mbsu"] == pytest.approx(3.0 / 1.3) and row["mbsu_bytes"] == pytest.approx(3.0 / 1.15)
    assert row["per_position_acceptance"] == pytest.approx([1.0, 0.5, 1.0])
    [engine] = [r for r in report["rows"] if r["method"] == "engine"]
    assert engine["wall_clock_speedup"] == pytest.approx(2.0) and engine["greedy_identical"] is True
    assert engine["speculative_tokens_per_s"] == pytest.approx(12.0)


def test_headline_prefers_engine_rows_and_falls_back_to_offline_at_gamma(report):
    """One row per draft x task x decoding: the engine's where the pair was timed (here FT/code/greedy only, as
    with `evaluate.engine_drafts`), else the offline row at the headline gamma."""
    rows = rep.headline_rows(report)
    assert len(rows) == 8 and {(r["method"], r["gamma"]) for r in rows} == {("engine", 3), ("offline", 3)}
    [engine] = [r for r in rows if r["method"] == "engine"]
    assert (engine["draft"], engine["task"], engine["decoding"]) == ("FT", "code", "greedy")
    offline_only = {**report, "rows": [r for r in report["rows"] if r["method"] == "offline"]}
    rows = rep.headline_rows(offline_only)
    assert len(rows) == 8 and {r["gamma"] for r in rows} == {3}


def test_write_report_writes_json_markdown_html_and_plots(report, tmp_path):
    out = tmp_path / "eval"
    paths = rep.write_report(report, out)
    assert json.loads(paths["json"].read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    md = paths["md"].read_text()
    assert "| FT | code | code | greedy | engine | 3 | 0.800 | 3.000 | 2.308 | 2.609 | 2.000 | 6.000 | 12.0 | yes |" in md
    assert "AR γ=1" in md and "![acceptance_vs_gamma](acceptance_vs_gamma.png)" in md
    page = paths["html"].read_text()
    assert page.startswith("<!doctype html>") and '<img src="speedup_vs_gamma.png"' in page
    for name in rep.PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(out.glob("*.partial"))


def test_undefined_metrics_show_as_na(report):
    header, body = rep.table([{**report["rows"][0], "acceptance_rate": None}])
    assert body[0][header.index("AR")] == "n/a"


def test_sweep_table_has_one_row_per_draft_and_task_and_a_column_per_gamma(report):
    header, body = rep.sweep_table(report, "sampled")
    assert header == ["draft", "task", "AR γ=1", "AR γ=3", "tau γ=1", "tau γ=3"]
    assert body[0] == ["PT", "code", "0.667", "0.800", "1.500", "3.000"]  # 2/3, 4/5, 6/4, 6/2
    assert len(body) == 4


def test_the_verdict_says_plainly_whether_the_pair_pays_and_flags_speedups_above_the_memory_bound():
    def row(task, decoding, x, mbsu):
        return {"draft": "FT", "method": "engine", "task": task, "decoding": decoding, "wall_clock_speedup": x,
                "acceptance_rate": 0.3, "mbsu": mbsu, "mbsu_bytes": mbsu, "greedy_identical": True}

    slow = {"settings": {"temperature": 0.6}, "rows": [row("code", "greedy", 0.8, 1.1), row("code", "sampled", 1.05, 1.1)]}
    pays, lines = rep.verdict(slow, "FT")
    assert not pays and lines == ["code: 1.25x slower than the target alone (greedy, output identical; AR 0.30, MBSU 1.10), "
                                  "1.05x faster than the target alone (T 0.6; AR 0.30, MBSU 1.10)"]
    busy = {"settings": {"temperature": 0.6}, "rows": [row("text", "sampled", 1.49, 1.21)]}
    pays, [line] = rep.verdict(busy, "FT")
    assert pays and "above its memory-bound limit 1.21: the machine was busy" in line
