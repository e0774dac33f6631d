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

The alignment set never passes through the driver whole: the driver reads only its manifest, the schema and
one column at a time, file by file (the held-out prompt ids, and the answers' token counts for the output
layer). Ray Data tasks read and pack each part file into training rows (packing stays within a file), and
the rows reach the Ray Train workers as a dataset, like pre-training's shards. Only the held-out prompts'
rows, a few, are packed on the driver. The target's held-out predictions, when there is no stored top-k,
come from a Ray task on the recipe's training device, in the target's dtype.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from pathlib import Path
from typing import Iterable, Iterator

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
def read_alignment(directory: Path, fingerprint: str, draft_from: str, need_topk: bool) -> tuple[list[Path], dict]:
    """The alignment set's part files and manifest, after checking the manifest and every file's columns
    (schemas only: no rows are read)."""
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
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise FastdraftError(f"alignment file {f} lacks column(s) {', '.join(missing)}")
        if need_topk and not all(c in names for c in TOPK_COLUMNS):
            raise FastdraftError(f"token-level KD needs topk_ids/topk_logprobs in {f}: generate with generate.store_topk > 0, "
                                 f"or use distill.loss: ce")
    return files, manifest


def iter_column(files: list[Path], column: str) -> Iterator:
    """One column's values over every file, a file at a time."""
    import pyarrow.parquet as pq

    for f in files:
        yield from pq.read_table(f, columns=[column]).column(column).to_pylist()


def iter_examples(files: list[Path], held: set[str], heldout: bool, columns: tuple[str, ...]) -> Iterator[dict]:
    """The rows of the held-out prompts (`heldout`) or of all the others, as dicts of `columns`, a file at a
    time. Rows are selected in Arrow before they become Python objects: a file's top-k columns as Python lists
    would take ~50 bytes a value."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = pa.array(sorted(held), type=pa.string())
    for f in files:
        names = pq.read_schema(f).names
        table = pq.read_table(f, columns=[c for c in dict.fromkeys(("prompt_id", *columns)) if c in names])
        inside = pc.is_in(table.column("prompt_id").cast(pa.string()), value_set=ids)
        yield from table.filter(inside if heldout else pc.invert(inside)).select(
            [c for c in columns if c in table.column_names]).to_pylist()


def topk_width(files: list[Path]) -> int:
    """k of the stored top-k: the narrowest teacher row of the first sample."""
    import pyarrow.parquet as pq

    first = pq.ParquetFile(files[0]).read_row_group(0, columns=["topk_ids"]).column("topk_ids")[0].as_py()
    return min(len(x) for x in first)


def split_heldout(prompt_ids: Iterable[str], n: int) -> set[str]:
    """`n` prompts held out for checkpoint selection, chosen by a hash (stable, independent of file order).

    They are the `n` distinct ids with the smallest hashes, found in one pass that keeps only `n` of them."""
    heap: list[tuple[str, str]] = []  # (negated order: the largest hash on top), kept to n entries
    kept: set[str] = set()
    distinct_beyond = False
    for pid in prompt_ids:
        pid = str(pid)
        if pid in kept:
            continue
        h = hashlib.sha256(pid.encode()).hexdigest()
        if len(heap) < n:
            heapq.heappush(heap, (_negate(h), pid))
            kept.add(pid)
            continue
        distinct_beyond = True
        if n and h < _negate(heap[0][0]):
            _, dropped = heapq.heapreplace(heap, (_negate(h), pid))
            kept.discard(dropped)
            kept.add(pid)
    if not distinct_beyond:
        raise FastdraftError(f"the alignment set has {len(kept)} prompts; distill.eval_prompts={n} would leave none to train on")
    return kept


def _negate(hexdigest: str) -> str:
    """A hex string that sorts in the opposite order (heapq is a min-heap)."""
    return hexdigest.translate(_NEGATE)


_NEGATE = str.maketrans("0123456789abcdef", "fedcba9876543210")


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


def pack_file(item: dict, held: frozenset, seq_len: int, pad_id: int, packing: bool, topk: int) -> list[dict]:
    """Ray Data `flat_map`: one alignment part file -> its packed training rows (held-out prompts left out)."""
    cols = (*REQUIRED_COLUMNS, *TOPK_COLUMNS) if topk else REQUIRED_COLUMNS
    packed, _ = pack_examples(list(iter_examples([Path(item["path"])], held, False, cols)), seq_len, pad_id, packing, topk)
    return _rows(packed)


def packed_dataset(files: list[Path], held: set[str], seq_len: int, pad_id: int, packing: bool, topk: int):
    """The training rows as a Ray Dataset, materialized in the object store (not the driver), in file order."""
    import functools

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # resume skips exactly the micro-batches already trained on
    fn = functools.partial(pack_file, held=frozenset(held), seq_len=seq_len, pad_id=pad_id, packing=packing, topk=topk)
    return ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=len(files)).flat_map(fn).materialize()


def target_argmax(target_dir: str, packed: dict[str, np.ndarray], dtype: str = "float32", device: str = "cpu") -> np.ndarray:
    """The target's top token for every response position (teacher forcing), -1 elsewhere."""
    import torch

    from fastdraft.checkpoint import load_model

    if "topk_ids" in packed:  # stored top-1 is the target's argmax
        return np.where(packed["loss_mask"] > 0, packed["topk_ids"][..., 0], -1).astype(np.int32)
    from fastdraft.training.losses import teacher_topk

    model = load_model(target_dir, dtype=dtype, device=device).eval()
    out = np.full(packed["input_ids"].shape, -1, np.int32)
    for i in range(0, len(out), 8):
        ids = torch.as_tensor(packed["input_ids"][i:i + 8], dtype=torch.long, device=device)
        pos = torch.as_tensor(packed["position_ids"][i:i + 8], dtype=torch.long, device=device)
        out[i:i + 8] = teacher_topk(model, ids, pos, 1)[0][..., 0].cpu().numpy()  # row t: the top token for token t
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


def with_alignment_head(recipe: Recipe, layout: RunLayout, start: DraftMetadata, start_dir: Path,
                        responses: Iterable) -> DraftMetadata:
    """`start` with its output layer re-chosen for alignment (when it has one of part of the vocabulary, or
    `draft.head_tokens` asks): the tokens of the target's training answers (`responses`, token-id arrays,
    streamed) first, then the corpora's."""
    from fastdraft.checkpoint import load_config
    from fastdraft.models import HEAD_TOKENS_KEY, token_counts, top_tokens
    from fastdraft.tokenizer import load_tokenizer
    from fastdraft.training.pretrain import pretrain_token_arrays

    count = recipe.draft.head_tokens or len(start.extra.get(HEAD_TOKENS_KEY) or [])
    if not count:
        return start
    vocab = load_config(start_dir).vocab_size
    counts = ALIGNMENT_HEAD_WEIGHT * token_counts(responses, vocab)
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
    files, manifest = read_alignment(layout.alignment, start.tokenizer_fingerprint, f"draft {start_dir}", topk_needed)
    key = hashlib.sha256(json.dumps({"distill": {k: v for k, v in cfg.identity().items() if k != "crash_at_step"}, "start": start.to_dict()["stages"],
                                     "start_keys": start.extra.get("stage_keys", {}), "data": manifest.get("section_hash")},
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = layout.draft("FT")
    if (out / "fastdraft.json").is_file() and read_metadata(out).extra.get("stage_keys", {}).get("FT") == key:
        return {"stage": "FT", "out": str(out), "skipped": True}
    held = split_heldout(iter_column(files, "prompt_id"), cfg.eval_prompts)
    responses = (r["response_ids"] for r in iter_examples(files, held, False, ("response_ids",)))
    start = with_alignment_head(recipe, layout, start, start_dir, responses)
    # Samples whose prompt alone fills a row, which packing drops (reported in the summary).
    dropped = sum(len(r["prompt_ids"]) >= cfg.seq_len for r in iter_examples(files, held, False, ("prompt_ids",)))
    from fastdraft.tokenizer import load_tokenizer

    tok = load_tokenizer(start_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    k = topk_width(files) if topk_needed else 0
    ensure_ray()
    train = packed_dataset(files, held, cfg.seq_len, pad, cfg.packing, k)  # packed by Ray Data tasks, not here
    train_rows = train.count()
    columns = (*REQUIRED_COLUMNS, *TOPK_COLUMNS) if k else REQUIRED_COLUMNS
    val, _ = pack_examples(list(iter_examples(files, held, True, columns)), cfg.seq_len, pad, cfg.packing, k)
    val["target_argmax"] = heldout_target_argmax(recipe, val)
    val.pop("topk_ids", None), val.pop("topk_logprobs", None)  # validation scores CE and agreement only
    world = max(cfg.compute.num_workers, 1)
    per_epoch = (train_rows // world) // cfg.micro_batch_size
    if per_epoch == 0:
        raise FastdraftError(f"{train_rows} packed rows are fewer than {world} workers x micro_batch_size "
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
    # Keep the best checkpoints by agreement (Ray always keeps the latest too, for resume).
    result = fit(loop, {"train": train}, run_name, storage,
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
            "train_rows": train_rows, "heldout_prompts": len(held), "dropped_overlong": dropped,
            "agreement_before": before.get("val_agreement"), "agreement_after": best_metrics.get("val_agreement"),
            "val_loss_before": before["val_loss"], "val_loss_after": best_metrics.get("val_loss"),
            "log": loop.log_path, "reports": len(read_log(loop.log_path))}


def heldout_target_argmax(recipe: Recipe, val: dict[str, np.ndarray]) -> np.ndarray:
    """`target_argmax` of the held-out rows: from the stored top-k, or from the target in a Ray task on the
    training device (one GPU or Gaudi), in the target's dtype; never the target on the driver."""
    if "topk_ids" in val:
        return target_argmax(recipe.target.model, val)
    import ray

    compute = recipe.distill.compute
    device = {"cuda": "cuda", "hpu": "hpu"}.get(compute.device, "cpu")
    task = ray.remote(num_cpus=compute.cpus_per_worker, num_gpus=1 if device == "cuda" else 0,
                      resources={"HPU": 1} if device == "hpu" else None)(_argmax_task)
    return ray.get(task.remote(recipe.target.model, val, recipe.target.dtype, device))


def _argmax_task(target_dir: str, val: dict, dtype: str, device: str) -> np.ndarray:
    if device == "hpu":
        from fastdraft.training.backends import import_habana

        import_habana()
    return target_argmax(target_dir, val, dtype, device)


def _cpu():
    import torch

    return torch.device("cpu")


def _load(directory: Path):
    from fastdraft.checkpoint import load_model

    return load_model(directory)
