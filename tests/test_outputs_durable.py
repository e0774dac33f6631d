"""A `ray job submit --working-dir .` run's outputs outlive the job and Ray's session.

Under `--working-dir .` the job runs in Ray's temporary copy of the upload (`<temp>/session_*/runtime_resources/
working_dir_files/_ray_pkg_*`), which Ray deletes with the session. A recipe's relative workdir would land there.
Against a real `ray start --head` of its own (so the test can stop it): without FASTDRAFT_OUTPUT_DIR the job is
refused before any stage starts and writes nothing into Ray's temp dir; with it, the outputs land under it, where
the pipeline's last line and pipeline.json say, and are still there after the head is stopped and its temp dir gone.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import started_ray_head, submit_ray_job


@pytest.mark.timeout(900)
def test_a_relative_workdir_under_ray_job_submit_goes_to_the_durable_location_or_is_refused(recipe_file, tmp_path):
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["workdir"] = "runs/pipe"
    recipe_file.write_text(yaml.safe_dump(recipe))
    ray_temp = Path("/tmp") / f"rd{os.getpid()}"
    durable = tmp_path / "durable"
    run = durable / "runs" / "pipe"
    with started_ray_head(tmp_path, ray_temp) as head:
        code, out = submit_ray_job(head, "python", "jobs/pipeline.py", str(recipe_file))
        assert code != 0 and "FASTDRAFT_OUTPUT_DIR" in out and "Ray's temporary copy" in out, out
        assert "[pipeline]" not in out  # refused when the recipe loaded: no stage started
        assert not [p for p in ray_temp.rglob("runs") if p.is_dir()], "the refused job wrote into Ray's temp dir"

        code, out = submit_ray_job(head, "python", "jobs/pipeline.py", str(recipe_file),
                                   runtime_env={"env_vars": {"FASTDRAFT_OUTPUT_DIR": str(durable)}})
        assert code == 0, out
        assert f"[pipeline] outputs: {run}" in out
        assert not [p for p in ray_temp.rglob("runs") if p.is_dir()]
    assert not ray_temp.exists()  # the head is stopped and its session's files are gone; the outputs are not
    record = json.loads((run / "pipeline.json").read_text())
    assert record["outputs"] == str(run)
    assert record["stages"]["prepare"]["status"] == record["stages"]["generate"]["status"] == "done"
    assert (run / "data" / "notes" / "manifest.json").is_file() and (run / "alignment" / "manifest.json").is_file()
