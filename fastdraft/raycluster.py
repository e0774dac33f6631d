"""Connecting to Ray the same way locally and under `ray job submit`."""

from __future__ import annotations

import os
import threading

_INIT_LOCK = threading.Lock()  # the pipeline starts independent stages in threads: one ray.init between them


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster this process was submitted to (RAY_ADDRESS), or start a local one.

    Under `ray job submit` Ray sets RAY_ADDRESS, so plain `ray.init()` joins that cluster; run locally it
    starts one. Jobs call this once; library functions assume Ray is up when they need it.
    """
    import ray

    with _INIT_LOCK:
        if not ray.is_initialized():
            _init(ray, num_cpus)


def _init(ray, num_cpus: int | None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs = {}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs = {"log_to_driver": True, "include_dashboard": False}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        # A Ray of our own on this machine: no spot preemption to watch for (the watcher is one more actor
        # process per Ray Train run) and no dashboard for Train metrics. Measured: about 3 s less per run.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
        # Stages share this machine's cores (pre-training beside generation), each on torch's OpenMP threads.
        # libgomp's threads spin ~300k times before sleeping, so two 2-thread workers on 2 cores spend half the
        # cores spinning: SmolLM2 decode at 64 rows, two processes at once, 164 tok/s in all against 306 for one
        # alone; spinning 10k times, 251 in all, and one alone runs as before (batch 1: 21.6-21.8 against
        # 21.0-24.0 ms a step; 2 cores, AMD Zen 3). The workers Ray starts here inherit this environment.
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    ray.init(**kwargs)
