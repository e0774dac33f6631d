"""The whole chain from one recipe, as a job graph: prepare -> pretrain -> distill -> evaluate, with generate
alongside prepare and pretrain (it needs only the target), joining at distill.

    fastdraft run RECIPE [--from STAGE]        # any recipe (also: ray job submit ... python jobs/pipeline.py RECIPE)
    fastdraft demo [--quick]                   # the embedded default target, offline

Each stage's outputs are recorded in `<workdir>/pipeline.json` with the recipe sections they depend on
(their hash) and the target's tokenizer fingerprint. A stage whose record matches and whose outputs exist
is skipped and says so. A stage whose inputs changed, or `--from STAGE`, moves the outputs of that stage and
of every stage downstream of it aside (to `<workdir>/superseded/<time>/`, nothing is deleted) and runs again.

A stage starts as soon as the stages it reads from are done, so independent stages run at the same time
(on a cluster: generation on the engine actors while the draft trains; on 2 cores: one's start-up hides
behind the other's compute). A failing stage stops the chain with its own error: nothing starts after it,
and a stage already running alongside finishes and is recorded, so a rerun skips it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from fastdraft.config import Recipe, load_recipe
from fastdraft.layout import RunLayout

ORDER = ("prepare", "pretrain", "generate", "distill", "evaluate")

# The recipe sections each stage's outputs depend on (the target is always included by section_hash).
DEPENDS_ON = {
    "prepare": ("prepare",),
    "pretrain": ("prepare", "draft", "pretrain"),
    "generate": ("generate",),
    "distill": ("prepare", "draft", "pretrain", "generate", "distill"),
    "evaluate": ("prepare", "draft", "pretrain", "generate", "distill", "evaluate"),
}


# The stages whose outputs each stage reads (the stages among its sections): the edges of the job graph.
UPSTREAM = {stage: tuple(s for s in ORDER if s in sections and s != stage) for stage, sections in DEPENDS_ON.items()}


def stage_outputs(recipe: Recipe, stage: str) -> list[Path]:
    """The paths a stage writes (what `--from` moves aside)."""
    layout = RunLayout(recipe.run_dir)
    if stage == "prepare":
        return [layout.root / "data"]
    if stage == "pretrain":
        names = ["init"] + [s.name for s in recipe.pretrain.stages] if recipe.pretrain else ["init"]
        return [layout.draft(n) for n in names] + [layout.train_storage]
    if stage == "generate":
        return [layout.alignment]
    if stage == "distill":
        return [layout.draft("FT"), layout.train_storage]
    return [layout.eval]


class PipelineRecord:
    """`<workdir>/pipeline.json`: per stage, the inputs' hash, the tokenizer fingerprint, time and summary."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = json.loads(path.read_text()).get("stages", {}) if path.is_file() else {}
        self._lock = threading.Lock()  # stages running side by side record from their own threads

    def matches(self, stage: str, key: str) -> bool:
        entry = self.stages.get(stage, {})
        return entry.get("status") == "done" and entry.get("key") == key

    def set(self, stage: str, **entry) -> None:
        with self._lock:
            self.stages[stage] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.partial")
            tmp.write_text(json.dumps({"outputs": str(self.path.parent), "stages": self.stages}, indent=2, default=str))
            tmp.replace(self.path)


def supersede(recipe: Recipe, stages: list[str]) -> Path | None:
    """Move the outputs of `stages` to `<workdir>/superseded/<time>/` (never delete a user's work)."""
    root = recipe.run_dir
    dest = root / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for stage in stages:
        for path in stage_outputs(recipe, stage):
            if path.exists():
                target = dest / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(target))
                moved.append(str(path.relative_to(root)))
    if moved:
        print(f"[pipeline] moved previous outputs aside to {dest}: {', '.join(moved)}", flush=True)
        return dest
    return None


def _target_fingerprint(recipe: Recipe) -> str:
    from fastdraft.assets import resolve_model_path
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    return tokenizer_fingerprint(load_tokenizer(resolve_model_path(recipe.target.model), recipe.target.trust_remote_code))


def plan_stages(recipe: Recipe, stages: list[str], record: PipelineRecord, fingerprint: str,
                from_stage: str | None) -> dict[str, tuple[str, str]]:
    """stage -> (key, decision): "skip", "run" (no finished outputs yet) or "rerun: <why>" (outputs move aside)."""
    plan: dict[str, tuple[str, str]] = {}
    for stage in stages:  # ORDER is a topological order of the graph
        key = f"{recipe.section_hash(*DEPENDS_ON[stage])}/{fingerprint}"
        redone = [u for u in UPSTREAM[stage] if u in plan and plan[u][1] != "skip"]
        if stage == from_stage:
            decision = "rerun: --from"
        elif record.stages.get(stage, {}).get("key") not in (None, key):
            decision = "rerun: its recipe sections or the target changed"
        elif redone:  # outputs it may have came from the old inputs: move them aside
            had_outputs = stage in record.stages or any(p.exists() for p in stage_outputs(recipe, stage))
            decision = f"rerun: {redone[-1]} runs again before it" if had_outputs else "run"
        elif record.matches(stage, key) and stage_outputs(recipe, stage)[0].exists():  # its main output
            decision = "skip"
        else:
            decision = "run"
        plan[stage] = (key, decision)
    return plan


def run_pipeline(recipe: Recipe, from_stage: str | None = None, **_options) -> dict:
    """Run every stage the recipe has a section for, skipping those whose outputs exist and match."""
    from fastdraft.cli import resolve_stage

    stages = [s for s in ORDER if getattr(recipe, s) is not None]
    if from_stage is not None and from_stage not in stages:
        from fastdraft.errors import RecipeError

        raise RecipeError(f"--from {from_stage}: recipe '{recipe.name}' has no '{from_stage}' section")
    funcs = {s: resolve_stage(s) for s in stages}  # an unbuilt stage fails before anything runs
    fingerprint = _target_fingerprint(recipe)
    record = PipelineRecord(recipe.run_dir / "pipeline.json")
    print(f"[pipeline] {recipe.name}: {' -> '.join(stages)} in {recipe.run_dir} (tokenizer {fingerprint})", flush=True)
    plan = plan_stages(recipe, stages, record, fingerprint, from_stage)
    summary: dict[str, dict] = {}
    for stage, (key, decision) in plan.items():
        if decision == "skip":
            print(f"[pipeline] {stage}: outputs exist and match (key {key}); skipping", flush=True)
            summary[stage] = {"skipped": True, **record.stages[stage].get("summary", {})}
        elif decision.startswith("rerun"):
            print(f"[pipeline] {stage}: rerunning ({decision.removeprefix('rerun: ')})", flush=True)
    supersede(recipe, [s for s, (_, d) in plan.items() if d.startswith("rerun")])

    def run_stage(stage: str) -> dict:
        key = plan[stage][0]
        start = time.time()
        record.set(stage, status="running", key=key, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            result = funcs[stage](recipe) or {}
        except BaseException as exc:
            record.set(stage, status="failed", key=key, error=f"{type(exc).__name__}: {exc}")
            print(f"[pipeline] {stage}: failed after {time.time() - start:.0f}s; later stages not run", flush=True)
            raise
        seconds = round(time.time() - start, 1)
        record.set(stage, status="done", key=key, seconds=seconds, summary=result)
        print(f"[pipeline] {stage}: done in {seconds:.0f}s", flush=True)
        return {**result, "seconds": seconds}

    pending = [s for s, (_, d) in plan.items() if d != "skip"]
    if pending:
        from fastdraft.raycluster import ensure_ray

        ensure_ray()  # here, in the main thread (Ray's signal handlers), not in the first stage's thread
        warn_if_multinode(recipe.run_dir)
    done = {s for s, (_, d) in plan.items() if d == "skip"}
    running: dict[Future, str] = {}
    failures: list[tuple[str, BaseException]] = []
    with ThreadPoolExecutor(max_workers=max(1, len(pending)), thread_name_prefix="stage") as pool:
        try:
            while pending or running:
                ready = [] if failures else [s for s in pending if all(u in done for u in UPSTREAM[s] if u in plan)]
                for stage in ready:
                    alongside = sorted(running.values())
                    print(f"[pipeline] {stage}: starting" + (f" (alongside {', '.join(alongside)})" if alongside else ""),
                          flush=True)
                    pending.remove(stage)
                    running[pool.submit(run_stage, stage)] = stage
                if not running:
                    break
                for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                    stage = running.pop(future)
                    if future.exception() is not None:
                        failures.append((stage, future.exception()))
                    else:
                        done.add(stage)
                        summary[stage] = future.result()
        except KeyboardInterrupt:
            _abort(running.values())
            raise
    if failures:
        raise failures[0][1]
    print(f"[pipeline] outputs: {recipe.run_dir}", flush=True)
    return summary


def warn_if_multinode(run_dir: Path) -> None:
    """On a cluster of several nodes, workers on other nodes write and read the run's outputs too."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        print(f"[pipeline] this cluster has {len(nodes)} nodes: {run_dir} must be storage every node mounts "
              f"(a shared filesystem), or each node writes its own part of the outputs", flush=True)


def _abort(stages) -> None:
    """Ctrl-C while stages run in their threads: stop their Ray work (the threads then end with an error)."""
    print(f"[pipeline] interrupted; stopping {', '.join(sorted(stages)) or 'nothing'}", flush=True)
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------
# `--quick`: the same chain at smoke-test size. The draft is the target's first layer with a 4k-token head,
# and distillation on the target's answers must still lift acceptance on instruction prompts above the PT
# draft's. Evaluation runs the paper's setting only (T 0.6, no greedy pass).
QUICK_OVERRIDES = [
    "draft.layers=1",
    "draft.head_tokens=4096",
    "prepare.corpora.pt.sources.0.tokens=24k",
    "prepare.corpora.cp.sources.0.tokens=12k",
    "prepare.corpora.cp.sources.1.tokens=3k",
    "pretrain.stages.0.tokens=20k",  # the 49k-token output layer is most of a step: ~40 GFLOP per 1k tokens
    "pretrain.stages.1.tokens=10k",
    "pretrain.eval_every=10",
    "pretrain.ckpt_every=10",
    "generate.prompts.0.limit=40",  # 40 user turns, answered greedy and at T 0.6: distillation needs the rows
    "generate.prompts.1.limit=8",
    "generate.sampling=[{temperature: 0.0, max_new_tokens: 48}, {temperature: 0.6, max_new_tokens: 48}]",
    "distill.epochs=2",  # 96 rows: seen twice
    "distill.eval_prompts=4",
    # One evaluation and checkpoint, at the end: on 4 held-out prompts (~350 scored tokens) the agreement of the
    # checkpoints every 10 steps differed by noise (0.141 at step 10 against 0.133 at 30 and 0.118 at 48, where the
    # validation loss fell 4.47 -> 4.01 -> 3.92), and picking by it sometimes kept step 10: that FT draft scored 0.026
    # gamma-3 AR on instructions, below PT's 0.028, where the one kept at step 30 scored 0.037 (2 cores, 2026-12-06).
    "distill.eval_every=1000",
    "distill.ckpt_every=1000",
    "evaluate.greedy=false",
    "evaluate.tasks.0.prompts=1",
    "evaluate.tasks.1.prompts=4",
    "evaluate.tasks.2.prompts=1",
    "evaluate.tasks.0.max_new_tokens=24",
    "evaluate.tasks.1.max_new_tokens=24",
    "evaluate.tasks.2.max_new_tokens=24",
    "evaluate.gammas=[1,3]",
]


def demo_recipe(quick: bool = False, workdir: str | None = None, overrides: list[str] | None = None) -> Recipe:
    from fastdraft.cli import demo_recipe_path

    sets = (QUICK_OVERRIDES if quick else []) + [f"workdir={workdir or ('runs/demo-quick' if quick else 'runs/demo')}"]
    return load_recipe(demo_recipe_path(), sets + list(overrides or []))


def final_draft(recipe: Recipe) -> Path | None:
    layout = RunLayout(recipe.run_dir)
    names = ["FT"] + [s.name for s in reversed(recipe.pretrain.stages)] if recipe.pretrain else ["FT"]
    return next((layout.draft(n) for n in names if (layout.draft(n) / "fastdraft.json").is_file()), None)


def _label_of(draft: Path) -> str:
    from fastdraft.checkpoint import read_metadata

    stages = read_metadata(draft).stages
    return stages[-1] if stages else draft.name


def demo_summary(recipe: Recipe, quick: bool) -> str:
    """The closing text: the headline table, where the report and the draft are, how to serve them."""
    from fastdraft.evaluation import report as report_mod

    layout = RunLayout(recipe.run_dir)
    lines = []
    report_path = layout.eval / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        lines += ["", f"Speculative decoding with each draft (gamma {report['settings']['gamma']}):", "",
                  report_mod.markdown_table(report_mod.headline_rows(report)), ""]
        pictures = sorted(str(p) for p in layout.eval.glob("*.png"))
        lines += [f"report: {report_path}", f"        {layout.eval / 'report.html'}", *[f"        {p}" for p in pictures]]
    draft = final_draft(recipe)
    pays = False
    if draft is not None and report_path.is_file():
        label = _label_of(draft)
        for method, what in (("engine", f"{label} draft"), ("engine+lookup", f"{label} draft with context lookup")):
            method_pays, verdicts = report_mod.verdict(report, label, method)
            if verdicts:
                pays |= method_pays
                lines += ["", f"{what} {'pays' if method_pays else 'does NOT pay'}, gamma {report['settings']['gamma']}, "
                              f"batch 1, measured side by side with the target alone:", *[f"  {v}" for v in verdicts]]
    if draft is not None:
        from fastdraft.layout import resolve_workdir

        workdir = f" --set workdir={recipe.run_dir}" if recipe.run_dir != resolve_workdir("runs/demo") else ""
        quick_note = " --quick" if quick else ""
        serve = f"fastdraft serve jobs/recipes/demo.yaml{workdir}"
        lines += [f"final draft: {draft}"]
        if pays:
            lines += [f"serve it:    {serve}   (or: serve run apps.speculative:build_app "
                      f"target={recipe.target.model} draft={draft})"]
        else:  # never present a slower pair as the next step without saying so
            lines += [f"serving:     this pair is slower than the target alone; serve the target alone with "
                      f"{serve} --set serve.speculative=false, or train longer (see the README)"]
        lines += [f"rerun:       fastdraft demo{quick_note} (finished stages are skipped)"]
    return "\n".join(lines)


def run_demo(quick: bool = False, workdir: str | None = None, overrides: list[str] | None = None) -> dict:
    """`fastdraft demo`: the whole chain on the embedded SmolLM2-135M-Instruct target and offline corpora."""
    recipe = demo_recipe(quick, workdir, overrides)
    summary = run_pipeline(recipe)
    print(demo_summary(recipe, quick), flush=True)
    return {"workdir": str(recipe.run_dir), "stages": ", ".join(f"{k} {v.get('seconds', 'skipped')}" for k, v in summary.items()
                                                                  if isinstance(v, dict)),
            "final_draft": str(final_draft(recipe))}
