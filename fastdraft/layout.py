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

from dataclasses import dataclass
from pathlib import Path


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
