"""The engine benchmark job runs end to end (on a tiny agreeing pair, OpenVINO rows included) and reports what it
promises.

Speed itself is never asserted here (a shared 2-core machine); only that every row produced the same
greedy tokens as transformers, that the agreeing pair agrees, and that the JSON carries the metrics.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(180)
def test_bench_engine_agreeing_pair_smoke(tmp_path):
    from jobs.bench_engine import main

    out = tmp_path / "engine.json"
    report = main(["--pair", "agreeing", "--agreeing-vocab", "512", "--agreeing-hidden", "128", "--agreeing-layers", "4",
                   "--max-new-tokens", "12", "--prompts", "1", "--repeats", "1", "--gammas", "2,4", "--hf-gamma", "4",
                   "--openvino", "yes", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    rows = {r["config"] + f"/{r['gamma']}": r for r in report["rows"]}
    assert all(r["same_output"] for r in report["rows"]), [r["config"] for r in report["rows"] if not r["same_output"]]
    agree = rows["fastdraft, agreeing draft/4"]
    assert agree["acceptance_rate"] > 0.9 and agree["mbsu_bound"] > 1 and agree["efficiency"] > 0
    assert agree["x_transformers_assisted"] is not None
    # OpenVINO GenAI (the `openvino` extra), alone and speculative: same tokens, its own speedup and efficiency
    assert rows["openvino target alone/None"]["speedup_vs_own_target_alone"] == 1
    openvino = rows["openvino speculative, agreeing draft/4"]
    assert openvino["mbsu_bound"] == agree["mbsu_bound"] and openvino["efficiency"] > 0
    # the paper's deployment beside it: the draft's weights compressed to int8 by NNCF (fastdraft export's default)
    nncf = rows["openvino speculative, NNCF int8 draft, agreeing draft/4"]
    assert nncf["same_output"] and nncf["mbsu_bound"] > agree["mbsu_bound"] and nncf["efficiency"] > 0
    assert rows["fastdraft, random draft/4"]["acceptance_rate"] < 0.5
    # the same draft with int8 matrices: reads a quarter of the bytes, so its bound is higher; the same tokens
    int8 = rows["fastdraft int8 draft, agreeing draft/4"]
    assert int8["acceptance_rate"] > 0.8 and int8["mbsu_bound"] > agree["mbsu_bound"]
    for key in ("tokens_per_s", "speedup_vs_transformers_alone", "decode_efficiency", "draft_share", "verify_share",
                "overhead_share"):
        assert agree[key] is not None
