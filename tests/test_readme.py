"""The README's commands: each one is run by a test or by CI, and the ones that can run here run as written.

`WHERE_RUN` maps every command line of the README's ```bash blocks (by its start) to what runs it. A command
added to the README without an entry here fails `test_every_readme_command_is_run_somewhere`, so the README
cannot drift from what is tested. The few commands that need what this machine lacks (the paper's models,
a GPU image) say so, and name the test that runs the same command on a model that is here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

WHERE_RUN = {
    "python3 -m venv .venv": ".ci/run (the same install) + test_demo.py (the demo, --quick)",
    ". .venv/bin/activate && RAY_AUTH_MODE=token pytest": ".ci/run",
    "fastdraft make-draft --target embedded:": "test_readme.py::test_readme_make_draft_and_check_pair_run_as_written",
    "fastdraft check-pair embedded:": "test_readme.py::test_readme_make_draft_and_check_pair_run_as_written",
    # The paper's recipes need Phi-3's weights; `run`, skipping and `--from` run on a tiny recipe instead.
    "fastdraft run jobs/recipes/phi3-mini.yaml": "test_pipeline.py::test_stages_run_then_skip_then_rerun_from_a_stage"
                                                 " + test_foundation_recipes.py::test_shipped_recipes_validate_with_every_stage",
    "fastdraft pretrain jobs/recipes/demo.yaml --set": "test_train_cluster.py::test_pretrain_runs_as_a_ray_job"
                                                       " + test_demo.py (the demo's pretrain stage)",
    "export RAY_AUTH_MODE=token": "conftest.py::ray_head (every `ray job submit` test)",
    "ray start --head": "conftest.py::ray_head",
    "export FASTDRAFT_OUTPUT_DIR=": "test_outputs_durable.py::test_a_relative_workdir_under_ray_job_submit_goes_to_the_durable_location_or_is_refused",
    'ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json "{\\"env_vars\\": {\\"FASTDRAFT_OUTPUT_DIR\\"':
        "test_outputs_durable.py::test_a_relative_workdir_under_ray_job_submit_goes_to_the_durable_location_or_is_refused"
        " + test_data_job.py::test_the_pipeline_runs_as_a_ray_job_then_skips_then_reruns_from_a_stage"
        " + test_data_job.py::test_prepare_runs_as_a_ray_job",
    "fastdraft plan jobs/recipes/llama31-8b.yaml": "test_plan.py::test_fastdraft_plan_prints_every_stage_and_exits_2_when_one_does_not_fit"
                                                   " + test_plan.py::test_the_paper_recipes_fit_the_a10g_workers_they_declare_at_every_training_and_inference_stage"
                                                   " + test_plan.py::test_the_old_llama_micro_batch_of_32_x_2048_is_refused_naming_the_number_and_the_setting",
    "fastdraft serve jobs/recipes/": "test_serve_cli.py::test_fastdraft_serve_starts_answers_and_stops_on_sigterm",
    "serve run apps/serve_demo.yaml": "test_demo.py::test_readme_serve_run_and_curl_answer_with_the_demo_pair",
    "curl localhost:8000/v1/chat/completions": "test_demo.py::test_readme_serve_run_and_curl_answer_with_the_demo_pair",
    # On the demo's draft after `fastdraft demo`; the same commands run on the tiny draft in test_export.py.
    "fastdraft export runs/demo --format openvino --out": "test_export.py::test_openvino_int8_pair_runs_in_genai_with_a_draft_model_and_the_targets_greedy_output",
    "fastdraft export runs/demo --format openvino --with-target": "test_export.py::test_openvino_int8_pair_runs_in_genai_with_a_draft_model_and_the_targets_greedy_output",
    "fastdraft export runs/demo --format hf": "test_export.py::test_hf_export_is_a_plain_transformers_assistant_whose_greedy_output_is_the_targets"
                                              " + test_export.py::test_a_workdir_exports_its_draft_with_the_most_stages",
    "fastdraft export runs/demo --format gguf": "test_export.py::test_gguf_export_is_a_llama_cpp_file_that_gguf_reads_back_with_the_targets_tokenizer",
    "python jobs/bench_prepare.py": "test_benchmarks.py::test_bench_prepare_compares_the_pipeline_with_a_plain_loop_at_two_sizes",
    "python jobs/bench_generate.py": "test_benchmarks.py::test_bench_generate_times_the_loop_both_batched_engines_and_the_ray_pipeline",
    "python jobs/bench_train.py": "test_benchmarks.py::test_bench_train_compares_ray_train_with_a_plain_loop",
    "python -m jobs.bench_engine": "test_speculative_bench.py::test_bench_engine_agreeing_pair_smoke",
    "python jobs/bench_serve.py": "test_benchmarks.py::test_bench_serve_measures_speculative_and_target_alone_over_http",
}


def readme_commands() -> list[str]:
    """Every command line in the README's ```bash blocks (comments dropped, `\\` continuations joined)."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_every_readme_command_is_run_somewhere():
    commands = readme_commands()
    assert len(commands) >= 15
    unmapped = [c for c in commands if not any(c.startswith(prefix) for prefix in WHERE_RUN)]
    assert not unmapped, f"README commands that no test runs (add a test and a WHERE_RUN entry): {unmapped}"
    for where in WHERE_RUN.values():  # every named file and test exists
        assert ".ci/run" not in where or (REPO / ".ci" / "run").is_file()
        for file, test in re.findall(r"(\w+\.py)(?:::(\w+))?", where):
            assert (REPO / "tests" / file).is_file(), where
            if test:
                assert re.search(rf"def {test}\b", (REPO / "tests" / file).read_text()), where


def test_ci_runs_the_readme_test_command():
    [readme] = [c for c in readme_commands() if c.startswith(". .venv/bin/activate && RAY_AUTH_MODE=token pytest")]
    pytest_args = readme.split("RAY_AUTH_MODE=token ", 1)[1]
    assert pytest_args in (REPO / ".ci" / "run").read_text()


@pytest.mark.timeout(300)
def test_readme_make_draft_and_check_pair_run_as_written(smollm2_dir, tmp_path):
    for prefix in ("fastdraft make-draft", "fastdraft check-pair"):
        [line] = [c for c in readme_commands() if c.startswith(prefix)]
        argv = shlex.split(line, comments=True)
        res = subprocess.run([sys.executable, "-m", "fastdraft.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "drafts" / "smollm2-init" / "config.json").is_file()
    assert (tmp_path / "drafts" / "smollm2-init" / "tokenizer.json").is_file()
