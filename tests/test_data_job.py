"""Stages as Ray jobs: `ray job submit --working-dir . -- python jobs/<stage>.py RECIPE` against a real
`ray start --head`, as the README shows (prepare alone, and the pipeline job with its skip and `--from`)."""

import json

import pytest
import yaml



@pytest.mark.timeout(400)
def test_prepare_runs_as_a_ray_job(ray_job, tiny_tokenizer_dir, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " + "words to pack " * i}) + "\n" for i in range(60)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "job-test", "workdir": str(tmp_path / "run"), "target": {"model": str(tiny_tokenizer_dir)},
        "prepare": {"seq_len": 32, "validation_fraction": 0.1, "max_actors": 1, "cpus_per_actor": 0.5,
                    "corpora": {"notes": {"sources": [{"name": "notes", "kind": "jsonl", "path": str(docs)}]}}},
    }))
    code, out = ray_job("python", "jobs/prepare.py", str(recipe))
    assert code == 0, out
    assert "[prepare notes]" in out and "succeeded" in out
    manifest = json.loads((tmp_path / "run" / "data" / "notes" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sources"]["notes"]["documents"] == 60
    assert manifest["splits"]["train"]["sequences"] > 0


@pytest.mark.timeout(600)
def test_the_pipeline_runs_as_a_ray_job_then_skips_then_reruns_from_a_stage(ray_job, recipe_file):
    code, out = ray_job("python", "jobs/pipeline.py", str(recipe_file))
    assert code == 0, out
    assert "prepare: done in" in out and "generate: done in" in out and "succeeded" in out

    code, out = ray_job("python", "jobs/pipeline.py", str(recipe_file), "--from", "generate")
    assert code == 0, out
    assert "prepare: outputs exist and match" in out and "generate: rerunning (--from)" in out
    record = json.loads((recipe_file.parent / "run" / "pipeline.json").read_text())["stages"]
    assert record["prepare"]["status"] == record["generate"]["status"] == "done"

