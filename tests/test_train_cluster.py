"""Draft pre-training (issue 4) beyond one local Ray instance: a node lost mid-run, and the stage as a Ray job.

1. One PT run spans a simulated two-node cluster (`ray.cluster_utils.Cluster`): a training worker on
   each node. The worker node is killed after the first checkpoint, as a cloud node is preempted, and a
   fresh node joins (as an autoscaler would replace it); Ray Train V2 restarts the worker group from the
   last checkpoint and the stage still ends at exactly its token budget.
2. `ray job submit --working-dir . -- python jobs/pretrain.py RECIPE` against a real `ray start --head`
   trains the draft and records the stage in its history.

Both use shards written directly with pyarrow (the shard contract), not the prepare stage.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from fastdraft.checkpoint import read_metadata
from fastdraft.training.loop import read_log
from train_fixtures import SEQ_LEN, recipe_for, write_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def venv_python_on_path():
    """`python` in a job's entrypoint is found on the PATH of `ray start` (this process's): put this
    interpreter's directory first, as activating the venv does, so the job runs with fastdraft's packages.
    Autouse, so it is in place before the module's `ray_head` starts."""
    saved = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved}"
    yield
    os.environ["PATH"] = saved


# Logical CPUs (the machine has 2 physical cores). A worker asks for 1.6 CPUs, so two never fit on one
# node: one lands on the head (3 CPUs) and one on the worker node (2 CPUs). The head keeps 1.4 free
# for Ray Data's read tasks (1 CPU each): workers holding every CPU starve the reads and the run hangs.
HEAD_CPUS, NODE_CPUS, CPUS_PER_WORKER = 3, 2, 1.6
CLUSTER_TOKENS = 8_000  # 256 tokens per step on 2 workers: 31 full steps + 64 tokens, checkpoint every 4


@pytest.fixture
def two_node_cluster():
    """A head node and one worker node, this process connected as the driver; torn down afterwards.

    The cluster lives under its own RAY_TMPDIR: `Cluster` records its address in `<tmp>/ray/ray_current_cluster`,
    and a plain `ray.init()` anywhere on the machine joins the cluster named there (a run of another
    process would land on this test's nodes and die with them). The in-process `ray_session` instance
    (if an earlier module started one) is shut down first and brought back afterwards with its settings.
    """
    import ray
    from ray.cluster_utils import Cluster

    had_session = ray.is_initialized()
    if had_session:
        ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(tmp)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, worker
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        shutil.rmtree(tmp, ignore_errors=True)
        if had_session:  # as conftest's `ray_session` started it
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)


def preempt_after_first_checkpoint(cluster, node, storage: Path, running, timeout_s: float = 300) -> dict:
    """Once the run has a registered checkpoint, kill `node` (no drain), then add a fresh node in its place.

    Called from the main thread (Ray's `Node` installs signal handlers), while `running` (a Future) trains.
    """
    events: dict = {}
    deadline = time.time() + timeout_s
    # Ray Train writes this snapshot after it has persisted and registered a checkpoint.
    while not list(storage.glob("*/checkpoint_manager_snapshot.json")):
        if running.done() or time.time() > deadline:
            return events
        time.sleep(0.1)
    events["checkpoints_before"] = sorted(p.name for p in storage.glob("*/step-*"))
    cluster.remove_node(node, allow_graceful=False)
    events["removed_at"] = time.time()
    cluster.add_node(num_cpus=NODE_CPUS)
    events["replaced_at"] = time.time()
    return events


@pytest.mark.timeout(600)
def test_a_run_survives_losing_a_node_and_finishes_from_its_checkpoint(tmp_path, tiny_target_dir, tiny_draft_dir, two_node_cluster):
    """In: a PT stage of 8,000 tokens on 2 workers (one per node), checkpointing every 4 steps, max_failures 2;
    the worker node is killed after the first checkpoint and a replacement node joins.
    Out: the same `run_pretrain` call returns; the metrics log shows reports after a resume from a
    checkpoint (not from scratch); the run ends at exactly 8,000 tokens; drafts/PT records the stage."""
    from fastdraft.training.pretrain import run_pretrain

    cluster, worker = two_node_cluster
    run = tmp_path / "run"
    write_shards(run / "data/pt", tiny_target_dir, SEQ_LEN, 160, 4)
    recipe = recipe_for(run, tiny_target_dir, init=tiny_draft_dir,
                        stages=[{"name": "PT", "corpus": "pt", "tokens": CLUSTER_TOKENS}], eval_batches=1,
                        compute={"num_workers": 2, "cpus_per_worker": CPUS_PER_WORKER, "max_failures": 2})
    pool = ThreadPoolExecutor(1)
    try:
        running = pool.submit(run_pretrain, recipe)
        events = preempt_after_first_checkpoint(cluster, worker, run / "train", running)
        assert "removed_at" in events and not running.done(), f"the node was not removed mid-run: {events}"
        summary = running.result(timeout=420)
    finally:
        pool.shutdown(wait=False)
    pt = summary["PT"]
    assert pt["tokens"] == CLUSTER_TOKENS
    log = read_log(pt["log"])
    resumed = [r["resumed_from_step"] for r in log if r["resumed_from_step"] is not None]
    assert resumed, f"no report after a resume: {log}"
    assert resumed[0] >= 4 and resumed[0] % 4 == 0  # a checkpointed step, not a restart from scratch
    assert {r["world_size"] for r in log} == {2}
    # A step reported by the lost attempt after its last registered checkpoint is trained again by the
    # resumed one, on the same rows from the same state: the reports agree exactly.
    by_step: dict = {}
    for r in log:
        by_step.setdefault(r["step"], []).append(r)
    for step, reports in by_step.items():
        assert len({(r["tokens"], r["loss"], r.get("val_loss")) for r in reports}) == 1, reports
    assert log[-1]["tokens"] == CLUSTER_TOKENS and log[-1]["resumed_from_step"] is not None
    meta = read_metadata(run / "drafts" / "PT")
    assert meta.stages == ["PT"] and [r.tokens for r in meta.history] == [CLUSTER_TOKENS]
    assert not list((run / "drafts" / "PT").glob("trainer_state*"))


JOB_TOKENS = 1000  # 128 tokens per step on 1 worker: 7 full steps + 104 tokens


@pytest.mark.timeout(400)
def test_pretrain_runs_as_a_ray_job(ray_job, tiny_target_dir, tiny_draft_dir, tmp_path):
    """In: packed shards and a recipe (absolute paths) in a tmp workdir; `ray job submit --working-dir <repo>
    -- python jobs/pretrain.py RECIPE --set pretrain.compute.num_workers=1` against a real head.
    Out: the job succeeds, and drafts/PT/fastdraft.json records stage PT with exactly its token budget."""
    run = tmp_path / "run"
    write_shards(run / "data/pt", tiny_target_dir, SEQ_LEN, 32, 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "job-pt", "workdir": str(run), "target": {"model": str(tiny_target_dir)}, "draft": {"init": str(tiny_draft_dir)},
        "pretrain": {"stages": [{"name": "PT", "corpus": "pt", "tokens": JOB_TOKENS}], "micro_batch_size": 4,
                     "optim": {"lr": 3e-3, "warmup_steps": 2}, "compute": {"num_workers": 2, "cpus_per_worker": 0.5},
                     "eval_every": 4, "eval_batches": 1, "ckpt_every": 4},
    }))
    code, out = ray_job("python", "jobs/pretrain.py", str(recipe), "--set", "pretrain.compute.num_workers=1")
    assert code == 0, out
    assert "succeeded" in out, out
    meta = read_metadata(run / "drafts" / "PT")
    assert meta.stages == ["PT"] and [r.tokens for r in meta.history] == [JOB_TOKENS]
    log = read_log(next((run / "train").glob("*.metrics.jsonl")))
    assert log[-1]["tokens"] == JOB_TOKENS and {r["world_size"] for r in log} == {1}
