"""Benchmark: tokens/s and peak memory of the Ray Train loop vs a plain single-process PyTorch loop.

Same draft, same micro-batch, same rows, same number of steps, measured side by side in one run; prints a
table and writes JSON with the ratio (goal: >= 0.9 on CPU with one worker).

    python jobs/bench_train.py                                   # SmolLM2 vocabulary, 2 x 256 draft, CPU
    python jobs/bench_train.py --target DIR --layers 8 --hidden 512 --device cuda --precision bf16 --steps 50
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/bench_train.py --device cuda

The Ray number is measured inside the worker (the loop's own tokens/s, startup excluded); the plain loop is
timed the same way: from its first step to its last. Both use `--threads` torch threads. The plain loop runs
before and after the Ray run and the ratio is against their mean, so load that drifts during the run (a
shared machine) weighs on both sides alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, under `ray job submit`

from jobs.benchlib import write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def plain_loop(draft_dir: Path, rows: np.ndarray, micro_batch: int, steps: int, lr: float, device: str, precision: str) -> dict:
    """The baseline: load, then forward / CE / backward / clip / AdamW, nothing else (AdamW fused, as fastdraft's loop
    runs it: the comparison is the loop's overhead, not the optimizer's kernel)."""
    from fastdraft.checkpoint import load_model
    from fastdraft.training.loop import peak_rss_mb

    model = load_model(draft_dir, device=device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device in ("cpu", "cuda"))
    start = time.perf_counter()
    for step in range(steps):
        ids = torch.as_tensor(rows[step * micro_batch:(step + 1) * micro_batch], dtype=torch.long, device=device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"tokens_per_s": steps * rows.shape[1] * micro_batch / elapsed, "peak_rss_mb": peak_rss_mb(), "loss": float(loss)}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def ray_loop(draft_dir: Path, rows: np.ndarray, args, work: Path) -> dict:
    import ray.data

    from fastdraft.config import ComputeConfig, OptimConfig
    from fastdraft.training.loop import LoopConfig, fit

    compute = ComputeConfig(device=args.device, num_workers=args.workers, cpus_per_worker=args.cpus_per_worker, precision=args.precision,
                            max_failures=0, torch_threads=args.threads)
    cfg = LoopConfig(stage="bench", init_dir=str(draft_dir), seq_len=rows.shape[1], micro_batch_size=args.micro_batch, grad_accum=1,
                     total_steps=args.steps, optim=OptimConfig(lr=args.lr, warmup_steps=0, min_lr_ratio=1.0), compute=compute,
                     eval_every=10**9, ckpt_every=10**9, log_path=str(work / "bench.metrics.jsonl"))
    ds = ray.data.from_items([{"input_ids": r} for r in rows])
    result = fit(cfg, {"train": ds}, f"bench-{int(time.time())}", work / "train")
    m = result.metrics
    return {"tokens_per_s": m["tokens_per_s"], "peak_rss_mb": m["peak_rss_mb"], "loss": m["loss"], "world_size": m["world_size"],
            **({"mfu": m["mfu"]} if "mfu" in m else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="embedded:smollm2-135m-instruct", help="target whose vocabulary the draft uses")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "hpu"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each loop (CPU)")
    p.add_argument("--out", default="runs/bench/bench_train.json")
    args = p.parse_args(argv)

    from fastdraft.models import make_draft
    from fastdraft.raycluster import ensure_ray

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        draft_dir, summary = make_draft(args.target, work / "draft", layers=args.layers, hidden=args.hidden)
        vocab = json.loads((draft_dir / "config.json").read_text())["vocab_size"]
        # Rows for every worker's steps, so both loops see real (random) token ids in the same order.
        rows = np.random.default_rng(0).integers(0, vocab, (args.steps * args.micro_batch * args.workers, args.seq_len), dtype=np.int32)
        torch.set_num_threads(args.threads)
        device = args.device if args.device != "hpu" else "cpu"
        before = plain_loop(draft_dir, rows, args.micro_batch, args.steps, args.lr, device, args.precision)
        ensure_ray()
        ray_side = ray_loop(draft_dir, rows, args, work)
        after = plain_loop(draft_dir, rows, args.micro_batch, args.steps, args.lr, device, args.precision)
    plain = {**after, "tokens_per_s": (before["tokens_per_s"] + after["tokens_per_s"]) / 2,
             "tokens_per_s_before": before["tokens_per_s"], "tokens_per_s_after": after["tokens_per_s"]}
    ratio = ray_side["tokens_per_s"] / ray_side["world_size"] / plain["tokens_per_s"]
    report = {"draft": summary, "settings": vars(args), "plain": plain, "ray_train": ray_side, "ratio_per_worker": ratio}
    print(f"{'loop':<22}{'tokens/s':>12}{'peak RSS MiB':>15}{'final loss':>12}")
    for name, r in (("plain torch (before)", before), ("Ray Train", ray_side), ("plain torch (after)", after)):
        print(f"{name:<22}{r['tokens_per_s']:>12,.0f}{r['peak_rss_mb']:>15,.0f}{r['loss']:>12.3f}")
    print(f"Ray Train / plain (per worker): {ratio:.2f}  (goal >= 0.9 on CPU with one worker)")
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
