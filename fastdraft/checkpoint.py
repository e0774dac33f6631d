"""Checkpoint I/O: Hugging Face `save_pretrained` directories plus fastdraft's metadata file.

Every draft directory is usable as-is by transformers' `assistant_model`, vLLM's draft-model speculation
and OpenVINO export. Beside the weights, `fastdraft.json` records the target's identity, the tokenizer
fingerprint, the stage history (PT -> CP -> FT) and tokens seen.

Loading is safetensors-only by default (pickled `.bin` weights can run code) and never sets
`trust_remote_code` unless asked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fastdraft.errors import FastdraftError

METADATA_FILE = "fastdraft.json"


@dataclass
class StageRecord:
    """One training stage in a draft's history."""

    stage: str
    tokens: int
    data: str = ""
    finished_at: float = field(default_factory=time.time)


@dataclass
class DraftMetadata:
    target: str
    """The target's identity (path or name) the draft was made for."""
    tokenizer_fingerprint: str
    history: list[StageRecord] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_seen(self) -> int:
        return sum(r.tokens for r in self.history)

    @property
    def stages(self) -> list[str]:
        return [r.stage for r in self.history]

    def with_stage(self, stage: str, tokens: int, data: str = "") -> "DraftMetadata":
        return DraftMetadata(self.target, self.tokenizer_fingerprint, [*self.history, StageRecord(stage, tokens, data)], dict(self.extra))

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_seen": self.tokens_seen, "stages": self.stages}

    @classmethod
    def from_dict(cls, data: dict) -> "DraftMetadata":
        return cls(
            target=data["target"],
            tokenizer_fingerprint=data["tokenizer_fingerprint"],
            history=[StageRecord(**r) for r in data.get("history", [])],
            extra=data.get("extra", {}),
        )


def write_metadata(directory: str | Path, meta: DraftMetadata) -> None:
    path = Path(directory) / METADATA_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta.to_dict(), indent=2))
    tmp.replace(path)  # atomic: a crash never leaves half a metadata file


def read_metadata(directory: str | Path) -> DraftMetadata:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FastdraftError(f"{directory} has no {METADATA_FILE}: not a fastdraft draft (make one with `fastdraft make-draft`)")
    return DraftMetadata.from_dict(json.loads(path.read_text()))


def save_draft(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, directory: str | Path, meta: DraftMetadata
) -> Path:
    """Save weights (safetensors), config, tokenizer files and metadata into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_metadata(directory, meta)
    return directory


def check_safetensors(directory: str | Path, allow_pickle: bool = False) -> None:
    """Refuse directories whose weights are pickled (`.bin`/`.pt`) unless explicitly allowed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FastdraftError(f"model directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise FastdraftError(f"{directory} is not a Hugging Face model directory (no config.json)")
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickled and not allow_pickle:
        raise FastdraftError(
            f"{directory} holds pickled weights ({', '.join(pickled)}), which can run arbitrary code when loaded; "
            f"convert them to safetensors, or pass allow_pickle=True if you trust their source"
        )
    if not pickled:
        raise FastdraftError(f"{directory} has no weights (*.safetensors)")


def load_shape(directory: str | Path, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False) -> PreTrainedModel:
    """A model with `directory`'s config and no weights (meta device): sizes and costs without loading an 8B
    target into the driver's memory."""
    from transformers import AutoConfig

    from fastdraft.assets import resolve_model_path

    directory = resolve_model_path(str(directory))
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
                                                 trust_remote_code=trust_remote_code)
    meta_path = Path(directory) / METADATA_FILE
    if meta_path.is_file():
        from fastdraft.models import apply_head_tokens

        apply_head_tokens(model, json.loads(meta_path.read_text()).get("extra", {}))
    return model


def load_model(
    directory: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local directory (safetensors only unless `allow_pickle`).

    `embedded:<name>` resolves to the embedded default target (converted once, then cached).
    """
    from fastdraft.assets import resolve_model_path

    directory = resolve_model_path(str(directory))
    check_safetensors(directory, allow_pickle)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True,
        use_safetensors=not allow_pickle,
    )
    meta_path = Path(directory) / METADATA_FILE
    if meta_path.is_file():  # a draft whose output layer covers part of the vocabulary (fastdraft.models.SubsetHead)
        from fastdraft.models import apply_head_tokens

        apply_head_tokens(model, json.loads(meta_path.read_text()).get("extra", {}))
    return model.to(device).eval()


def load_config(directory: str | Path, trust_remote_code: bool = False):
    from fastdraft.assets import resolve_model_path

    directory = resolve_model_path(str(directory))
    if not (Path(directory) / "config.json").is_file():
        raise FastdraftError(f"target not found: {directory} is not a model directory (no config.json)")
    return AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code, local_files_only=True)
