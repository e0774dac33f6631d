"""`fastdraft evaluate RECIPE`: acceptance, tau, MBSU and wall-clock speedup of each draft on each task.

    fastdraft evaluate jobs/recipes/demo.yaml [--set evaluate.gammas=[1,3,5]]
    python jobs/evaluate.py jobs/recipes/demo.yaml

1. Drafts: `evaluate.drafts`, or the run's `drafts/PT`, `drafts/CP`, `drafts/FT` that exist; each must
   speak the target's exact tokenizer (refused otherwise, naming both sides).
2. Gamma sweep (Ray tasks in parallel, one per task x decoding): the target writes each continuation
   once, every draft reads it teacher-forced; exact greedy / expected sampled counters for every gamma
   (`acceptance.py`).
3. Engine runs (Ray tasks one at a time, so timings do not share cores): fastdraft's `SpeculativeEngine`
   at the headline gamma, batch 1, interleaved prompt by prompt with the target alone through the same
   engine (gamma 0), same prompts, max tokens and decoding settings. Exact counters, wall-clock speedup,
   and under greedy decoding a check that the outputs are identical.
4. `RunLayout.eval`: report.json, report.md, report.html and PNG plots (`report.py`); a table on stdout.

Finished parts are cached under `eval/parts/` keyed by the recipe's evaluate section and the models'
files, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import replace
from pathlib import Path

from fastdraft.config import EvaluateConfig, Recipe
from fastdraft.errors import FastdraftError
from fastdraft.evaluation.tasks import EvalTask, load_task
from fastdraft.layout import RunLayout
from fastdraft.progress import Progress
from fastdraft.speculative.types import SamplingParams

DEFAULT_STAGES = ("PT", "CP", "FT")


# --------------------------------------------------------------------------------------------
# Inputs: drafts, decodings
# --------------------------------------------------------------------------------------------
def _label(path: Path) -> str:
    from fastdraft.checkpoint import read_metadata

    try:
        stages = read_metadata(path).stages
    except FastdraftError:
        stages = []
    return stages[-1] if stages else path.name


def find_drafts(cfg: EvaluateConfig, layout: RunLayout) -> dict[str, Path]:
    """Label -> directory of each draft to evaluate (labels: the last training stage, else the dir name)."""
    if cfg.drafts:
        paths = [Path(d) for d in cfg.drafts]
        missing = [str(p) for p in paths if not (p / "config.json").is_file()]
        if missing:
            raise FastdraftError(f"evaluate.drafts: not a model directory (no config.json): {', '.join(missing)}")
    else:
        paths = [layout.draft(s) for s in DEFAULT_STAGES if (layout.draft(s) / "config.json").is_file()]
        if not paths:
            raise FastdraftError(
                f"no drafts to evaluate: none of {', '.join(str(layout.draft(s)) for s in DEFAULT_STAGES)} exists; "
                f"run pretrain/distill first or set evaluate.drafts"
            )
    drafts: dict[str, Path] = {}
    for p in paths:
        label = _label(p)
        if label in drafts:
            label = f"{label}:{p.name}"
        drafts[label] = p
    return drafts


def decodings(cfg: EvaluateConfig, stop_token_ids: tuple[int, ...]) -> dict[str, SamplingParams]:
    """The paper's setting (multinomial sampling at `temperature`) and, when asked, greedy (max tokens: per task)."""
    out = {"sampled": SamplingParams(temperature=cfg.temperature, stop_token_ids=stop_token_ids, seed=cfg.seed)}
    if cfg.temperature == 0:
        out = {"greedy": replace(out["sampled"], temperature=0.0)}
    elif cfg.greedy:
        out["greedy"] = replace(out["sampled"], temperature=0.0)
    return out


def stop_tokens(target_dir: Path) -> tuple[int, ...]:
    """The target's stop tokens: its generation config's eos ids (plus the tokenizer's eos)."""
    from transformers import GenerationConfig

    from fastdraft.tokenizer import load_tokenizer

    ids = set()
    try:
        eos = GenerationConfig.from_pretrained(str(target_dir), local_files_only=True).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    tok = load_tokenizer(target_dir)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return tuple(sorted(ids))


# --------------------------------------------------------------------------------------------
# Work units (run as Ray tasks)
# --------------------------------------------------------------------------------------------
def sweep_job(target_dir: str, drafts: dict[str, str], task: EvalTask, decoding: str, params: SamplingParams,
              gammas: list[int], dtype: str) -> dict:
    """Gamma sweep of every draft on one task and decoding: {label: {gamma: SpecStats dict}}."""
    from fastdraft.checkpoint import load_model
    from fastdraft.evaluation.acceptance import offline_sweep, target_continuations

    target = load_model(target_dir, dtype=dtype)
    progress = Progress(f"evaluate {task.name} {decoding}: target", total=len(task.prompts) * task.max_new_tokens)
    conts = target_continuations(target, task, params, seed=params.seed or 0, progress=progress)
    progress.done()
    out = {}
    for label, path in drafts.items():
        sweep = offline_sweep(load_model(path, dtype=dtype), conts, params, gammas, task.max_new_tokens)
        out[label] = {g: s.to_dict() for g, s in sweep.items()}
        print(f"[evaluate {task.name} {decoding}] {label}: AR@{gammas[-1]} {sweep[gammas[-1]].acceptance_rate:.3f}", flush=True)
    return out


def engine_job(target_dir: str, draft_dir: str, label: str, tasks: list[EvalTask], params: dict[str, SamplingParams],
               gamma: int, dtype: str, wall_clock: bool) -> dict:
    """Engine runs of one draft on every task and decoding at `gamma`: counters, timings, greedy identity."""
    from fastdraft.speculative.engine import SpeculativeEngine
    from fastdraft.speculative.types import SpecStats

    engine = SpeculativeEngine.from_dirs(target_dir, draft_dir, dtype=dtype, gamma=gamma)
    warm = tasks[0].prompts[0].ids
    for g in (0, gamma):  # first calls pay one-off costs (allocations, kernel selection)
        engine.generate([warm], SamplingParams(max_new_tokens=4), gamma=g)
    out = {}
    for task in tasks:
        for decoding, base in params.items():
            progress = Progress(f"evaluate {label} {task.name} {decoding}", unit="prompt", total=len(task.prompts))
            stats, t_alone, t_spec, tokens_alone, tokens_spec, identical = SpecStats(), 0.0, 0.0, 0, 0, True
            for i, prompt in enumerate(task.prompts):
                p = replace(base, max_new_tokens=task.max_new_tokens, seed=(base.seed or 0) + i)
                if wall_clock:  # the target alone through the same engine, right before: same cores, same load
                    start = time.perf_counter()
                    [alone] = engine.generate([prompt.ids], p, gamma=0)
                    t_alone += time.perf_counter() - start
                    tokens_alone += len(alone.token_ids)
                start = time.perf_counter()
                [spec] = engine.generate([prompt.ids], p, gamma=gamma)
                t_spec += time.perf_counter() - start
                tokens_spec += len(spec.token_ids)
                stats += spec.stats
                if wall_clock and p.greedy and alone.token_ids != spec.token_ids:
                    identical = False
                progress.update(1)
            progress.done()
            out[f"{task.name}/{decoding}"] = {
                "stats": stats.to_dict(), "speculative_s": t_spec, "speculative_tokens": tokens_spec,
                "target_s": t_alone if wall_clock else None, "target_tokens": tokens_alone if wall_clock else None,
                "greedy_identical": identical if (wall_clock and base.greedy) else None,
            }
    return out


# --------------------------------------------------------------------------------------------
# Caching finished parts (resume)
# --------------------------------------------------------------------------------------------
def _files_key(*dirs: str | Path) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for d in dirs for p in sorted(Path(d).glob("*.safetensors"))]


def _cached(parts: Path, name: str, key: dict, compute) -> dict:
    """Return a part's result from `parts/name.json` if its key matches, else compute and store it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = parts / f"{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == digest:
            print(f"[evaluate] {name}: done before, reusing {path}", flush=True)
            return saved["result"]
    result = compute()
    parts.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({"key": digest, "result": result}))
    tmp.replace(path)
    return result


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def run_evaluate(recipe: Recipe, **_) -> dict:
    """Evaluate the recipe's drafts against its target; write the report to `RunLayout.eval`.

    Returns a summary: the report's path and the headline numbers per draft and task.
    """
    import ray

    from fastdraft.assets import resolve_model_path
    from fastdraft.checkpoint import load_model
    from fastdraft.evaluation import report as report_mod
    from fastdraft.evaluation.metrics import CostRatio, model_size
    from fastdraft.raycluster import ensure_ray
    from fastdraft.tokenizer import check_compatible, load_tokenizer

    cfg: EvaluateConfig = recipe.section("evaluate")
    layout = RunLayout(recipe.run_dir)
    target_dir = resolve_model_path(recipe.target.model)
    drafts = find_drafts(cfg, layout)
    tok = load_tokenizer(target_dir)
    for label, path in drafts.items():
        check_compatible(tok, load_tokenizer(path), f"target {recipe.target.model}", f"draft {label} ({path})")
    tasks = [load_task(t, tok, cfg.seed) for t in cfg.tasks]
    stops = stop_tokens(target_dir)
    params = decodings(cfg, stops)
    gammas = sorted(set(cfg.gammas) | {cfg.gamma})
    dtype = recipe.target.dtype
    parts = layout.eval / "parts"
    base_key = {"evaluate": recipe.section_hash("evaluate"), "target": _files_key(target_dir)}

    ensure_ray()
    sweep_remote = ray.remote(num_cpus=1)(sweep_job)
    pending = {}
    for task in tasks:
        for decoding, p in params.items():
            name = f"sweep-{task.name}-{decoding}"
            key = {**base_key, "drafts": {k: _files_key(v) for k, v in drafts.items()}, "part": name}
            pending[(task.name, decoding)] = (name, key, sweep_remote.remote(
                str(target_dir), {k: str(v) for k, v in drafts.items()}, task, decoding,
                replace(p, max_new_tokens=task.max_new_tokens), gammas, dtype))
    sweeps = {}
    for k, (name, key, ref) in pending.items():
        result = _cached(parts, name, key, lambda ref=ref: ray.get(ref))
        sweeps[k] = {label: {int(g): s for g, s in per.items()} for label, per in result.items()}  # JSON keys are str

    engine_remote = ray.remote(num_cpus=1)(engine_job)
    engine_runs = {}
    if importlib.util.find_spec("fastdraft.speculative.engine") is None:
        print("[evaluate] fastdraft.speculative.engine is not installed: offline measurements only, no wall clock", flush=True)
        drafts_to_run = {}
    else:
        drafts_to_run = drafts
    for label, path in drafts_to_run.items():  # one at a time: wall-clock timings must not share the cores
        name = f"engine-{label.replace(':', '_')}"
        key = {**base_key, "draft": _files_key(path), "part": name, "wall_clock": cfg.wall_clock}
        engine_runs[label] = _cached(parts, name, key, lambda path=path, label=label: ray.get(engine_remote.remote(
            str(target_dir), str(path), label, tasks, params, cfg.gamma, dtype, cfg.wall_clock)))

    target = load_model(target_dir, dtype=dtype)
    t_params, t_bytes = model_size(target)
    costs = {label: CostRatio.of(load_model(path, dtype=dtype), target) for label, path in drafts.items()}
    del target
    report = report_mod.build_report(
        recipe=recipe, target_dir=target_dir, target_size=(t_params, t_bytes), drafts=drafts, costs=costs,
        tasks=tasks, params=params, gammas=gammas, sweeps=sweeps, engine_runs=engine_runs,
    )
    paths = report_mod.write_report(report, layout.eval)
    table = report_mod.markdown_table(report_mod.headline_rows(report))
    print(table, flush=True)
    return {"report": str(paths["json"]), "html": str(paths["html"]),
            "headline": {f"{r['draft']}/{r['task']}/{r['decoding']}": {k: r.get(k) for k in (
                "acceptance_rate", "tau", "mbsu", "wall_clock_speedup")} for r in report_mod.headline_rows(report)}}
