"""Stage distill (FT): align the draft to its target on the target's own answers, with the pre-training loop.

    fastdraft distill jobs/recipes/demo.yaml [--set distill.loss=ce+kl]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/distill.py jobs/recipes/demo.yaml

Sequence-level knowledge distillation (the paper's FT stage): cross-entropy on the responses the target
generated (`<workdir>/alignment`, written by `fastdraft generate`), prompt tokens masked out. Samples are
packed whole into `seq_len` rows with position ids restarting at each sample (transformers then keeps
attention inside each sample), or padded one per row with `packing: false`. Optional token-level KD
from the stored top-k log-probs: `loss: kl | tvd | ce+kl | ce+tvd` (see `losses.py`).

Checkpoints are selected by agreement with the target, not by loss: on held-out prompts (whole prompts
are held out, all their samples), the fraction of response positions where the draft's top token equals
the target's under teacher forcing (the target's top token comes from its stored top-k, or from one
target pass here). Greedy acceptance with gamma = 1 is exactly this number; it is cheap and exact, so it
is measured at every checkpoint, and the best checkpoint becomes `drafts/FT`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fastdraft.checkpoint import DraftMetadata, read_metadata
from fastdraft.config import DistillConfig, Recipe
from fastdraft.errors import FastdraftError
from fastdraft.layout import RunLayout
from fastdraft.plan import check_stage
from fastdraft.tokenizer import check_fingerprints
from fastdraft.training.loop import LoopConfig, evaluate, export_draft, fit, read_log, steps_for_budget, to_tensors

REQUIRED_COLUMNS = ("key", "prompt_id", "prompt_ids", "response_ids")
TOPK_COLUMNS = ("topk_ids", "topk_logprobs")


# ------------------------------------------------------------------------------------------------
# Reading the alignment set
# ------------------------------------------------------------------------------------------------
def read_alignment(directory: Path, fingerprint: str, draft_from: str, need_topk: bool):
    """The alignment set as a pyarrow table, after checking its manifest and columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = directory / "manifest.json"
    if not path.is_file():
        raise FastdraftError(f"no alignment set at {directory} (missing {path.name}); run `fastdraft generate` first")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise FastdraftError(f"{path} says the alignment set is incomplete; re-run `fastdraft generate` to finish it")
    check_fingerprints(fingerprint, manifest.get("tokenizer_fingerprint", "<none>"), draft_from, str(path))
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise FastdraftError(f"{directory} has no part-*.parquet files although {path} says complete")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise FastdraftError(f"alignment set {directory} lacks column(s) {', '.join(missing)}")
    if need_topk and not all(c in table.column_names for c in TOPK_COLUMNS):
        raise FastdraftError(f"token-level KD needs topk_ids/topk_logprobs in {directory}: generate with generate.store_topk > 0, "
                             f"or use distill.loss: ce")
    return table, manifest


def split_heldout(prompt_ids: list[str], n: int) -> set[str]:
    """`n` prompts held out for checkpoint selection, chosen by a hash (stable, independent of file order)."""
    unique = sorted(set(prompt_ids), key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())
    if len(unique) <= n:
        raise FastdraftError(f"the alignment set has {len(unique)} prompts; distill.eval_prompts={n} would leave none to train on")
    return set(unique[:n])


# ------------------------------------------------------------------------------------------------
# Packing (pure numpy, unit-tested)
# ------------------------------------------------------------------------------------------------
def pack_examples(examples: list[dict], seq_len: int, pad_id: int, packing: bool = True, topk: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """Prompt+response samples -> fixed rows with a response-only loss mask.

    Args:
        examples: dicts with `prompt_ids`, `response_ids` and, when `topk`, `topk_ids`/`topk_logprobs`
            ([len(response), k], the target's top-k for each response token).
        seq_len: row length; samples longer than a row are cut at its end (the response's tail goes).
        pad_id: filler token (masked out, in its own attention block).
        packing: several whole samples per row (first fit, in order); else one sample per row.
        topk: k of the stored top-k (0: none).
    Returns:
        columns `input_ids`, `loss_mask`, `position_ids` [rows, seq_len] (+ `topk_ids`, `topk_logprobs`
        [rows, seq_len, k]) and the number of samples dropped because their prompt fills a whole row.
    """
    rows: list[list[tuple[dict, int]]] = []  # each row: (sample, kept length)
    used: list[int] = []
    dropped = 0
    for ex in examples:
        n = min(len(ex["prompt_ids"]) + len(ex["response_ids"]), seq_len)
        if len(ex["prompt_ids"]) >= n:
            dropped += 1
            continue
        if packing and rows and used[-1] + n <= seq_len:
            rows[-1].append((ex, n))
            used[-1] += n
        else:
            rows.append([(ex, n)])
            used.append(n)
    out = {"input_ids": np.full((len(rows), seq_len), pad_id, np.int32), "loss_mask": np.zeros((len(rows), seq_len), np.int8),
           "position_ids": np.zeros((len(rows), seq_len), np.int32)}
    if topk:
        out["topk_ids"] = np.full((len(rows), seq_len, topk), -1, np.int32)
        out["topk_logprobs"] = np.zeros((len(rows), seq_len, topk), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for ex, n in row:
            p = len(ex["prompt_ids"])
            out["input_ids"][r, at:at + n] = np.concatenate([ex["prompt_ids"], ex["response_ids"]])[:n]
            out["loss_mask"][r, at + p:at + n] = 1  # response tokens only: the first one is scored, no prompt token is
            out["position_ids"][r, at:at + n] = np.arange(n)
            if topk:
                out["topk_ids"][r, at + p:at + n] = np.asarray(ex["topk_ids"], np.int32)[: n - p, :topk]
                out["topk_logprobs"][r, at + p:at + n] = np.asarray(ex["topk_logprobs"], np.float32)[: n - p, :topk]
            at += n
        out["position_ids"][r, at:] = np.arange(seq_len - at)  # padding: a block of its own, masked
    return out, dropped


def examples_from(table, keep) -> list[dict]:
    """Rows of the alignment table whose prompt_id satisfies `keep`, as plain dicts (sorted by key)."""
    cols = [c for c in (*REQUIRED_COLUMNS, *TOPK_COLUMNS) if c in table.column_names]
    rows = [r for r in table.select(cols).to_pylist() if keep(r["prompt_id"])]
    return sorted(rows, key=lambda r: r["key"])


def target_argmax(target_dir: str, packed: dict[str, np.ndarray]) -> np.ndarray:
    """The target's top token for every response position (teacher forcing), -1 elsewhere."""
    import torch

    from fastdraft.checkpoint import load_model

    if "topk_ids" in packed:  # stored top-1 is the target's argmax
        return np.where(packed["loss_mask"] > 0, packed["topk_ids"][..., 0], -1).astype(np.int32)
    model = load_model(target_dir)
    out = np.full(packed["input_ids"].shape, -1, np.int32)
    with torch.no_grad():
        for i in range(0, len(out), 8):
            ids = torch.as_tensor(packed["input_ids"][i:i + 8], dtype=torch.long)
            pos = torch.as_tensor(packed["position_ids"][i:i + 8], dtype=torch.long)
            pred = model(input_ids=ids, position_ids=pos).logits.argmax(-1).numpy()
            out[i:i + 8, 1:] = pred[:, :-1]
    return np.where(packed["loss_mask"] > 0, out, -1).astype(np.int32)


def _rows(packed: dict[str, np.ndarray]) -> list[dict]:
    return [{k: v[i] for k, v in packed.items()} for i in range(len(packed["input_ids"]))]


def _batches(packed: dict[str, np.ndarray], rows: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[i:i + rows] for k, v in packed.items()} for i in range(0, len(packed["input_ids"]), rows)]


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
def start_draft(recipe: Recipe, layout: RunLayout) -> Path:
    cfg: DistillConfig = recipe.distill
    if cfg.init:
        return Path(cfg.init)
    if recipe.pretrain:
        return layout.draft(recipe.pretrain.stages[-1].name)
    if recipe.draft.init_dir:
        return recipe.draft.init_dir
    raise FastdraftError("distill needs a draft to start from: set distill.init, draft.init, or a pretrain section")


ALIGNMENT_HEAD_WEIGHT = 10
"""At distill, a token in the target's own answers counts this many times one in the corpora: the head should
cover what the target emits."""


def with_alignment_head(recipe: Recipe, layout: RunLayout, start: DraftMetadata, start_dir: Path, train: list[dict]) -> DraftMetadata:
    """`start` with its output layer re-chosen for alignment (when it has one of part of the vocabulary, or
    `draft.head_tokens` asks): the tokens of the target's training answers first, then the corpora's."""
    from fastdraft.checkpoint import load_config
    from fastdraft.models import HEAD_TOKENS_KEY, token_counts, top_tokens
    from fastdraft.tokenizer import load_tokenizer
    from fastdraft.training.pretrain import pretrain_token_arrays

    count = recipe.draft.head_tokens or len(start.extra.get(HEAD_TOKENS_KEY) or [])
    if not count:
        return start
    vocab = load_config(start_dir).vocab_size
    counts = ALIGNMENT_HEAD_WEIGHT * token_counts((ex["response_ids"] for ex in train), vocab)
    counts += token_counts(pretrain_token_arrays(recipe, layout), vocab)  # none when there are no shards
    chosen = DraftMetadata.from_dict(start.to_dict())
    chosen.extra[HEAD_TOKENS_KEY] = top_tokens(counts, count, load_tokenizer(start_dir).all_special_ids)
    return chosen


def run_distill(recipe: Recipe, **_options) -> dict:
    """Fine-tune the draft on the alignment set; writes `drafts/FT` (the checkpoint with the best agreement)."""
    from ray.train import CheckpointConfig

    from fastdraft.raycluster import ensure_ray

    cfg: DistillConfig = recipe.section("distill")
    check_stage(recipe, "distill")
    layout = RunLayout(recipe.run_dir)
    start_dir = start_draft(recipe, layout)
    start = read_metadata(start_dir)
    topk_needed = cfg.loss != "ce"
    table, manifest = read_alignment(layout.alignment, start.tokenizer_fingerprint, f"draft {start_dir}", topk_needed)
    key = hashlib.sha256(json.dumps({"distill": {k: v for k, v in cfg.identity().items() if k != "crash_at_step"}, "start": start.to_dict()["stages"],
                                     "start_keys": start.extra.get("stage_keys", {}), "data": manifest.get("section_hash")},
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = layout.draft("FT")
    if (out / "fastdraft.json").is_file() and read_metadata(out).extra.get("stage_keys", {}).get("FT") == key:
        return {"stage": "FT", "out": str(out), "skipped": True}
    held = split_heldout(table.column("prompt_id").to_pylist(), cfg.eval_prompts)
    start = with_alignment_head(recipe, layout, start, start_dir, examples_from(table, lambda p: p not in held))
    from fastdraft.tokenizer import load_tokenizer

    tok = load_tokenizer(start_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    k = min(len(x) for x in table.column("topk_ids").to_pylist()[0]) if topk_needed else 0
    train, dropped = pack_examples(examples_from(table, lambda p: p not in held), cfg.seq_len, pad, cfg.packing, k)
    val, _ = pack_examples(examples_from(table, lambda p: p in held), cfg.seq_len, pad, cfg.packing, k)
    val["target_argmax"] = target_argmax(recipe.target.model, val)
    val.pop("topk_ids", None), val.pop("topk_logprobs", None)  # validation scores CE and agreement only
    world = max(cfg.compute.num_workers, 1)
    per_epoch = (len(train["input_ids"]) // world) // cfg.micro_batch_size
    if per_epoch == 0:
        raise FastdraftError(f"{len(train['input_ids'])} packed rows are fewer than {world} workers x micro_batch_size "
                             f"{cfg.micro_batch_size}; generate more data or lower distill.micro_batch_size")
    total = (steps_for_budget(cfg.tokens, world, cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len) if cfg.tokens
             else max(1, cfg.epochs * per_epoch // cfg.grad_accum))
    storage = layout.train_storage
    storage.mkdir(parents=True, exist_ok=True)
    run_name = f"{recipe.name}-FT-{key}"
    loop = LoopConfig(
        stage="FT", init_dir=str(start_dir), seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
        total_steps=total, optim=cfg.optim, compute=cfg.compute, token_budget=cfg.tokens, loss=cfg.loss,
        eval_every=cfg.eval_every, eval_batches=10**6, ckpt_every=cfg.ckpt_every, seed=cfg.seed, crash_at_step=cfg.crash_at_step,
        crash_marker=str(storage / f"{run_name}.crashed"), log_path=str(storage / f"{run_name}.metrics.jsonl"),
        validation=_batches(val, cfg.micro_batch_size), meta=start.to_dict(),
    )
    before = evaluate(_load(start_dir), [to_tensors(b, _cpu()) for b in loop.validation], loop, _cpu())
    ensure_ray()
    import ray.data

    # Keep the best checkpoints by agreement (Ray always keeps the latest too, for resume).
    result = fit(loop, {"train": ray.data.from_items(_rows(train))}, run_name, storage,
                 CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_agreement", checkpoint_score_order="max"))
    best = result.get_best_checkpoint("val_agreement", "max") or result.checkpoint
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics)
    trained = int(best_metrics.get("tokens", 0))
    meta = start.with_stage("FT", trained, data="alignment")
    meta.extra["stage_keys"] = {**start.extra.get("stage_keys", {}), "FT": key}
    meta.extra.setdefault("metrics", {})["FT"] = {"agreement_before": before.get("val_agreement"), "agreement_after": best_metrics.get("val_agreement"),
                                                  "val_loss_before": before["val_loss"], "val_loss_after": best_metrics.get("val_loss"),
                                                  "selected_step": best_metrics.get("step"), "loss": cfg.loss}
    export_draft(best, out, meta)
    return {"stage": "FT", "out": str(out), "skipped": False, "run": run_name, "steps": total, "selected_step": best_metrics.get("step"),
            "train_rows": len(train["input_ids"]), "heldout_prompts": len(held), "dropped_overlong": dropped,
            "agreement_before": before.get("val_agreement"), "agreement_after": best_metrics.get("val_agreement"),
            "val_loss_before": before["val_loss"], "val_loss_after": best_metrics.get("val_loss"),
            "log": loop.log_path, "reports": len(read_log(loop.log_path))}


def _cpu():
    import torch

    return torch.device("cpu")


def _load(directory: Path):
    from fastdraft.checkpoint import load_model

    return load_model(directory)
