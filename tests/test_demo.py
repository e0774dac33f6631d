"""`fastdraft demo --quick`: the whole chain on the embedded SmolLM2 target, offline, as a user runs it.

prepare -> pretrain (PT, CP) -> generate -> distill -> evaluate at smoke-test size, in a subprocess with its
own Ray instance. The report must have its documented structure, distillation must fit the target's held-out
answers better than the CP draft it started from, and the aligned draft (FT) must be accepted at least as often as
the pre-trained one (PT) on the instruction prompts, the paper's claim, at its setting (gamma 3, T 0.6).
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def fresh_checkout(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and not ignored: no runs/, no .venv)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, smollm2_dir):
    """`fastdraft demo --quick` exactly as the README writes it: from a fresh checkout's root, no --workdir, so
    the recipe's relative workdir (runs/demo-quick) must reach Ray Train's workers, which run in another directory."""
    checkout = fresh_checkout(tmp_path_factory.mktemp("clone"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    env.pop("FASTDRAFT_OUTPUT_DIR", None)
    fastdraft = str(Path(sys.executable).parent / "fastdraft")  # the venv's entry point, as after activating it
    res = subprocess.run([fastdraft, "demo", "--quick"], cwd=checkout, env=env, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return checkout / "runs" / "demo-quick", res.stdout


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_quick_demo_runs_every_stage_and_prints_the_table_and_paths(quick_demo):
    workdir, out = quick_demo
    for stage in ("prepare", "pretrain", "generate", "distill", "evaluate"):
        assert f"[pipeline] {stage}: done in" in out
    for label in ("| PT", "| CP", "| FT"):
        assert label in out
    assert f"final draft: {workdir / 'drafts' / 'FT'}" in out
    report = json.loads((workdir / "eval" / "report.json").read_text())
    pays = {}
    for method, what in (("engine", "FT draft"), ("engine+lookup", "FT draft with context lookup")):
        ft = [r for r in report["rows"] if r["draft"] == "FT" and r["method"] == method]
        assert ft, method
        pays[method] = all(r["wall_clock_speedup"] > 1 for r in ft)  # the verdict says plainly whether the pair pays
        assert f"{what} {'pays' if pays[method] else 'does NOT pay'}, gamma 1" in out
    if any(pays.values()):
        assert "serve it:    fastdraft serve" in out
    else:
        assert "slower than the target alone" in out and "serve it:" not in out
    for name in ("report.json", "report.html", "report.md", "acceptance_vs_gamma.png", "speedup_vs_gamma.png"):
        assert (workdir / "eval" / name).is_file(), name
        if not name.endswith(".md"):
            assert str(workdir / "eval" / name) in out
    record = json.loads((workdir / "pipeline.json").read_text())["stages"]
    assert all(record[s]["status"] == "done" for s in ("prepare", "pretrain", "generate", "distill", "evaluate"))


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_quick_demo_report_structure_and_distillation_fits_the_target(quick_demo):
    workdir, _ = quick_demo
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert report["schema"] == "fastdraft.eval/1"
    assert set(report["drafts"]) == {"PT", "CP", "FT"}
    assert set(report["tasks"]) == {"code", "instructions", "text"}
    assert report["settings"]["gamma"] == 1 and report["settings"]["gammas"] == [1, 3]
    assert {r["decoding"] for r in report["rows"]} == {"sampled"}  # --quick: the paper's setting only (T 0.6)
    engine = [r for r in report["rows"] if r["method"] == "engine"]
    assert engine and all(r["wall_clock_speedup"] > 0 for r in engine)
    # N + truncated = A + L + F (L: copied tokens accepted, engine+lookup rows; offline sampled rows hold expected
    # counts: floats)
    for row in report["rows"]:
        assert row["emitted"] + row.get("truncated", 0) == pytest.approx(
            row["accepted"] + row.get("looked_up_accepted", 0) + row["target_passes"])
        assert 0 <= (row["acceptance_rate"] or 0) <= 1
    for draft in ("PT", "CP", "FT"):  # evaluate.engine_drafts: [FT]: the pair the verdict is about is timed
        rows = [r for r in report["rows"] if r["draft"] == draft and r["task"] == "instructions" and r["gamma"] == 1]
        # ... alone and with context lookup beside its draft (evaluate.lookup)
        assert {r["method"] for r in rows} == ({"offline", "engine", "engine+lookup"} if draft == "FT" else {"offline"})
    distill = json.loads((workdir / "pipeline.json").read_text())["stages"]["distill"]["summary"]
    assert distill["val_loss_after"] < distill["val_loss_before"]


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_quick_demo_aligned_draft_is_accepted_more_often_than_the_pretrained_one(quick_demo):
    """Instruction prompts at gamma 3, T 0.6 (the paper's setting). Acceptance over the target's own
    continuations, read by each draft teacher-forced (the offline rows): the expected value under sampling,
    sum_x min(p, q) per position, so a handful of prompts decides it without sampling noise. (The engine's own
    counters on those prompts are in the report too; with acceptance this low a few lucky tokens decide them.)"""
    workdir, _ = quick_demo
    report = json.loads((workdir / "eval" / "report.json").read_text())

    def acceptance(draft: str, decoding: str) -> float:
        [row] = [r for r in report["rows"] if r["draft"] == draft and r["task"] == "instructions" and r["gamma"] == 3
                 and r["method"] == "offline" and r["decoding"] == decoding]
        return row["acceptance_rate"]

    assert acceptance("FT", "sampled") > acceptance("PT", "sampled") > 0


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_frontier_point_reads_a_demo_run_as_its_report_and_alignment_set_say(quick_demo):
    """`jobs/bench_demo_frontier.py` runs the demo at several budgets; each point is read from the run's own files:
    gamma-3 offline AR per draft, the paper's-shape gaps, the engine rows' speedups, the alignment manifest's rows."""
    from jobs.bench_demo_frontier import frontier_point, frontier_table

    workdir, _ = quick_demo
    point = frontier_point(workdir, scale=0.1, minutes=4.2, overrides=["generate.prompts.0.limit=40"])
    report = json.loads((workdir / "eval" / "report.json").read_text())
    manifest = json.loads((workdir / "alignment" / "manifest.json").read_text())

    def offline(draft: str, task: str) -> float:
        [row] = [r for r in report["rows"] if r["method"] == "offline" and r["draft"] == draft and r["task"] == task
                 and r["decoding"] == "sampled" and r["gamma"] == 3]
        return row["acceptance_rate"]

    assert point["alignment_rows"] == manifest["counts"]["rows"] > 0
    assert point["acceptance_gamma3"]["FT/instructions/sampled"] == offline("FT", "instructions")
    assert point["ft_minus_pt_instructions"] == pytest.approx(offline("FT", "instructions") - offline("PT", "instructions"))
    assert point["cp_minus_pt_code"] == pytest.approx(offline("CP", "code") - offline("PT", "code"))
    [timed] = [r for r in report["rows"] if r["method"] == "engine+lookup" and r["draft"] == "FT"
               and r["task"] == "instructions" and r["decoding"] == "sampled"]
    assert point["engine"]["engine+lookup/instructions/sampled"]["speedup"] == timed["wall_clock_speedup"] > 0
    assert "greedy" not in {key.rsplit("/", 1)[1] for key in point["engine"]}  # --quick times T 0.6 only
    [line] = [l for l in frontier_table([point]).splitlines() if l.startswith("| 0.1 |")]
    assert f"| {manifest['counts']['rows']} |" in line and f"{timed['wall_clock_speedup']:.2f}" in line


def readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with `prefix`, as argv (a trailing `# comment` dropped)."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith(prefix):
            return shlex.split(line, comments=True)
    raise AssertionError(f"README.md has no command line starting with {prefix!r}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_serve_run_and_curl_answer_with_the_demo_pair(quick_demo, tmp_path):
    """The README's `serve run apps/serve_demo.yaml` and its curl line, verbatim, from a checkout whose
    runs/demo is the demo's output: the Serve config loads the recipe and the FT draft, and the curl call gets
    a chat completion with the speculative counters. SIGTERM stops it."""
    workdir, _ = quick_demo
    site = tmp_path / "checkout"  # the repo's apps/ and jobs/, and runs/demo = the demo's run
    (site / "runs").mkdir(parents=True)
    for name in ("apps", "jobs"):
        (site / name).symlink_to(REPO / name)
    (site / "runs" / "demo").symlink_to(workdir)
    serve_run, curl = readme_command("serve run "), readme_command("curl ")
    assert serve_run[2] == "apps/serve_demo.yaml" and "localhost:8000" in curl[1]
    serve_run[0] = str(Path(sys.executable).parent / "serve")  # the venv's `serve`, as after `. .venv/bin/activate`
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_run, cwd=site, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"serve run exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"not healthy after 300 s:\n{log.read_text()[-3000:]}"
            try:
                health = httpx.get("http://127.0.0.1:8000/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(3)
        assert health.json()["draft"].endswith("runs/demo/drafts/FT"), health.json()  # the demo's final draft
        res = subprocess.run(curl + ["--silent", "--show-error", "--fail-with-body"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        answer = json.loads(res.stdout)
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
        usage = answer["usage"]
        assert 1 <= usage["completion_tokens"] <= 48 and usage["speculative"]["gamma"] == 1  # the recipe's serve.gamma
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
