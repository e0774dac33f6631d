"""Stage pretrain: the draft's next-token pre-training, PT then CP, on packed shards with Ray Train.

    fastdraft pretrain jobs/recipes/demo.yaml [--set pretrain.compute.num_workers=2]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/pretrain.py jobs/recipes/demo.yaml

Makes the untrained draft (`drafts/init`, unless `draft.init` names one), then runs each
`pretrain.stages` entry in order, each starting from the previous stage's draft: PT (natural language)
then CP (code + text), the paper's recipe. A stage reads `data/<corpus>/{train,validation}` (the prepare
stage's packed shards) through Ray Data, refuses shards made with another tokenizer, trains exactly
`tokens` tokens with `loop.train_loop`, and writes `drafts/<stage>` with its history in `fastdraft.json`.

Re-running the same recipe skips finished stages and resumes an interrupted one from its last
checkpoint (Ray Train V2: the run name and storage path `<workdir>/train` stay the same).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fastdraft.checkpoint import DraftMetadata, read_metadata
from fastdraft.config import PretrainConfig, Recipe, TrainStageConfig
from fastdraft.errors import FastdraftError
from fastdraft.layout import RunLayout
from fastdraft.plan import check_stage
from fastdraft.tokenizer import check_fingerprints
from fastdraft.training.loop import LoopConfig, export_draft, fit, read_log, steps_for_budget, validation_batches


def read_corpus_manifest(corpus_dir: Path, fingerprint: str, draft_from: str) -> dict:
    """The corpus manifest, or a clear error if the shards are missing, incomplete or in another tokenizer."""
    path = corpus_dir / "manifest.json"
    if not path.is_file():
        raise FastdraftError(f"no packed shards at {corpus_dir} (missing {path.name}); run `fastdraft prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FastdraftError(f"{path} is not valid JSON ({exc})") from None
    if not manifest.get("complete"):
        raise FastdraftError(f"{path} says the shards are incomplete (\"complete\" is not true); re-run `fastdraft prepare`")
    check_fingerprints(fingerprint, manifest.get("tokenizer_fingerprint", "<none>"), draft_from, str(path))
    if not sorted((corpus_dir / "train").glob("part-*.parquet")):
        raise FastdraftError(f"{corpus_dir / 'train'} has no part-*.parquet shards although {path} says complete")
    if not isinstance(manifest.get("seq_len"), int):
        raise FastdraftError(f"{path} has no integer 'seq_len'")
    return manifest


def pretrain_token_arrays(recipe: Recipe, layout: RunLayout):
    """Every training row's ids of the corpora the pretrain stages read (packed shards), one array per shard."""
    import pyarrow.parquet as pq

    names = sorted({s.corpus for s in recipe.pretrain.stages}) if recipe.pretrain else []
    for corpus in (layout.corpus(n) for n in names):
        for f in sorted((corpus / "train").glob("part-*.parquet")):
            yield pq.read_table(f, columns=["input_ids"]).column("input_ids").combine_chunks().flatten().to_numpy()


def initial_draft(recipe: Recipe, layout: RunLayout) -> Path:
    """`draft.init` if it names a directory, else `drafts/init` (built once by the draft factory, reused afterwards).

    With `draft.head_tokens`, the built draft's output layer covers the tokens most frequent in the pretrain
    stages' corpora (recorded in its metadata, inherited by PT and CP)."""
    from fastdraft.models import HEAD_TOKENS_KEY, frequent_tokens, make_draft

    if recipe.draft.init_dir:
        read_metadata(recipe.draft.init_dir)  # a clear error if it is not a fastdraft draft
        return recipe.draft.init_dir
    out = layout.draft("init")
    spec = {"target": recipe.target.model, "params": recipe.draft.params, "layers": recipe.draft.layers,
            "hidden": recipe.draft.hidden, "seed": recipe.pretrain.seed if recipe.pretrain else 0}
    if recipe.draft.init or recipe.draft.head_tokens:  # (unset: the same spec, and key, as before these existed)
        spec.update(init=recipe.draft.init or "scratch", head_tokens=recipe.draft.head_tokens)
    if (out / "fastdraft.json").is_file() and read_metadata(out).extra.get("spec") == spec:
        return out
    make_draft(recipe.target.model, out, params=spec["params"], layers=spec["layers"], hidden=spec["hidden"], seed=spec["seed"],
               init=recipe.draft.init or "scratch")
    meta = read_metadata(out)
    meta.extra["spec"] = spec
    if recipe.draft.head_tokens:
        from fastdraft.checkpoint import load_config
        from fastdraft.tokenizer import load_tokenizer

        meta.extra[HEAD_TOKENS_KEY] = frequent_tokens(pretrain_token_arrays(recipe, layout), recipe.draft.head_tokens,
                                                      load_config(out).vocab_size, load_tokenizer(out).all_special_ids)
    from fastdraft.checkpoint import write_metadata

    write_metadata(out, meta)
    return out


def stage_key(cfg: PretrainConfig, stage: TrainStageConfig, start: DraftMetadata, manifest: dict) -> str:
    """Identity of a stage's output: its settings, its starting draft and its data. Same key = same result."""
    settings = {k: v for k, v in cfg.identity().items() if k not in ("stages", "crash_at_step")}
    if cfg.loss == "ce":  # the key of a CE stage is what it was before the KD losses existed
        settings.pop("loss"), settings.pop("teacher_topk"), settings.pop("teacher_dtype")
    payload = {"stage": stage.model_dump(mode="json"), "settings": settings, "start": start.to_dict()["history"],
               "start_keys": start.extra.get("stage_keys", {}), "data": manifest.get("section_hash") or manifest.get("splits")}
    for record in payload["start"]:
        record.pop("finished_at", None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_dataset(train_dir: Path, in_memory_mb: int):
    """The training rows as a Ray Dataset: streamed from the shards, or from memory when they total at most
    `in_memory_mb` MiB (`pretrain.in_memory_mb`: streaming starts read tasks, seconds each on a small machine).

    Either way one block per shard, in file order, so a resumed run sees the same rows in the same order.
    """
    import pyarrow.parquet as pq
    import ray.data

    files = sorted(train_dir.glob("part-*.parquet"))
    if sum(f.stat().st_size for f in files) > in_memory_mb << 20:
        return ray.data.read_parquet([str(f) for f in files], columns=["input_ids"])
    return ray.data.from_arrow([pq.read_table(f, columns=["input_ids"]) for f in files])


def stage_data(corpus_dir: Path, cfg: PretrainConfig) -> tuple[dict, list]:
    """The training dataset and the first validation micro-batches (read here: they are few)."""
    import pyarrow.parquet as pq

    datasets = {"train": train_dataset(corpus_dir / "train", cfg.in_memory_mb)}
    val_files = sorted((corpus_dir / "validation").glob("part-*.parquet"))
    rows, tables = cfg.micro_batch_size * cfg.eval_batches, []
    for f in val_files:
        if sum(t.num_rows for t in tables) >= rows:
            break
        tables.append(pq.read_table(f, columns=["input_ids"]))
    if not tables:
        return datasets, []
    import pyarrow as pa

    return datasets, validation_batches(pa.concat_tables(tables), cfg.micro_batch_size, cfg.eval_batches)


def train_stage(recipe: Recipe, stage: TrainStageConfig, start_dir: Path, layout: RunLayout) -> dict:
    """Train one stage from `start_dir` (skipped if its output exists with the same key); returns its summary."""
    cfg: PretrainConfig = recipe.pretrain
    start = read_metadata(start_dir)
    corpus_dir = layout.corpus(stage.corpus)
    manifest = read_corpus_manifest(corpus_dir, start.tokenizer_fingerprint, f"draft {start_dir}")
    key = stage_key(cfg, stage, start, manifest)
    out = layout.draft(stage.name)
    if (out / "fastdraft.json").is_file() and read_metadata(out).extra.get("stage_keys", {}).get(stage.name) == key:
        print(f"[{stage.name}] {out} is up to date (key {key}); skipping", flush=True)
        return {"stage": stage.name, "out": str(out), "skipped": True}
    seq_len = manifest["seq_len"]
    world = max(cfg.compute.num_workers, 1)
    run_name = f"{recipe.name}-{stage.name}-{key}"
    storage = layout.train_storage
    storage.mkdir(parents=True, exist_ok=True)
    loop = LoopConfig(
        stage=stage.name, init_dir=str(start_dir), seq_len=seq_len, micro_batch_size=cfg.micro_batch_size,
        grad_accum=cfg.grad_accum, total_steps=steps_for_budget(stage.tokens, world, cfg.grad_accum, cfg.micro_batch_size, seq_len),
        optim=stage.optim or cfg.optim, compute=cfg.compute, token_budget=stage.tokens, eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches, ckpt_every=cfg.ckpt_every, seed=cfg.seed, crash_at_step=cfg.crash_at_step,
        crash_marker=str(storage / f"{run_name}.crashed"), log_path=str(storage / f"{run_name}.metrics.jsonl"),
        meta=start.to_dict(), loss=cfg.loss,
        teacher=recipe.target.model if cfg.loss != "ce" else None, teacher_topk=cfg.teacher_topk, teacher_dtype=cfg.teacher_dtype or recipe.target.dtype,
    )
    datasets, loop.validation = stage_data(corpus_dir, cfg)
    result = fit(loop, datasets, run_name, storage)
    final = result.metrics or {}
    if final.get("tokens") != stage.tokens:
        raise FastdraftError(f"stage {stage.name} ended at {final.get('tokens')} tokens, expected {stage.tokens} (run {run_name})")
    meta = start.with_stage(stage.name, stage.tokens, data=stage.corpus)
    meta.extra.pop("spec", None)
    meta.extra["stage_keys"] = {**start.extra.get("stage_keys", {}), stage.name: key}
    meta.extra.setdefault("metrics", {})[stage.name] = {k: final.get(k) for k in ("loss", "val_loss", "val_ppl", "tokens_per_s", "step")}
    export_draft(result.checkpoint, out, meta)
    return {"stage": stage.name, "out": str(out), "skipped": False, "run": run_name, "steps": final.get("step"),
            "tokens": final.get("tokens"), "loss": final.get("loss"), "val_loss": final.get("val_loss"),
            "tokens_per_s": final.get("tokens_per_s"), "log": loop.log_path, "reports": len(read_log(loop.log_path))}


def run_pretrain(recipe: Recipe, **_options) -> dict:
    """Pre-train the draft through every `pretrain.stages` entry; returns a summary per stage."""
    from fastdraft.raycluster import ensure_ray

    recipe.section("pretrain")
    check_stage(recipe, "pretrain")  # refuses, before anything starts, workers that would not fit their memory
    layout = RunLayout(recipe.run_dir)
    start = initial_draft(recipe, layout)
    fingerprint = read_metadata(start).tokenizer_fingerprint
    for stage in recipe.pretrain.stages:  # every stage's data is checked before any training starts
        read_corpus_manifest(layout.corpus(stage.corpus), fingerprint, f"draft {start} (stage {stage.name})")
    ensure_ray()
    summary = {"init": str(start)}
    for stage in recipe.pretrain.stages:
        summary[stage.name] = train_stage(recipe, stage, start, layout)
        start = layout.draft(stage.name)
    summary["final"] = str(start)
    return summary
