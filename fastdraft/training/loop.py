"""THE training loop, shared by pre-training (PT, CP) and distillation (FT), run by Ray Train workers.

What one optimizer step is: every worker takes `grad_accum` micro-batches of `micro_batch_size` rows
from its shard of the `train` dataset; the loss is the sum of per-token losses divided by the number of
loss tokens of the *whole* step on *all* workers (one all-reduce of a count), so gradient accumulation
and data parallelism give the same gradient as one big batch. AdamW, linear warmup then cosine decay to
`min_lr_ratio * lr`, gradient clipping.

Exact token budget: the run ends after exactly `token_budget` training tokens. The last step masks the
rows (and the part of a row) beyond the budget, in a fixed order over (micro-batch, rank, row), so the
count is exact and the same on every worker without communication.

Resume (Ray Train V2: same run name + storage path, or `FailureConfig` retries): checkpoints are HF
draft directories (usable as drafts as they are) plus `trainer_state.pt` (optimizer, RNG) and
`trainer_state.json` (step, tokens, epoch, micro-batches consumed in the epoch). Data order is
deterministic (`preserve_order`), so a resumed worker skips exactly the micro-batches it had trained on:
no row is seen twice and none is skipped.

Batches are dicts of numpy arrays: `input_ids` [B, L] and optionally `loss_mask` (1 where token t is a
training target), `position_ids` (reset per packed sample: transformers then masks attention across
samples), `topk_ids`/`topk_logprobs` [B, L, K] (teacher for token t), and in validation `target_argmax`
(the target's greedy token t, -1 where not scored) for the draft/target agreement metric.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fastdraft.config import ComputeConfig, OptimConfig
from fastdraft.errors import FastdraftError
from fastdraft.training.backends import (autocast, check_available, mark_step, peak_flops, scaling_for, torch_config_for,
                                        worker_device)
from fastdraft.training.losses import ChunkedLMLoss, output_rows, teacher_topk, to_rows, token_ce

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
TENSOR_COLUMNS = ("input_ids", "loss_mask", "position_ids", "topk_ids", "topk_logprobs", "target_argmax")


@dataclass
class LoopConfig:
    """Everything a worker needs (plain data: it is pickled to every worker)."""

    stage: str
    init_dir: str
    """HF draft directory the weights start from (when there is no checkpoint to resume)."""
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    total_steps: int
    optim: OptimConfig
    compute: ComputeConfig
    token_budget: int | None = None
    """Stop after exactly this many tokens (the last step is cut); None: run `total_steps` full steps."""
    loss: str = "ce"
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    seed: int = 0
    crash_at_step: int | None = None
    crash_marker: str | None = None
    """File written when the injected crash happens, so that it happens once per run, not per attempt."""
    log_path: str | None = None
    """JSONL file where rank 0 appends every reported metrics dict (survives attempts)."""
    validation: list = field(default_factory=list)
    """Held-out micro-batches (numpy dicts, see `validation_batches`), evaluated by rank 0."""
    meta: dict = field(default_factory=dict)
    """DraftMetadata of the starting draft, written into every checkpoint so each is a usable draft."""
    teacher: str | None = None
    """A model (directory or `embedded:` id) whose top-`teacher_topk` log-probs each micro-batch gets before the
    loss (online KD: `losses.teacher_topk`); None: the batches' own `topk_*` columns, if any."""
    teacher_topk: int = 32
    teacher_dtype: str = "float32"


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches this worker consumed in the current epoch (its data position)."""
    resumed_from_step: int | None = None


# ------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested without Ray)
# ------------------------------------------------------------------------------------------------
def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup to `lr`, then cosine to `min_lr_ratio * lr`."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def tokens_per_step(world: int, grad_accum: int, micro_batch_size: int, seq_len: int) -> int:
    return world * grad_accum * micro_batch_size * seq_len


def steps_for_budget(tokens: int, world: int, grad_accum: int, micro_batch_size: int, seq_len: int) -> int:
    """Optimizer steps needed for a token budget (the last one possibly partial)."""
    return max(1, math.ceil(tokens / tokens_per_step(world, grad_accum, micro_batch_size, seq_len)))


def budget_row_lengths(remaining: int, micro: int, rank: int, world: int, rows: int, seq_len: int) -> np.ndarray:
    """How many leading tokens of each row of one micro-batch are inside the budget.

    Rows of a step are ordered by (micro-batch, rank, row); the budget fills them in that order, so every
    worker computes the same split of the last step without communicating.
    """
    first = (micro * world + rank) * rows
    starts = (first + np.arange(rows)) * seq_len
    return np.clip(remaining - starts, 0, seq_len)


def loss_weights(batch: dict[str, torch.Tensor], row_lengths: np.ndarray | None) -> torch.Tensor:
    """Weights of the predicted positions [B, L-1]: the loss mask, cut to the budget's row lengths."""
    ids = batch["input_ids"]
    mask = batch["loss_mask"].float() if "loss_mask" in batch else torch.ones_like(ids, dtype=torch.float32)
    if row_lengths is not None:
        pos = torch.arange(ids.shape[1], device=ids.device)
        mask = mask * (pos[None, :] < torch.as_tensor(row_lengths, device=ids.device)[:, None])
    return mask[:, 1:]


def to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Numpy batch (list columns arrive as object arrays of arrays) -> tensors on `device`."""
    out = {}
    for key in TENSOR_COLUMNS:
        if key in batch:
            value = batch[key]
            if value.dtype == object:
                value = np.stack([np.stack(v) if v.dtype == object else v for v in value])
            if np.issubdtype(value.dtype, np.integer):
                value = value.astype(np.int64)  # embedding and gather indices
            out[key] = torch.as_tensor(value, device=device)
    return out


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------
def micro_batches(shard, state: TrainState, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches across epochs, skipping those this worker already trained on (resume)."""
    while True:
        n = 0
        for batch in shard.iter_batches(batch_size=rows, batch_format="numpy", drop_last=True, prefetch_batches=1):
            n += 1
            if n <= state.batches_in_epoch:
                continue
            state.batches_in_epoch = n
            yield batch
        if n == 0:
            raise FastdraftError("a worker's share of the training data is smaller than one micro-batch; "
                                 "use more data, fewer workers or a smaller micro_batch_size")
        state.epoch += 1
        state.batches_in_epoch = 0


def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D parameters); the token embeddings frozen with
    `optim.freeze_embeddings`.

    On CPU and CUDA it runs torch's fused kernel (one pass over each parameter's weights, gradient and moments): on
    2 cores it made a step of the demo's distillation 1.4x faster than the default per-op AdamW, which spent a third
    of the step on the embeddings' moments. Elsewhere (Gaudi), the default implementation."""
    if optim.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=fused or None)


def save_checkpoint(model, optimizer, state: TrainState, cfg: LoopConfig, directory: Path) -> None:
    """A usable draft directory (weights, tokenizer, metadata) plus the optimizer and data position."""
    from fastdraft.checkpoint import DraftMetadata, save_draft
    from fastdraft.models import TOKENIZER_FILES

    meta = DraftMetadata.from_dict(cfg.meta) if cfg.meta else DraftMetadata("unknown", "")
    meta.extra = {**meta.extra, "in_progress": {"stage": cfg.stage, "step": state.step, "tokens": state.tokens}}
    save_draft(_unwrap(model), None, directory, meta)
    for name in TOKENIZER_FILES:
        if (Path(cfg.init_dir) / name).is_file():
            shutil.copy2(Path(cfg.init_dir) / name, directory / name)
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, directory / STATE_PT)
    (directory / STATE_JSON).write_text(json.dumps(asdict(state)))


def load_start(cfg: LoopConfig, device: torch.device):
    """Model, optimizer and state: from the run's latest checkpoint if there is one, else from `init_dir`."""
    import ray.train

    from fastdraft.checkpoint import load_model
    from fastdraft.models import apply_head_tokens

    ckpt = ray.train.get_checkpoint()
    stage_meta = (cfg.meta or {}).get("extra", {})  # the stage's output layer (it may choose other tokens than its start)
    if ckpt is None:
        model = apply_head_tokens(load_model(cfg.init_dir, device=device), stage_meta).train()
        return model, build_optimizer(model, cfg.optim), TrainState()
    with ckpt.as_directory() as d:
        model = apply_head_tokens(load_model(d, device=device), stage_meta).train()
        optimizer = build_optimizer(model, cfg.optim)
        extra = torch.load(Path(d) / STATE_PT, map_location=device, weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["rng"].cpu())
        state = TrainState(**json.loads((Path(d) / STATE_JSON).read_text()))
    state.resumed_from_step = state.step
    return model, optimizer, state


def load_teacher(cfg: LoopConfig, device: torch.device):
    """The online-KD teacher (frozen, eval mode), or None."""
    if cfg.teacher is None:
        return None
    from fastdraft.checkpoint import load_model

    teacher = load_model(cfg.teacher, dtype=cfg.teacher_dtype, device=device).eval()
    teacher.requires_grad_(False)
    return teacher


def with_teacher(teacher, batch: dict[str, torch.Tensor], cfg: LoopConfig) -> dict[str, torch.Tensor]:
    """`batch` with the teacher's top-k columns added (unchanged without a teacher)."""
    if teacher is None:
        return batch
    ids, logprobs = teacher_topk(teacher, batch["input_ids"].long(), batch.get("position_ids"), cfg.teacher_topk,
                                 cfg.compute.logits_chunk_tokens)
    return {**batch, "topk_ids": ids, "topk_logprobs": logprobs}


def with_teacher_argmax(teacher, batch: dict[str, torch.Tensor], cfg: LoopConfig) -> dict[str, torch.Tensor]:
    """A validation batch with the teacher's top token for each position (`target_argmax`), so that validation
    reports the draft's agreement with the teacher (greedy acceptance at gamma 1); unchanged without a teacher."""
    if teacher is None:
        return batch
    ids, _ = teacher_topk(teacher, batch["input_ids"].long(), batch.get("position_ids"), 1, cfg.compute.logits_chunk_tokens)
    return {**batch, "target_argmax": ids[..., 0]}


@torch.no_grad()
def evaluate(model, batches: list[dict[str, torch.Tensor]], cfg: LoopConfig, device) -> dict[str, float]:
    """Validation CE and perplexity on the masked tokens; draft/target top-1 agreement when the data has it.

    Like the training loss, the output layer runs over `logits_chunk_tokens` positions at a time."""
    model = _unwrap(model).eval()  # unwrapped: DDP's forward would broadcast buffers, a collective rank 0 runs alone
    weight, row_ids = output_rows(model)
    vocab, chunk = model.config.vocab_size, cfg.compute.logits_chunk_tokens
    loss_sum = count = agree = scored = 0.0
    for batch in batches:
        with autocast(cfg.compute, device):
            hidden = model.base_model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        labels = batch["input_ids"][:, 1:].reshape(-1).long()
        w = loss_weights(batch, None).reshape(-1)
        ref = batch["target_argmax"][:, 1:].reshape(-1) if "target_argmax" in batch else None
        for s in range(0, hidden.shape[0], chunk):
            part = slice(s, s + chunk)
            with autocast(cfg.compute, device):
                logits = torch.nn.functional.linear(hidden[part], weight)
            loss_sum += float((token_ce(logits, to_rows(labels[part], row_ids, vocab)) * w[part]).sum())
            if ref is not None:
                top = logits.argmax(-1)
                top = row_ids[top] if row_ids is not None else top
                agree += float(((top == ref[part]) & (ref[part] >= 0)).sum())
                scored += float((ref[part] >= 0).sum())
        count += float(w.sum())
    model.train()
    out = {"val_loss": loss_sum / max(count, 1)}
    out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    if scored:
        out["val_agreement"] = agree / scored
    return out


def validation_batches(table, rows: int, max_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `max_batches` micro-batches of a (small) pyarrow validation table, as numpy dicts.

    Validation data travels in the loop config: it is small, and a second streaming execution per
    worker would cost more than the evaluation itself.
    """
    table = table.slice(0, rows * max_batches)
    columns = [c for c in TENSOR_COLUMNS if c in table.column_names]
    out = []
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        out.append({c: np.array([np.asarray(v) for v in part.column(c).to_pylist()]) for c in columns})
    return out


def _maybe_crash(cfg: LoopConfig, state: TrainState, rank: int) -> None:
    """Testing aid: fail once at `crash_at_step` (the marker file makes it once per run)."""
    if cfg.crash_at_step is None or state.step != cfg.crash_at_step:
        return
    marker = Path(cfg.crash_marker) if cfg.crash_marker else None
    if marker is not None and marker.exists():
        return
    if marker is not None and rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"step": state.step, "tokens": state.tokens}))
    raise RuntimeError(f"injected crash at step {state.step} (crash_at_step, testing aid)")


def train_step(net: ChunkedLMLoss, optimizer, micro: list[dict[str, torch.Tensor]], row_lengths: list, cfg: LoopConfig, device,
               world: int):
    """One optimizer step over `micro`; returns (mean loss over the step's tokens on all workers, grad norm).

    `net` is the draft and its loss (`ChunkedLMLoss`), wrapped in DDP when there are several workers."""
    weights = [loss_weights(b, r) for b, r in zip(micro, row_lengths)]
    local = float(sum(w.sum() for w in weights))
    n_global = max(_all_reduce([local], device)[0], 1.0)
    loss_sum = 0.0
    for i, (batch, w) in enumerate(zip(micro, weights)):
        # Sync gradients only on the last micro-batch; DDP averages over workers, hence "* world".
        sync = contextlib.nullcontext() if (i == len(micro) - 1 or not hasattr(net, "no_sync")) else net.no_sync()
        with sync, autocast(cfg.compute, device):
            loss = net(batch, w)
            (loss / n_global * world).backward()
        mark_step(device)
        loss_sum += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
    optimizer.step()
    mark_step(device)
    optimizer.zero_grad(set_to_none=True)
    return _all_reduce([loss_sum], device)[0] / n_global, float(grad_norm)


def train_loop(config: dict) -> None:
    """`train_loop_per_worker` for `TorchTrainer`: config = {"loop": LoopConfig}."""
    import ray.train
    import ray.train.torch

    cfg: LoopConfig = config["loop"]
    rank, world = _world()
    device = worker_device(cfg.compute)
    if cfg.compute.torch_threads:
        torch.set_num_threads(cfg.compute.torch_threads)
    torch.manual_seed(cfg.seed)
    model, optimizer, state = load_start(cfg, device)
    teacher = load_teacher(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    net = ChunkedLMLoss(model, cfg.loss, cfg.compute.logits_chunk_tokens)
    if world > 1:
        net = ray.train.torch.prepare_model(net, move_to_device=device)
    val = [with_teacher_argmax(teacher, to_tensors(b, device), cfg) for b in cfg.validation] if rank == 0 else []
    batches = micro_batches(ray.train.get_dataset_shard("train"), state, cfg.micro_batch_size)
    per_step = tokens_per_step(world, cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len)
    meter = _Meter(cfg, state, world, n_params, peak_flops(device), rank)
    while state.step < cfg.total_steps:
        remaining = cfg.token_budget - state.tokens if cfg.token_budget is not None else per_step
        cut = remaining < per_step
        micro, lengths = [], []
        for i in range(cfg.grad_accum):
            micro.append(with_teacher(teacher, to_tensors(next(batches), device), cfg))
            lengths.append(budget_row_lengths(remaining, i, rank, world, cfg.micro_batch_size, cfg.seq_len) if cut else None)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, cfg.total_steps, cfg.optim)
        loss, grad_norm = train_step(net, optimizer, micro, lengths, cfg, device, world)
        state.step += 1
        state.tokens += min(remaining, per_step)
        meter.step(min(remaining, per_step), loss, grad_norm, optimizer.param_groups[0]["lr"])
        _maybe_crash(cfg, state, rank)
        last = state.step >= cfg.total_steps or (cfg.token_budget is not None and state.tokens >= cfg.token_budget)
        if last or state.step % cfg.eval_every == 0 or state.step % cfg.ckpt_every == 0:
            metrics = meter.metrics(loss, grad_norm, optimizer.param_groups[0]["lr"])
            if rank == 0 and val:
                metrics.update(evaluate(model, val, cfg, device))
            _report(model, optimizer, state, cfg, metrics, rank, checkpoint=last or state.step % cfg.ckpt_every == 0)
        if last:
            break
    meter.done()


def _report(model, optimizer, state: TrainState, cfg: LoopConfig, metrics: dict, rank: int, checkpoint: bool) -> None:
    """`ray.train.report` on every worker (it is a barrier); rank 0 attaches the checkpoint and logs."""
    import ray.train

    if rank == 0 and cfg.log_path:
        with open(cfg.log_path, "a") as f:
            f.write(json.dumps({**metrics, "checkpoint": checkpoint}) + "\n")
    if not checkpoint or rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="fastdraft-ckpt-") as tmp:
        save_checkpoint(model, optimizer, state, cfg, Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{state.step:07d}")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Meter:
    """Throughput (tokens/s total and per worker, MFU on accelerators) and progress lines on rank 0."""

    def __init__(self, cfg: LoopConfig, state: TrainState, world: int, n_params: int, peak: float | None, rank: int):
        from fastdraft.progress import Progress

        self.cfg, self.state, self.world, self.n_params, self.peak, self.rank = cfg, state, world, n_params, peak, rank
        total = (cfg.token_budget or cfg.total_steps * tokens_per_step(world, cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len))
        label = cfg.stage + (f" (resumed at step {state.step})" if state.resumed_from_step else "")
        self.progress = Progress(label, unit="tok", total=total - state.tokens, every_s=float("inf"))
        self._last_print = time.perf_counter()

    def step(self, tokens: int, loss: float, grad_norm: float, lr: float) -> None:
        self.progress.update(tokens)
        now = time.perf_counter()
        if self.rank == 0 and (now - self._last_print >= float(os.environ.get("FASTDRAFT_PROGRESS_S", "10")) or self.state.step == 1):
            self._last_print = now
            self.progress.emit(f"{self.progress.line()} | step {self.state.step}/{self.cfg.total_steps} | loss {loss:.4f} | "
                               f"lr {lr:.2e} | {self.progress.rate / self.world:,.0f} tok/s/worker")

    def metrics(self, loss: float, grad_norm: float, lr: float) -> dict:
        rate = self.progress.rate
        out = {"stage": self.cfg.stage, "step": self.state.step, "tokens": self.state.tokens, "epoch": self.state.epoch,
               "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": rate, "tokens_per_s_per_worker": rate / self.world,
               "world_size": self.world, "resumed_from_step": self.state.resumed_from_step, "peak_rss_mb": peak_rss_mb()}
        if self.peak:  # 6 N FLOPs per token for forward + backward (attention FLOPs left out: short sequences)
            out["mfu"] = 6 * self.n_params * rate / (self.peak * self.world)
        return out

    def done(self) -> None:
        if self.rank == 0:
            self.progress.done()


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------
def fit(cfg: LoopConfig, datasets: dict, run_name: str, storage: Path, checkpoint_config=None):
    """Run the loop on Ray Train; re-running with the same `run_name` + `storage` resumes the run.

    Returns the Ray Train `Result` (its `checkpoint` is the final one).
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    check_available(cfg.compute)
    # Deterministic block order, so that a resumed worker's shard holds the same rows in the same order.
    opts = ray.train.DataConfig.default_ingest_options()
    opts = ExecutionOptions(resource_limits=opts.resource_limits, exclude_resources=opts.exclude_resources,
                            preserve_order=True, verbose_progress=False)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": cfg},
        scaling_config=scaling_for(cfg.compute),
        torch_config=torch_config_for(cfg.compute),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=opts),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(Path(storage).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.compute.max_failures),
            checkpoint_config=checkpoint_config or ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def export_draft(checkpoint, out: Path, meta) -> Path:
    """Copy a checkpoint's draft files (not the optimizer state) to `out` atomically, with final metadata."""
    from fastdraft.checkpoint import write_metadata

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with checkpoint.as_directory() as d:
        shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(STATE_PT, STATE_JSON))
    write_metadata(tmp, meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_log(path: str | Path) -> list[dict]:
    """The metrics rank 0 reported, in order, across attempts."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
