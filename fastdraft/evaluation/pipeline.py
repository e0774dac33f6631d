"""`fastdraft evaluate RECIPE`: acceptance, tau, MBSU and wall-clock speedup of each draft on each task.

    fastdraft evaluate jobs/recipes/demo.yaml [--set evaluate.gammas=[1,3,5]]
    python jobs/evaluate.py jobs/recipes/demo.yaml

1. Drafts: `evaluate.drafts`, or the run's `drafts/PT`, `drafts/CP`, `drafts/FT` that exist; each must
   speak the target's exact tokenizer (refused otherwise, naming both sides).
2. One part per task x decoding (`measure_job`), run by `Measurer` actors that load the models once and
   measure part after part. For each timed prompt (`timed_prompts`, default all), the target alone (fastdraft's
   engine with no draft) writes the continuation, timed; then each draft's pair at the headline gamma,
   timed right after on the same cores, batch 1, same max tokens and decoding settings: exact counters,
   wall-clock speedup, and under greedy decoding a check that the output is identical. The target writes the
   other prompts' continuations in one batch, untimed. Then the gamma sweep: every draft reads the continuations
   teacher-forced, giving exact greedy / expected sampled counters for every gamma at once (`acceptance.py`).
   With timings one actor runs the parts one at a time (never sharing the cores); without, several run side by side.
3. `RunLayout.eval`: report.json, report.md, report.html and PNG plots (`report.py`); a table on stdout.

Finished parts are cached under `eval/parts/` keyed by the recipe's evaluate section and the models'
files, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from fastdraft.config import EvaluateConfig, Recipe
from fastdraft.errors import FastdraftError
from fastdraft.evaluation.tasks import EvalTask, load_task
from fastdraft.layout import RunLayout
from fastdraft.plan import check_stage
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
# Work units (run on Measurer actors)
# --------------------------------------------------------------------------------------------
class _Timed:
    """One engine's runs over a task: summed counters, seconds and tokens."""

    def __init__(self):
        from fastdraft.speculative.types import SpecStats

        self.stats, self.seconds, self.tokens, self.identical = SpecStats(), 0.0, 0, True

    def run(self, engine, prompt: list[int], params: SamplingParams, gamma: int | None = None):
        start = time.perf_counter()
        [result] = engine.generate([prompt], params, gamma=gamma)
        self.seconds += time.perf_counter() - start
        self.tokens += len(result.token_ids)
        self.stats += result.stats
        return result


def prepare_pairs(target_dir: str, drafts: dict[str, str], gamma: int, dynamic_gamma: bool, dtype: str, device: str,
                  warm_prompt: list[int], params: SamplingParams, draft_weights: str = "float",
                  engine_drafts: list[str] | None = None, lookup: dict | None = None) -> tuple:
    """(target, {label: draft}, target-alone engine, {(method, label): engine}, {label: weights}), every engine warmed
    up on `warm_prompt`; pairs for the `engine_drafts` labels only (default: all). With `lookup` (`SpeculativeEngine`
    keyword arguments, `LookupConfig.engine_args`) each pair also runs with context lookup beside its draft
    (method "engine+lookup").

    The target is prepared once (its decoder) and shared by every engine; the target alone runs through the same
    engine loop with no draft. A draft run with int8 weights is rounded to the int8 grid first
    (`round_model_to_int8_`), so that the offline sweep measures the draft the engine runs."""
    from fastdraft.checkpoint import load_model
    from fastdraft.quantize import round_model_to_int8_
    from fastdraft.speculative.decoders import resolve_weights
    from fastdraft.speculative.engine import SpeculativeEngine

    target = load_model(target_dir, dtype=dtype, device=device)
    models = {label: load_model(path, dtype=dtype, device=device) for label, path in drafts.items()}
    weights = {label: resolve_weights(m, draft_weights) for label, m in models.items()}
    for label, m in models.items():
        if weights[label] == "int8":
            round_model_to_int8_(m)
    alone = SpeculativeEngine(target, None)
    pairs, shared = {}, alone.target
    timed = [label for label in models if engine_drafts is None or label in engine_drafts]
    methods = ["engine"] + ["engine-dynamic"] * dynamic_gamma + ["engine+lookup"] * bool(lookup)
    for method in methods:
        for label in timed:
            m = models[label]
            engine = SpeculativeEngine(target, m, gamma=gamma, dynamic_gamma=method == "engine-dynamic", target_decoder=shared,
                                       draft_weights=weights[label], **(lookup if method == "engine+lookup" else {}))
            pairs[(method, label)], shared = engine, engine.target
    for engine in [alone, *pairs.values()]:  # first calls pay one-off costs (allocations, kernel choice): a short prefill
        for g in (0, gamma):
            engine.generate([warm_prompt[:16]], replace(params, max_new_tokens=4), gamma=g)
    return target, models, alone, pairs, weights


def measure_job(target_dir: str, drafts: dict[str, str], task: EvalTask, decoding: str, params: SamplingParams,
                gammas: list[int], gamma: int, dtype: str, wall_clock: bool, dynamic_gamma: bool = False,
                device: str = "cpu", draft_weights: str = "float", engine_drafts: list[str] | None = None,
                lookup: dict | None = None, cache: dict | None = None) -> dict:
    """Everything about one task and decoding, for every draft.

    For each timed prompt (`task.timed_prompts`, default all): the target alone writes the continuation (timed,
    through the engine with no draft), then each draft's pair generates at `gamma` (timed, right after: same cores,
    same load). The target writes the other prompts' continuations in one batch. Then the drafts read each
    continuation teacher-forced (per-position acceptance), which the gamma sweep replays.

    Only the pairs of `engine_drafts` (default: all) run in the engine; every draft reads the continuations.

    Returns {"sweep": {label: {gamma: SpecStats dict}}, "engine": {label: run dict}, "draft_weights": {label: "float"
    or "int8", as run}} (+ "engine-dynamic" when `dynamic_gamma`: the same pairs with the engine choosing gamma each
    round, timed in the same loop; "engine+lookup" with `lookup`: the same pairs with context lookup beside the draft).
    `cache` keeps the loaded models and warmed-up engines between parts (`Measurer` passes its own).
    """
    from fastdraft.evaluation.acceptance import Continuation, position_acceptance, sweep

    key = (target_dir, tuple(sorted(drafts.items())), gamma, dynamic_gamma, dtype, device, draft_weights,
           tuple(engine_drafts or ()), repr(lookup))
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = prepare_pairs(target_dir, drafts, gamma, dynamic_gamma, dtype, device, task.prompts[0].ids, params,
                                   draft_weights, engine_drafts, lookup)
    target, models, alone, pairs, weights = cache[key]
    timed_alone, timed = _Timed(), {k: _Timed() for k in pairs}
    betas: dict[str, list[list[float]]] = {label: [] for label in models}
    # tokens as the main counter (an upper bound as total: stop tokens end some prompts early)
    progress = Progress(f"evaluate {task.name} {decoding}", unit="tok", total=len(task.prompts) * task.max_new_tokens)
    settings = [replace(params, max_new_tokens=task.max_new_tokens, seed=(params.seed or 0) + i)
                for i in range(len(task.prompts))]
    timed_prompts = task.timed_prompts
    for prompt, p in zip(timed_prompts, settings):
        ids = timed_alone.run(alone, prompt.ids, p, gamma=0).token_ids
        for k, engine in pairs.items():
            out = timed[k].run(engine, prompt.ids, p)
            timed[k].identical &= out.token_ids == ids
        for label, beta in position_acceptance(target, models, Continuation(prompt.ids, ids), p).items():
            betas[label].append(beta)
        progress.update(len(ids), prompts=1)
    rest, rest_settings = task.prompts[len(timed_prompts):], settings[len(timed_prompts):]
    if rest:  # acceptance only: the target writes these continuations in one batch, untimed
        outs = alone.generate([prompt.ids for prompt in rest], rest_settings, gamma=0)
        for prompt, p, out in zip(rest, rest_settings, outs):
            for label, beta in position_acceptance(target, models, Continuation(prompt.ids, out.token_ids), p).items():
                betas[label].append(beta)
            progress.update(len(out.token_ids), prompts=1)
    progress.done()
    result = {"sweep": {}, "engine": {}, "draft_weights": weights}
    for label, per_prompt in betas.items():
        result["sweep"][label] = {g: s.to_dict() for g, s in sweep(per_prompt, gammas, task.max_new_tokens).items()}
    for (method, label), t in timed.items():
        result.setdefault(method, {})[label] = {
            "stats": t.stats.to_dict(), "speculative_s": t.seconds, "speculative_tokens": t.tokens,
            "target_s": timed_alone.seconds if wall_clock else None, "target_tokens": timed_alone.tokens,
            "greedy_identical": t.identical if params.greedy else None,
        }
    return result


# --------------------------------------------------------------------------------------------
# Caching finished parts (resume)
# --------------------------------------------------------------------------------------------
def _files_key(*dirs: str | Path) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for d in dirs for p in sorted(Path(d).glob("*.safetensors"))]


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_part(parts: Path, name: str, key: dict) -> dict | None:
    """A finished part's result from `parts/name.json` if it was made with the same key, else None."""
    path = parts / f"{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == _digest(key):
            print(f"[evaluate] {name}: done before, reusing {path}", flush=True)
            return saved["result"]
    return None


def save_part(parts: Path, name: str, key: dict, result: dict) -> dict:
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / f"{name}.partial"
    tmp.write_text(json.dumps({"key": _digest(key), "result": result}))
    tmp.replace(parts / f"{name}.json")  # a crash never leaves half a part behind
    return result


class Measurer:
    """A Ray actor that measures part after part, loading and warming up the pairs once (not once per part)."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor
        self.cache: dict = {}

    def measure(self, *args) -> dict:
        return measure_job(*args, cache=self.cache)


def measure_all(jobs: dict[tuple, tuple[str, dict, tuple]], parts: Path, wall_clock: bool,
                device: str = "cpu", cpus: float = 1.0) -> dict[tuple, dict]:
    """Run `measure_job` for every (task, decoding) not finished before, on `Measurer` actors of `cpus` CPUs.

    Wall-clock timings must not share the cores with other measurements, so with timings one actor runs
    the parts one at a time; without, as many actors as the cluster's CPUs hold run them side by side.
    Each part is saved as soon as it is back.
    """
    import ray
    from ray.util import ActorPool

    results = {k: load_part(parts, name, key) for k, (name, key, _) in jobs.items()}
    todo = [k for k, r in results.items() if r is None]
    if not todo:
        return results
    total = ray.cluster_resources().get("CPU", 1.0)
    cpus = min(cpus, total)  # more than the cluster has would wait forever
    size = 1 if wall_clock else max(1, min(len(todo), int(total // cpus)))
    actor = ray.remote(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0)(Measurer)
    pool = ActorPool([actor.remote(max(1, int(cpus))) for _ in range(size)])
    for k, result in zip(todo, pool.map(lambda a, k: a.measure.remote(*jobs[k][2]), todo)):
        name, key, _ = jobs[k]
        results[k] = save_part(parts, name, key, result)
    return results


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def run_evaluate(recipe: Recipe, **_) -> dict:
    """Evaluate the recipe's drafts against its target; write the report to `RunLayout.eval`.

    Returns a summary: the report's path and the headline numbers per draft and task.
    """
    from fastdraft.assets import resolve_model_path
    from fastdraft.checkpoint import load_model, load_shape
    from fastdraft.evaluation import report as report_mod
    from fastdraft.evaluation.metrics import CostRatio, model_size
    from fastdraft.raycluster import ensure_ray
    from fastdraft.tokenizer import check_compatible, load_tokenizer

    cfg: EvaluateConfig = recipe.section("evaluate")
    check_stage(recipe, "evaluate")
    layout = RunLayout(recipe.run_dir)
    target_dir = resolve_model_path(recipe.target.model)
    drafts = find_drafts(cfg, layout)
    tok = load_tokenizer(target_dir)
    for label, path in drafts.items():
        check_compatible(tok, load_tokenizer(path), f"target {recipe.target.model}", f"draft {label} ({path})")
    unknown = sorted(set(cfg.engine_drafts or ()) - set(drafts))
    if unknown:
        raise FastdraftError(f"evaluate.engine_drafts: no draft labelled {', '.join(unknown)} (the drafts are "
                             f"{', '.join(drafts)})")
    tasks = [load_task(t, tok, cfg.seed) for t in cfg.tasks]
    stops = stop_tokens(target_dir)
    params = decodings(cfg, stops)
    gammas = sorted(set(cfg.gammas) | {cfg.gamma})
    dtype = recipe.target.dtype

    ensure_ray()
    draft_dirs = {k: str(v) for k, v in drafts.items()}
    key = {"evaluate": recipe.section_hash("evaluate"), "target": _files_key(target_dir),
           "drafts": {k: _files_key(v) for k, v in drafts.items()}}
    jobs = {(t.name, d): (f"{t.name}-{d}", {**key, "part": f"{t.name}-{d}"},
                          (str(target_dir), draft_dirs, t, d, p, gammas, cfg.gamma, recipe.target.dtype, cfg.wall_clock,
                           cfg.dynamic_gamma, cfg.device, cfg.draft_weights, cfg.engine_drafts,
                           cfg.lookup.engine_args() if cfg.lookup else None))
            for t in tasks for d, p in params.items()}
    results = measure_all(jobs, layout.eval / "parts", cfg.wall_clock, cfg.device, cfg.cpus_per_task)
    sweeps = {k: {label: {int(g): s for g, s in per.items()} for label, per in r["sweep"].items()}  # JSON keys are str
              for k, r in results.items()}
    engine_runs: dict[str, dict] = {}  # method -> draft -> "task/decoding" -> run
    for (task_name, decoding), r in results.items():
        for method in report_mod.ENGINE_METHODS:
            for label, run in r.get(method, {}).items():
                engine_runs.setdefault(method, {}).setdefault(label, {})[f"{task_name}/{decoding}"] = run

    target = load_shape(target_dir, dtype=dtype)  # shapes only: the driver never holds the target's weights
    t_params, t_bytes = model_size(target)
    # c of each draft as the measurements ran it (int8 or float weights: see `measure_job`)
    ran = {label: w for r in results.values() for label, w in r.get("draft_weights", {}).items()}
    costs = {label: CostRatio.of(load_model(path, dtype=dtype), target, ran.get(label, "float"))
             for label, path in drafts.items()}
    del target
    report = report_mod.build_report(
        recipe=recipe, target_dir=target_dir, target_size=(t_params, t_bytes), drafts=drafts, costs=costs,
        tasks=tasks, params=params, gammas=gammas, sweeps=sweeps, engine_runs=engine_runs, draft_weights=ran,
    )
    paths = report_mod.write_report(report, layout.eval)
    table = report_mod.markdown_table(report_mod.headline_rows(report))
    print(table, flush=True)
    return {"report": str(paths["json"]), "html": str(paths["html"]),
            "headline": {f"{r['draft']}/{r['task']}/{r['decoding']}": {k: r.get(k) for k in (
                "acceptance_rate", "tau", "mbsu", "wall_clock_speedup")} for r in report_mod.headline_rows(report)}}
