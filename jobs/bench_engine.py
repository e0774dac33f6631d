"""Benchmark: fastdraft's speculative engine vs transformers, side by side in one run.

    python -m jobs.bench_engine                          # both pairs, 128 new tokens, greedy, batch 1
    python -m jobs.bench_engine --pair agreeing --gammas 1,3,5,8 --out runs/bench/engine.json
    ray job submit --working-dir . -- python -m jobs.bench_engine --device cuda

Pairs (issue 7):
  agreeing  a ~82M target whose upper layers are identity and a ~13M draft made of its first layer
            (same embeddings and head): acceptance ~100%, so what separates the measured speedup from
            the memory-bound bound is engine overhead. The same draft with its final norm negated
            ("random draft": same cost, acceptance ~0) shows the cost of a bad draft, static and dynamic gamma.
  demo      the embedded SmolLM2-135M-Instruct target with the demo's draft (trained, from
            runs/demo/drafts/{FT,CP,PT}, else the factory's untrained 4 x 256 draft) and with itself as a
            "perfect draft" (the ceiling).
Rows: transformers target alone (`generate`), transformers assisted generation (constant
`num_assistant_tokens`, confidence threshold 0), fastdraft gamma 0 (target alone, same loop), static gammas
and dynamic gamma, static gammas with the draft's matrices in int8 (where the native kernel runs it; c in bytes); with the `openvino` extra installed, OpenVINO GenAI's target alone and its speculative
pipeline (the same float32 weights exported to IR, f32 precision hints, constant `num_assistant_tokens`), and the
same pipeline with the draft's weights compressed to int8 by NNCF, as `fastdraft export --format openvino` ships it.

Every configuration runs once per repeat, interleaved, in reverse order every other repeat (a machine that
slows down or speeds up during the run favours no row); ratios between rows are taken within each repeat and
their median is reported. Reported: ms/token (wall clock, prefill included), tokens/s, speedup vs both
target-alone rows and vs the row's own target alone (xOwn), vs assisted generation at the same gamma, AR, tau,
MBSU = tau / (1 + gamma * c) (the memory-bound bound), efficiency = xOwn / MBSU (transformers and OpenVINO rows
have no counters: they take the bound of fastdraft's row with the same draft and gamma, whose greedy output is
the same), `dec`, the same efficiency over the decode phase alone (the engine's own draft + verify + overhead
seconds: MBSU bounds decoding, while the prefill is the same work in both rows and compute-bound), and where
the engine's time goes (draft / verify / overhead). Greedy outputs are checked against transformers' (`same`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastdraft.evaluation.metrics import CostRatio
from fastdraft.quantize import round_model_to_int8_
from fastdraft.speculative.decoders import resolve_weights
from fastdraft.speculative.engine import SpeculativeEngine
from fastdraft.speculative.pairs import agreeing_pair, disagreeing_copy
from fastdraft.speculative.types import SamplingParams, SpecStats
from jobs.benchlib import write_json

DEMO_PROMPTS = ["Write a Python function that checks whether a number is prime.",
                "Explain what a hash table is in two sentences.",
                "Give me three tips for writing clear documentation."]


@dataclass
class Row:
    pair: str
    name: str
    gamma: int | None
    run: Callable[[list[int]], tuple[list[int], SpecStats | None]]
    c: float = 0.0
    draft: str = ""
    alone: str = "fastdraft target alone"  # the row its speedup and efficiency are measured against
    times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)  # engine rows: seconds per token outside the prefill
    stats: SpecStats = field(default_factory=SpecStats)
    outputs: list[list[int]] = field(default_factory=list)


def hf_runner(target, max_new: int, assistant=None, gamma: int = 0):
    """transformers' greedy `generate`, alone or with `assistant_model` at a constant gamma."""
    # Both sides emit exactly max_new tokens: no EOS stop (and no EOS masking by min_new_tokens).
    target.generation_config.eos_token_id = None
    if assistant is not None:
        assistant.generation_config.eos_token_id = None
        cfg = assistant.generation_config
        cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule = gamma, "constant"
        cfg.assistant_confidence_threshold = 0.0  # the 0.4 default can stop the draft after one token

    def run(prompt: list[int]):
        ids = torch.tensor([prompt], device=target.device)
        kwargs = {"assistant_model": assistant} if assistant is not None else {}
        with torch.inference_mode():
            out = target.generate(ids, do_sample=False, max_new_tokens=max_new, pad_token_id=0, **kwargs)
        return out[0, len(prompt):].tolist(), None
    return run


def engine_runner(engine: SpeculativeEngine, max_new: int, gamma: int):
    params = SamplingParams(max_new_tokens=max_new)  # no stop tokens: every row emits exactly max_new

    def run(prompt: list[int]):
        [result] = engine.generate([prompt], params, gamma=gamma)
        return result.token_ids, result.stats
    return run


def openvino_runner(pipeline, max_new: int, gamma: int = 0):
    """OpenVINO GenAI's LLMPipeline (`fastdraft.speculative.openvino`), greedy, exactly max_new tokens."""
    def run(prompt: list[int]):
        return pipeline.generate(prompt, max_new, gamma), None
    return run


def rows_for_pair(pair: str, target, drafts: dict, gammas: list[int], hf_gamma: int, max_new: int,
                  backend: str, openvino_dir: Path | None = None, threads: int = 0) -> list[Row]:
    """All configurations of one target: HF alone, HF assisted, engine alone, engine x drafts x gammas, and
    OpenVINO GenAI alone and speculative (models exported under `openvino_dir`) when it is given."""
    alone = SpeculativeEngine(target, None, backend=backend)
    rows = [Row(pair, "transformers target alone", None, hf_runner(target, max_new), alone="transformers target alone"),
            Row(pair, "fastdraft target alone", 0, engine_runner(alone, max_new, 0))]
    if openvino_dir is not None:
        from fastdraft.speculative import openvino

        print(f"[bench_engine] exporting the {pair} pair to OpenVINO IR under {openvino_dir}", flush=True)
        target_ir = openvino.export_ir(target, openvino_dir / "target")
        rows.append(Row(pair, "openvino target alone", None,
                        openvino_runner(openvino.GenAIPipeline(target_ir, threads=threads), max_new),
                        alone="openvino target alone"))
    for i, (label, draft) in enumerate(drafts.items()):
        engine = SpeculativeEngine(target, draft, backend=backend)
        dynamic = SpeculativeEngine(target, draft, gamma=3, dynamic_gamma=True, max_gamma=max(gammas), backend=backend)
        c = engine.param_ratio
        rows.append(Row(pair, f"transformers assisted, {label}", hf_gamma, hf_runner(target, max_new, draft, hf_gamma), c, label,
                        alone="transformers target alone"))
        if openvino_dir is not None:
            pipeline = openvino.GenAIPipeline(target_ir, openvino.export_ir(draft, openvino_dir / f"draft{i}"), threads)
            rows.append(Row(pair, f"openvino speculative, {label}", hf_gamma, openvino_runner(pipeline, max_new, hf_gamma), c,
                            label, alone="openvino target alone"))
            # The paper's deployment: the draft exported as `fastdraft export --format openvino` does (NNCF int8 weights)
            int8_ir = openvino.export_ir(draft, openvino_dir / f"draft{i}-int8", weights="int8")
            pipeline8 = openvino.GenAIPipeline(target_ir, int8_ir, threads)
            c_int8 = CostRatio.of(draft, target, "int8").bytes  # a byte a weight (+ per-channel scales), like NNCF's
            rows.append(Row(pair, f"openvino speculative, NNCF int8 draft, {label}", hf_gamma,
                            openvino_runner(pipeline8, max_new, hf_gamma), c_int8, label, alone="openvino target alone"))
        rows += [Row(pair, f"fastdraft, {label}", g, engine_runner(engine, max_new, g), c, label) for g in gammas]
        rows.append(Row(pair, f"fastdraft dynamic, {label}", None, engine_runner(dynamic, max_new, 3), c, label))
        if resolve_weights(draft, "auto", backend) == "int8":  # the same draft, its matrices streamed as int8
            rounded = round_model_to_int8_(copy.deepcopy(draft))
            engine8 = SpeculativeEngine(target, rounded, backend=backend, draft_weights="int8")
            c8 = CostRatio.of(rounded, target, "int8").bytes  # the bound counts the bytes a draft step reads
            rows += [Row(pair, f"fastdraft int8 draft, {label}", g, engine_runner(engine8, max_new, g), c8, label)
                     for g in gammas]
    return rows


def openvino_export_dir(args, pair: str) -> Path | None:
    """Where to export the pair for the OpenVINO rows, or None without them (--openvino auto: when installed)."""
    import importlib.util

    if args.openvino == "no" or (args.openvino == "auto" and importlib.util.find_spec("openvino_genai") is None):
        return None
    if args.device != "cpu":
        raise SystemExit("the OpenVINO rows run on CPU only (--openvino no with --device cuda)")
    return Path(args.out).parent / "openvino" / pair


def agreeing_rows(args) -> tuple[list[Row], list[list[int]]]:
    shape = dict(vocab_size=args.agreeing_vocab, hidden=args.agreeing_hidden, layers=args.agreeing_layers,
                 heads=args.agreeing_hidden // 64, kv_heads=max(1, args.agreeing_hidden // 192),
                 intermediate=args.agreeing_hidden * 8 // 3)
    target, draft = agreeing_pair(seed=0, **shape)
    random_draft = disagreeing_copy(draft)  # same size and speed, proposals never match: acceptance ~0
    dev = torch.device(args.device)
    target, draft, random_draft = target.to(dev), draft.to(dev), random_draft.to(dev)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, target.config.vocab_size, (32,), generator=g).tolist() for _ in range(args.prompts)]
    drafts = {"agreeing draft": draft, "random draft": random_draft}
    return rows_for_pair("agreeing", target, drafts, args.gammas, args.hf_gamma, args.max_new_tokens, args.backend,
                         openvino_export_dir(args, "agreeing"), args.threads), prompts


def demo_rows(args) -> tuple[list[Row], list[list[int]]]:
    from fastdraft.checkpoint import load_model
    from fastdraft.models import make_draft
    from fastdraft.tokenizer import load_tokenizer

    target_dir = "embedded:smollm2-135m-instruct"
    target = load_model(target_dir, device=args.device)
    trained = [Path(args.demo_run) / "drafts" / s for s in ("FT", "CP", "PT")]
    draft_dir = next((d for d in trained if (d / "config.json").is_file()), None)
    label = f"demo draft {draft_dir.name}" if draft_dir else "untrained demo draft"
    if draft_dir is None:
        draft_dir, _ = make_draft(target_dir, Path(args.out).parent / "untrained-draft", layers=4, hidden=256, seed=0)
    tok = load_tokenizer(target_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for t in DEMO_PROMPTS[:args.prompts]]
    drafts = {label: load_model(draft_dir, device=args.device), "perfect draft (the target)": target}
    return rows_for_pair("demo", target, drafts, args.gammas, args.hf_gamma, args.max_new_tokens, args.backend,
                         openvino_export_dir(args, "demo"), args.threads), prompts


def measure(rows: list[Row], prompts: list[list[int]], repeats: int, max_new: int) -> None:
    """Warm every row up, then run all rows `repeats` times, interleaved; keep per-row seconds/token."""
    for row in rows:
        row.run(prompts[0][:8])
    for rep in range(repeats):
        for row in rows if rep % 2 == 0 else rows[::-1]:
            start = time.perf_counter()
            stats, outputs = SpecStats(), []
            for prompt in prompts:
                ids, s = row.run(prompt)
                outputs.append(ids)
                if s is not None:
                    stats += s
            tokens = max_new * len(prompts)
            row.times.append((time.perf_counter() - start) / tokens)
            row.decode_times.append(stats.decode_s / tokens)
            row.stats, row.outputs = stats, outputs
        print(f"  repeat {rep + 1}/{repeats} done", flush=True)


def paired(base: list[float], times: list[float]) -> float:
    """Median over repeats of base / times: each ratio compares two rows measured moments apart."""
    return statistics.median(b / t for b, t in zip(base, times))


def summarize(rows: list[Row]) -> list[dict]:
    base_hf = next(r for r in rows if r.name == "transformers target alone")
    base_fd = next(r for r in rows if r.name == "fastdraft target alone")
    out = []
    for r in rows:
        t = statistics.median(r.times)
        s = r.stats
        # The bound from the row's own counters, or (transformers, OpenVINO: no counters) from fastdraft's row with
        # the same draft and gamma, which emits the same greedy tokens.
        counted = r if s.target_passes else next((a for a in rows if a.name.startswith("fastdraft, ") and r.draft
                                                  and a.draft == r.draft and a.gamma == r.gamma), None)
        cs = counted.stats if counted else None
        gamma = r.gamma if r.gamma is not None else (s.drafted / s.target_passes if s.target_passes else None)
        bound = cs.tau / (1 + gamma * r.c) if cs and gamma is not None else None
        assisted = next((a for a in rows if a.name.startswith("transformers assisted") and r.draft and a.draft == r.draft), None)
        own = paired(next(a for a in rows if a.name == r.alone).times, r.times)
        decode_speedup = paired(base_fd.decode_times, r.decode_times) if s.target_passes else None
        total = s.decode_s
        out.append({
            "pair": r.pair, "config": r.name, "gamma": r.gamma, "mean_gamma": gamma, "ms_per_token": t * 1e3,
            "tokens_per_s": 1 / t, "speedup_vs_transformers_alone": paired(base_hf.times, r.times),
            "speedup_vs_fastdraft_alone": paired(base_fd.times, r.times), "speedup_vs_own_target_alone": own,
            "x_transformers_assisted": paired(assisted.times, r.times) if assisted and r.gamma == assisted.gamma else None,
            "acceptance_rate": s.acceptance_rate if s.drafted else None, "tau": s.tau if s.target_passes else None,
            "c": r.c, "mbsu_bound": bound, "efficiency": own / bound if bound else None,
            "decode_ms_per_token": statistics.median(r.decode_times) * 1e3 if s.target_passes else None,
            "decode_speedup_vs_fastdraft_alone": decode_speedup,
            "decode_efficiency": decode_speedup / bound if bound and decode_speedup else None,
            "draft_share": s.draft_s / total if total else None, "verify_share": s.verify_s / total if total else None,
            "overhead_share": s.overhead_s / total if total else None,
            "same_output": r.outputs == base_hf.outputs, "times_s_per_token": r.times,
        })
    return out


def print_table(results: list[dict]) -> None:
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"
    head = (f"{'pair':9} {'config':42} {'g':>4} {'ms/tok':>7} {'tok/s':>6} {'xHF':>5} {'xFD':>5} {'xOwn':>5} {'xAsst':>5} "
            f"{'AR':>5} {'tau':>5} {'MBSU':>5} {'eff':>5} {'dec':>5} {'draft':>5} {'verif':>5} {'ovh':>5} same")
    print(head)
    print("-" * len(head))
    for r in results:
        g = f(r["gamma"], "d") if r["gamma"] is not None else f(r["mean_gamma"], ".1f")
        print(f"{r['pair']:9} {r['config'][:42]:42} {g:>4} {f(r['ms_per_token'], '.1f'):>7} {f(r['tokens_per_s'], '.0f'):>6} "
              f"{f(r['speedup_vs_transformers_alone'], '.2f'):>5} {f(r['speedup_vs_fastdraft_alone'], '.2f'):>5} "
              f"{f(r['speedup_vs_own_target_alone'], '.2f'):>5} "
              f"{f(r['x_transformers_assisted'], '.2f'):>5} {f(r['acceptance_rate'], '.2f'):>5} {f(r['tau'], '.2f'):>5} "
              f"{f(r['mbsu_bound'], '.2f'):>5} {f(r['efficiency'], '.2f'):>5} {f(r['decode_efficiency'], '.2f'):>5} "
              f"{f(r['draft_share'], '.0%'):>5} "
              f"{f(r['verify_share'], '.0%'):>5} {f(r['overhead_share'], '.0%'):>5} {'yes' if r['same_output'] else 'NO'}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=["agreeing", "demo", "all"], default="all")
    ap.add_argument("--gammas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3, 5, 8],
                    help="static gammas for the engine rows")
    ap.add_argument("--hf-gamma", type=int, default=5, help="transformers' constant num_assistant_tokens")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--agreeing-vocab", type=int, default=8192)
    ap.add_argument("--agreeing-hidden", type=int, default=768, help="multiple of 64 (head size 64)")
    ap.add_argument("--agreeing-layers", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--openvino", choices=["auto", "yes", "no"], default="auto",
                    help="OpenVINO GenAI rows (the `openvino` extra): auto = when it is installed")
    ap.add_argument("--backend", default="auto", help="engine decoder: auto | lean | hf")
    ap.add_argument("--demo-run", default="runs/demo", help="run dir whose drafts/{FT,CP,PT} the demo pair uses")
    ap.add_argument("--out", default="runs/bench/engine.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for pair, build in (("agreeing", agreeing_rows), ("demo", demo_rows)):
        if args.pair in (pair, "all"):
            print(f"[bench_engine] {pair} pair: building", flush=True)
            rows, prompts = build(args)
            measure(rows, prompts, args.repeats, args.max_new_tokens)
            results += summarize(rows)
            # Written after every pair: a long run stopped during the second pair keeps the first.
            print_table(results)
            report = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "max_new_tokens": args.max_new_tokens, "prompts": args.prompts, "repeats": args.repeats, "rows": results}
            write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
