"""The prepared device check: one command, torch and transformers only (the GPU machine has no Ray or vLLM).

    python -m jobs.device_check --out runs/device_check           # on a GPU: the paper's shapes, <= 8 minutes
    python -m jobs.device_check --tiny --device cpu --out /tmp/dc  # the same script at tiny shapes (the tests)

Parts (each prints a table and goes into <out>/device_check.json):
  train   one bf16 training step at the llama31-8b recipe's draft shape, sequence length and micro-batch (the
          chunked loss, as the training loop runs it): peak memory, tokens/s and MFU, with `fastdraft plan`'s
          estimate beside the peak.
  engine  fastdraft's engine on the device with a bf16 agreeing pair in Llama-3.1-8B's shape (random weights, the
          target's upper layers identity, the draft its first layer with the same embeddings and head): greedy
          output must equal transformers' `generate`; speedup against transformers' assisted generation at
          gamma 3 and 5, and against the target alone.
  loss    the chunked LM loss against the plain full-logits one: their values, and the memory each takes.
On CPU, peak memory is the process's resident set above its level before the part (each part runs in a fresh
subprocess, so one part's freed memory does not hide the next one's); on CUDA it is torch's allocator peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

GB = 1e9


def rss_bytes() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> float:
    """The process's peak resident set since it started (this program, not the process it was spawned from)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakMemory:
    """Peak memory of what runs inside the block: torch's allocator on CUDA, the resident set on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:  # VmHWM: this address space's peak. Not ru_maxrss: across exec it keeps the parent's peak (vfork)
            self.peak = peak_rss_bytes() - self.base


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
def paper_shapes(tiny: bool) -> dict:
    """The llama31-8b recipe's draft, sequence length and micro-batch (tiny: a few-MB stand-in, same code)."""
    from fastdraft.config import load_recipe
    from fastdraft.plan import draft_config_for, target_config

    recipe = load_recipe(Path(__file__).resolve().parent / "recipes" / "llama31-8b.yaml")
    target, _ = target_config(recipe)
    if tiny:
        from transformers import LlamaConfig

        target = LlamaConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=704, max_position_embeddings=1024,
                             tie_word_embeddings=False)
        draft = LlamaConfig(**{**target.to_dict(), "num_hidden_layers": 2, "tie_word_embeddings": True})
        return {"recipe": recipe, "target": target, "draft": draft, "seq_len": 128, "rows": 4}
    return {"recipe": recipe, "target": target, "draft": draft_config_for(recipe, target),
            "seq_len": recipe.prepare.seq_len, "rows": recipe.pretrain.micro_batch_size}


# ------------------------------------------------------------------------------------------------
# (a) one training step
# ------------------------------------------------------------------------------------------------
def train_part(device: torch.device, tiny: bool, shapes: dict | None = None, loss: str = "ce", topk: int = 0,
               loss_fraction: float = 1.0) -> dict:
    """One optimizer step (2 micro-batches when `tiny`, to include the optimizer state) on random tokens."""
    from transformers import AutoModelForCausalLM

    from fastdraft.config import ComputeConfig, OptimConfig
    from fastdraft.plan import params_of, training_items
    from fastdraft.training.backends import peak_flops
    from fastdraft.training.loop import LoopConfig, build_optimizer, train_step
    from fastdraft.training.losses import ChunkedLMLoss

    shapes = shapes or paper_shapes(tiny)
    cfg, rows, seq = shapes["draft"], shapes["rows"], shapes["seq_len"]
    precision = "fp32" if device.type == "cpu" else "bf16"
    compute = ComputeConfig(device=device.type, precision=precision, num_workers=1)
    loop = LoopConfig(stage="PT", init_dir="", seq_len=seq, micro_batch_size=rows, grad_accum=1, total_steps=1,
                      optim=OptimConfig(lr=1e-4), compute=compute, loss=loss)
    g = torch.Generator().manual_seed(0)
    # Packed rows, as pre-training's shards hold them: two documents per row, positions restarting at the second
    # (transformers then masks attention across them).
    positions = torch.arange(seq).repeat(rows, 1)
    positions[:, seq // 2:] -= seq // 2
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (rows, seq), generator=g), "position_ids": positions}
    if loss_fraction < 1:  # distillation: the prompt part of each row carries no loss
        mask = torch.zeros(rows, seq, dtype=torch.long)
        mask[:, int(seq * (1 - loss_fraction)):] = 1
        batch["loss_mask"] = mask
    if topk:
        batch["topk_ids"] = torch.randint(0, cfg.vocab_size, (rows, seq, topk), generator=g)
        batch["topk_logprobs"] = torch.log_softmax(torch.randn(rows, seq, topk + 1, generator=g), -1)[..., :topk]
    batch = {k: v.to(device) for k, v in batch.items()}
    estimate = sum(i.bytes for i in training_items(cfg, rows, seq, compute, None, topk, loss_fraction))
    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(device).train()
        optimizer = build_optimizer(model, loop.optim)
        net = ChunkedLMLoss(model, loss, compute.logits_chunk_tokens)
        times = []
        for _ in range(2):  # the second step has the optimizer's moments allocated, like every later step
            start = time.perf_counter()
            train_step(net, optimizer, [batch], [None], loop, device, world=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    n = params_of(cfg)
    tps = rows * seq / times[-1]
    flops = peak_flops(device)
    return {"part": "train", "device": str(device), "params": n, "rows": rows, "seq_len": seq, "precision": precision,
            "loss": loss, "peak_gb": mem.peak / GB, "plan_estimate_gb": estimate / GB,
            "estimate_over_peak": estimate / mem.peak if mem.peak else None,
            "tokens_per_s": tps, "mfu": 6 * n * tps / flops if flops else None}


def custom_training(spec: dict) -> dict:
    """train_part's arguments for a JSON spec: a Llama draft shape, rows, seq_len, loss, topk, loss_fraction."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                      num_attention_heads=spec["heads"], num_key_value_heads=spec.get("kv_heads", spec["heads"]),
                      intermediate_size=spec["intermediate"], max_position_embeddings=max(2048, spec["seq_len"]),
                      tie_word_embeddings=True)
    return {"shapes": {"draft": cfg, "rows": spec["rows"], "seq_len": spec["seq_len"]}, "loss": spec.get("loss", "ce"),
            "topk": spec.get("topk", 0), "loss_fraction": spec.get("loss_fraction", 1.0)}


# ------------------------------------------------------------------------------------------------
# (b) the engine against transformers' assisted generation
# ------------------------------------------------------------------------------------------------
def engine_part(device: torch.device, tiny: bool, new_tokens: int = 64) -> dict:
    from fastdraft.speculative.engine import SpeculativeEngine
    from fastdraft.speculative.pairs import agreeing_pair
    from fastdraft.speculative.types import SamplingParams

    t = paper_shapes(tiny)["target"]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    target, draft = agreeing_pair(vocab_size=t.vocab_size, hidden=t.hidden_size, layers=t.num_hidden_layers,
                                  draft_layers=1, heads=t.num_attention_heads, kv_heads=t.num_key_value_heads,
                                  intermediate=t.intermediate_size, dtype=dtype)
    target, draft = target.to(device), draft.to(device)
    for m in (target, draft):
        m.generation_config.eos_token_id = None
    prompt = torch.randint(3, t.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)

    def timed(fn):
        fn()  # warm-up (kernels, caches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    hf = dict(do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)  # eos_token_id None: no stop, no EOS masking
    reference, t_alone = timed(lambda: target.generate(prompt, **hf)[0, prompt.shape[1]:].tolist())
    rows = [{"row": "transformers target alone", "gamma": 0, "s": t_alone, "same": True}]
    params = SamplingParams(max_new_tokens=new_tokens)  # greedy, no stop tokens: exactly new_tokens, like generate above
    for gamma in (3, 5):
        cfg = draft.generation_config
        cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = gamma, "constant", 0.0
        assisted, t_assisted = timed(lambda: target.generate(prompt, assistant_model=draft, **hf)[0, prompt.shape[1]:].tolist())
        engine = SpeculativeEngine(target, draft, gamma=gamma)
        (result,), t_engine = timed(lambda: engine.generate([prompt[0].tolist()], params, gamma=gamma))
        rows.append({"row": "transformers assisted", "gamma": gamma, "s": t_assisted, "same": assisted == reference})
        rows.append({"row": "fastdraft engine", "gamma": gamma, "s": t_engine, "same": result.token_ids == reference,
                     "vs_assisted": t_assisted / t_engine, "vs_target_alone": t_alone / t_engine,
                     "acceptance": result.stats.acceptance_rate if result.stats else None})
    return {"part": "engine", "device": str(device), "dtype": str(dtype), "new_tokens": new_tokens, "rows": rows,
            "greedy_identical": all(r["same"] for r in rows)}


# ------------------------------------------------------------------------------------------------
# (c) the chunked loss against the plain one
# ------------------------------------------------------------------------------------------------
def loss_part(device: torch.device, tiny: bool, path: str) -> dict:
    """Forward + backward of one micro-batch's loss only: `path` plain (full logits) or chunked."""
    from transformers import AutoModelForCausalLM

    from fastdraft.training.losses import ChunkedLMLoss, per_token_loss

    shapes = paper_shapes(tiny)
    cfg, rows, seq = shapes["draft"], max(1, shapes["rows"] // (1 if tiny else 4)), shapes["seq_len"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0)).to(device)}
    weights = torch.ones(rows, seq - 1, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu")
    with PeakMemory(device) as mem, autocast:
        if path == "plain":
            logits = model(input_ids=batch["input_ids"]).logits
            loss = (per_token_loss("ce", logits, batch) * weights).sum()
        else:
            loss = ChunkedLMLoss(model, "ce", chunk_tokens=64 if tiny else 2048)(batch, weights)
        loss.backward()
    grad_norm = float(torch.norm(torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None])))
    return {"part": "loss", "path": path, "rows": rows, "seq_len": seq, "vocab": cfg.vocab_size,
            "loss": float(loss), "grad_norm": grad_norm, "peak_gb": mem.peak / GB}


# ------------------------------------------------------------------------------------------------
def run_in_subprocess(args: list[str]) -> dict:
    """One part in a fresh process (clean memory peak); returns its JSON result."""
    out = subprocess.run([sys.executable, "-m", "jobs.device_check", "--one", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"device_check {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU tests)")
    ap.add_argument("--parts", default="train,engine,loss")
    ap.add_argument("--out", default="runs/device_check")
    ap.add_argument("--one", nargs="*", help=argparse.SUPPRESS)  # internal: run one part, print its JSON
    args, rest = ap.parse_known_args(argv)
    if args.one is not None:
        part, device, tiny = args.one[0], torch.device(args.one[1]), args.one[2] == "tiny"
        custom = json.loads(args.one[3]) if len(args.one) > 3 else None
        result = {"train": lambda: train_part(device, tiny, **(custom_training(custom) if custom else {})),
                  "engine": lambda: engine_part(device, tiny),
                  "loss-plain": lambda: loss_part(device, tiny, "plain"),
                  "loss-chunked": lambda: loss_part(device, tiny, "chunked")}[part]()
        print(json.dumps(result))
        return result
    size = "tiny" if args.tiny else "full"
    results: dict = {"device": args.device, "size": size,
                     "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    parts = args.parts.split(",")
    if "train" in parts:
        r = results["train"] = run_in_subprocess(["train", args.device, size])
        print(f"train: {r['params'] / 1e6:.0f}M draft, {r['rows']} x {r['seq_len']} tokens, {r['precision']}: peak "
              f"{r['peak_gb']:.2f} GB (plan's estimate {r['plan_estimate_gb']:.2f} GB, x{r['estimate_over_peak']:.2f}), "
              f"{r['tokens_per_s']:,.0f} tokens/s" + (f", MFU {r['mfu']:.1%}" if r["mfu"] else ""), flush=True)
    if "engine" in parts:
        r = results["engine"] = run_in_subprocess(["engine", args.device, size])
        print(f"engine ({r['dtype']}, {r['new_tokens']} new tokens), greedy identical: {r['greedy_identical']}")
        for row in r["rows"]:
            extra = f"  {row['vs_assisted']:.2f}x assisted, {row['vs_target_alone']:.2f}x target alone" if "vs_assisted" in row else ""
            print(f"  {row['row']:<26} gamma {row['gamma']}  {row['s']:.3f} s  same {row['same']}{extra}", flush=True)
    if "loss" in parts:
        plain, chunked = (run_in_subprocess([f"loss-{p}", args.device, size]) for p in ("plain", "chunked"))
        results["loss"] = {"plain": plain, "chunked": chunked,
                           "loss_rel_diff": abs(plain["loss"] - chunked["loss"]) / abs(plain["loss"]),
                           "grad_norm_rel_diff": abs(plain["grad_norm"] - chunked["grad_norm"]) / plain["grad_norm"]}
        print(f"loss ({plain['rows']} x {plain['seq_len']} x {plain['vocab']}): plain {plain['loss']:.4f} peak "
              f"{plain['peak_gb']:.2f} GB; chunked {chunked['loss']:.4f} peak {chunked['peak_gb']:.2f} GB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'device_check.json'}")
    return results


if __name__ == "__main__":
    main()
