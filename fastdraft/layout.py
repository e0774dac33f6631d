"""Where a recipe's artifacts live: one directory per recipe (`workdir`), one sub-directory per stage.

    <workdir>/
      data/<corpus>/            packed shards (train/, validation/) + manifest.json      (prepare)
      drafts/init/              the untrained draft from make-draft                      (pretrain)
      drafts/<stage>/           the final draft of each training stage: PT, CP, FT       (pretrain, distill)
      train/                    Ray Train storage (run state, checkpoints; resume reuses it)
      alignment/                the target's answers: Parquet + manifest.json            (generate)
      eval/                     report.json, report.md/html, *.png                       (evaluate)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastdraft.errors import RecipeError

OUTPUT_DIR_ENV = "FASTDRAFT_OUTPUT_DIR"
"""Relative workdirs resolve against this directory when it is set (a shared filesystem on a cluster)."""


def in_ray_job_copy(cwd: Path) -> bool:
    """Whether `cwd` is Ray's temporary copy of a `ray job submit --working-dir` upload (deleted with the session)."""
    return "runtime_resources" in cwd.parts or any(part.startswith("_ray_pkg_") for part in cwd.parts)


def resolve_workdir(workdir: str, cwd: Path | None = None) -> Path:
    """The absolute directory a recipe's relative or absolute `workdir` names, decided once, on the driver.

    Every path handed to Ray Train workers, tasks and actors derives from this, so a worker whose working
    directory Ray changed (Train V2 chdirs its workers) still finds it. Rules:
      - absolute: as it is;
      - relative, with `$FASTDRAFT_OUTPUT_DIR` set: under that directory;
      - relative, run from Ray's temporary copy of a `ray job submit --working-dir` upload: refused, since Ray
        deletes that copy with the session and every draft written there would be lost;
      - relative otherwise: under the directory fastdraft was started from.
    """
    path = Path(os.path.expanduser(workdir))
    if path.is_absolute():
        return path
    root = os.environ.get(OUTPUT_DIR_ENV)
    if root:
        if not Path(root).is_absolute():
            raise RecipeError(f"${OUTPUT_DIR_ENV} must be an absolute path, got {root!r}")
        return Path(root) / path
    cwd = cwd or Path.cwd()
    if in_ray_job_copy(cwd):
        raise RecipeError(
            f"workdir '{workdir}' is relative and this job runs in Ray's temporary copy of its working directory ({cwd}), "
            f"which Ray deletes with the session: every output would be lost. Give a durable location: set "
            f"{OUTPUT_DIR_ENV} (e.g. ray job submit --runtime-env-json '{{\"env_vars\": {{\"{OUTPUT_DIR_ENV}\": \"/abs/path\"}}}}' ...) "
            f"or an absolute workdir (--set workdir=/abs/path); on a multi-node cluster it must be storage every node mounts")
    return cwd / path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def corpus(self, name: str) -> Path:
        return self.root / "data" / name

    def draft(self, stage: str) -> Path:
        return self.root / "drafts" / stage

    @property
    def train_storage(self) -> Path:
        return self.root / "train"

    @property
    def alignment(self) -> Path:
        return self.root / "alignment"

    @property
    def eval(self) -> Path:
        return self.root / "eval"
