"""`fastdraft plan`: what each stage runs where, and each worker's peak memory, before anything starts.

    fastdraft plan jobs/recipes/llama31-8b.yaml                      # against the recipe's `cluster` section
    fastdraft plan jobs/recipes/demo.yaml --set pretrain.micro_batch_size=64

The estimate counts, per worker:
- training (pretrain stages, distill): fp32 master weights, gradients and AdamW's two moments (16 bytes a
  parameter), DDP's gradient buckets with several workers, autocast's bf16 weight copies, the activations
  autograd keeps (per token and layer: `ACT_HIDDEN` x hidden + `ACT_MLP` x intermediate values, measured for
  transformers' Llama layers; SDPA keeps no attention scores, packed rows included), and one chunk of logits
  with its fp32 log-softmax and gradient (`compute.logits_chunk_tokens`: the loss never holds the whole micro-batch's);
- generation and evaluation: the target's (and draft's) weights in the recipe's dtype, KV caches for the
  batch at its longest, and one step's logits;
- the driver: distill's held-out rows and the draft it scores before training (the alignment set streams
  through Ray Data to the workers); generate's progress records and Magpie's user turns (the prompts, planned
  rows, written keys and answers stay on the workers).

It compares that with what the cluster offers: the recipe's `cluster` section (accelerator, or device memory,
and host memory per node), else the connected Ray cluster (`accelerator_type:*` resources, node memory), else
this machine for CPU stages. A stage that does not fit is refused, naming the number and the setting to change;
every stage runs the same check when it starts (`check_stage`). Tested to within 25% of the measured peak at
small shapes on CPU (tests/test_plan.py); `jobs/device_check.py` puts the estimate beside a GPU's peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from fastdraft.config import ComputeConfig, Recipe
from fastdraft.errors import FastdraftError
from fastdraft.generation.backends import generation_dtype

GB = 1e9
ACT_HIDDEN = 16
"""Values autograd keeps per token and decoder layer, in units of the hidden size (norm inputs and outputs,
q/k/v and their rotary copies, attention output, residuals), fitted on transformers' Llama layers."""
ACT_MLP = 4
"""... and in units of the MLP width (gate, up, their activation and product)."""

DEVICE_MEMORY_GB = {"A10G": 24, "L4": 24, "L40S": 48, "A100-40G": 40, "A100-80G": 80, "A100": 80, "H100": 80,
                    "H200": 141, "Gaudi2": 96, "Gaudi3": 128}
"""Memory per accelerator, by the name Ray's `accelerator_type:*` resource and the recipe's `cluster.accelerator` use."""

KNOWN_TARGETS: dict[str, dict] = {
    # The paper recipes' targets (public configs), for planning where the weights are not on this machine.
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, head_dim=128,
                         max_position_embeddings=131072, tie_word_embeddings=False, rope_theta=500000.0),
    "phi-3-mini-4k": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192,
                          max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=False),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Item:
    what: str
    bytes: float


@dataclass
class StagePlan:
    stage: str
    where: str
    items: list[Item]
    available: float | None
    """Bytes the worker may use (None: unknown, the plan cannot refuse)."""
    available_from: str
    fix: str
    """The settings that lower the peak, named in a refusal."""
    workers_per_pool: int = 1
    """CPU stages share one node's memory: this many workers count against it together."""
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(i.bytes for i in self.items)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak * self.workers_per_pool <= self.available


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
def target_config(recipe: Recipe) -> tuple[PretrainedConfig, str]:
    """The target's config and where it came from (its directory, or the known-models table)."""
    from fastdraft.assets import resolve_model_path

    path = recipe.target.model
    try:
        return AutoConfig.from_pretrained(resolve_model_path(path), local_files_only=True,
                                          trust_remote_code=recipe.target.trust_remote_code), path
    except (OSError, ValueError, FastdraftError):
        key = next((k for k in KNOWN_TARGETS if k in Path(path).name.lower()), None)
        if key is None:
            raise FastdraftError(f"plan: target.model '{path}' is not a model directory here, and not one of the "
                                 f"known targets ({', '.join(KNOWN_TARGETS)}); run plan where the model is") from None
        data = dict(KNOWN_TARGETS[key])
        return AutoConfig.for_model(data.pop("model_type"), **data), f"fastdraft's table of known targets ({key}; {path} is not here)"


def draft_config_for(recipe: Recipe, target: PretrainedConfig) -> PretrainedConfig:
    """The draft's config as `make-draft` would build it from the recipe (no weights are made)."""
    from fastdraft.models import choose_shape, draft_config

    d = recipe.draft
    if d.init_dir is not None:
        return AutoConfig.from_pretrained(d.init_dir, local_files_only=True)
    if d.init == "target":
        data = {**target.to_dict(), "num_hidden_layers": d.layers}
        if data.get("layer_types"):
            data["layer_types"] = data["layer_types"][:d.layers]
        return AutoConfig.for_model(data.pop("model_type"), **data)
    return draft_config(target, choose_shape(target, d.params, d.layers, d.hidden))


def params_of(cfg: PretrainedConfig) -> int:
    from fastdraft.models import count_params

    return count_params(cfg)[0]


def _head_dim(cfg: PretrainedConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ------------------------------------------------------------------------------------------------
# Per-worker memory
# ------------------------------------------------------------------------------------------------
def training_items(cfg: PretrainedConfig, rows: int, seq_len: int, compute: ComputeConfig, head_rows: int | None = None,
                   topk: int = 0, loss_fraction: float = 1.0) -> list[Item]:
    """One training worker's peak: a micro-batch of `rows` x `seq_len` through `cfg` with the chunked loss,
    which applies the output layer only where there is loss (`loss_fraction` of the positions)."""
    n = params_of(cfg)
    tokens = rows * seq_len
    bf16 = compute.precision == "bf16"
    act = 3 if bf16 else 4  # autocast keeps matmul inputs in bf16 and norms in fp32
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    items = [Item("weights (fp32 master)", 4 * n), Item("gradients (fp32)", 4 * n), Item("AdamW moments", 8 * n)]
    if compute.num_workers > 1:
        items.append(Item("DDP gradient buckets", 4 * n))
    if bf16:
        items.append(Item("bf16 weight copies (autocast)", 2 * n))
    items.append(Item(f"activations ({rows} x {seq_len} tokens, {layers} layers)",
                      tokens * layers * (ACT_HIDDEN * h + ACT_MLP * i) * act + tokens * h * 4 * 3))
    vocab = head_rows or cfg.vocab_size
    chunk = min(compute.logits_chunk_tokens, max(1, int(tokens * loss_fraction)))
    # recomputed in backward: the chunk's logits, their fp32 log-softmax and its gradient, then the logits' gradient
    items.append(Item(f"logits chunk ({chunk} x {vocab})", chunk * vocab * (act + 4 + 4)))
    items.append(Item("batch", tokens * (8 + 12 * topk) * 2))
    return items


def teacher_items(cfg: PretrainedConfig, rows: int, seq_len: int, compute: ComputeConfig, dtype: str) -> list[Item]:
    """An online-KD teacher in a training worker: its weights, one layer's activations at a time (no autograd),
    its last hidden states and one chunk of full-vocabulary logits with their log-softmax."""
    b = DTYPE_BYTES[dtype]
    tokens = rows * seq_len
    chunk = min(compute.logits_chunk_tokens, tokens)
    return [Item(f"teacher weights ({dtype})", params_of(cfg) * b),
            Item("teacher activations (one layer, no grad)", tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * b),
            Item(f"teacher logits chunk ({chunk} x {cfg.vocab_size})", chunk * cfg.vocab_size * (b + 4 + 4))]


def kv_cache_bytes(cfg: PretrainedConfig, rows: int, length: int, dtype_bytes: int) -> float:
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None)
    length = min(length, window) if window else length
    return 2 * cfg.num_hidden_layers * rows * length * kv_heads * _head_dim(cfg) * dtype_bytes


def inference_items(models: dict[str, PretrainedConfig], rows: int, length: int, dtype: str) -> list[Item]:
    """Weights, KV caches at `length` tokens for `rows` sequences, and one step's logits, per model."""
    b = DTYPE_BYTES[dtype]
    items = []
    for name, cfg in models.items():
        items.append(Item(f"{name} weights ({dtype})", params_of(cfg) * b))
        items.append(Item(f"{name} KV cache ({rows} x {length} tokens)", kv_cache_bytes(cfg, rows, length, b)))
        items.append(Item(f"{name} logits", rows * cfg.vocab_size * 4 * 2))
    return items


# ------------------------------------------------------------------------------------------------
# What the cluster offers
# ------------------------------------------------------------------------------------------------
def offered(recipe: Recipe, device: str) -> tuple[float | None, str]:
    """Bytes one worker on `device` may use, and where that number comes from."""
    spec = recipe.cluster
    if device in ("cuda", "hpu"):
        if spec is not None and spec.device_memory_gb:
            return spec.device_memory_gb * GB, "cluster.device_memory_gb"
        if spec is not None and spec.accelerator:
            return DEVICE_MEMORY_GB[spec.accelerator] * GB, f"cluster.accelerator ({spec.accelerator})"
        name = _ray_accelerator()
        if name is not None and name in DEVICE_MEMORY_GB:
            return DEVICE_MEMORY_GB[name] * GB, f"the Ray cluster's accelerator_type:{name}"
        return None, "unknown: set cluster.accelerator or cluster.device_memory_gb"
    if spec is not None and spec.node_memory_gb:
        return spec.node_memory_gb * GB, "cluster.node_memory_gb"
    ray_memory = _ray_node_memory()
    if ray_memory:
        return ray_memory, "the Ray cluster's largest node"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def _ray_accelerator() -> str | None:
    try:
        import ray
        if not ray.is_initialized():
            return None
        names = [k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:")]
    except Exception:
        return None
    return names[0] if names else None


def _ray_node_memory() -> float | None:
    try:
        import ray
        if not ray.is_initialized():
            return None
        # Ray's "memory" resource is what it schedules against (70% of the node by default); plan compares with
        # the node's whole memory, so use the larger: the object store is on top of it.
        return max((n["Resources"].get("memory", 0) + n["Resources"].get("object_store_memory", 0))
                   for n in ray.nodes() if n.get("Alive")) or None
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
def _where(compute: ComputeConfig) -> str:
    dev = {"cpu": "CPU", "cuda": "GPU", "hpu": "Gaudi"}[compute.device]
    per = f"{compute.gpus_per_worker or 1:g} {dev}" if compute.device != "cpu" else f"{compute.cpus_per_worker:g} CPU"
    return f"{compute.num_workers} Ray Train worker(s) x {per}, {compute.precision}"


def _training_plan(recipe: Recipe, stage: str, label: str, cfg: PretrainedConfig, rows: int, seq_len: int,
                   compute: ComputeConfig, topk: int) -> StagePlan:
    available, source = offered(recipe, compute.device)
    head = recipe.draft.head_tokens
    return StagePlan(f"{stage} {label}".strip(), _where(compute), training_items(cfg, rows, seq_len, compute, head, topk),
                     available, source, f"{stage}.micro_batch_size (raise {stage}.grad_accum to keep the batch), "
                     f"{'prepare.seq_len' if stage == 'pretrain' else 'distill.seq_len'}, {stage}.compute.logits_chunk_tokens",
                     workers_per_pool=compute.num_workers if compute.device == "cpu" else 1)


def plan(recipe: Recipe, stages: list[str] | None = None) -> list[StagePlan]:
    """Every stage's plan (or only `stages`)."""
    tcfg, tsource = target_config(recipe)
    dcfg = draft_config_for(recipe, tcfg)
    dtype = recipe.target.dtype
    want = set(stages) if stages else {"pretrain", "generate", "distill", "evaluate", "serve"}
    out: list[StagePlan] = []
    if recipe.pretrain is not None and "pretrain" in want:
        p = recipe.pretrain
        seq = recipe.prepare.seq_len if recipe.prepare is not None else 2048
        for s in p.stages:
            stage_plan = _training_plan(recipe, "pretrain", s.name, dcfg, p.micro_batch_size, seq, p.compute,
                                        p.teacher_topk if p.loss != "ce" else 0)
            if p.loss != "ce":  # online KD: the target runs forward in the worker (no gradients, no activations kept)
                stage_plan.items += teacher_items(tcfg, p.micro_batch_size, seq, p.compute, p.teacher_dtype or dtype)
            out.append(stage_plan)
    if recipe.generate is not None and "generate" in want:
        g = recipe.generate
        length = g.max_prompt_tokens + max(s.max_new_tokens for s in g.sampling)
        device = "cuda" if g.engine == "vllm" or g.gpus_per_actor else "cpu"
        available, source = offered(recipe, device)
        gen_dtype = generation_dtype(g.dtype, dtype, device)  # `auto`: as an actor on this machine resolves it
        items = inference_items({"target": tcfg}, g.batch_size, length, gen_dtype)
        notes = []
        others = {name: e for name, e in g.engines().items() if e != g.engine}
        if others:  # each other engine runs its own step beside this one (generation.pipeline.answer_by_engine)
            notes.append("sources with their own engine, in a pool of their own: "
                         + ", ".join(f"{name} ({e})" for name, e in others.items()) + "; this line is generate.engine's")
        if g.engine == "openai":  # the endpoint holds the target: the actors hold requests and answers
            items = [Item(f"requests and answers in flight ({g.batch_size} rows)", g.batch_size * length * 8 * (1 + 2 * g.store_topk))]
            notes.append("the target runs behind the endpoint (generate.openai), not on this cluster")
        if g.engine == "vllm":
            util = float(g.engine_kwargs.get("gpu_memory_utilization", 0.9))
            notes.append(f"vLLM pre-allocates {util:.0%} of the GPU and pages the KV cache within it: the batch "
                         f"shares what the weights leave (engine_kwargs.gpu_memory_utilization)")
            available = available * util if available else None
            items = [i for i in items if "KV" not in i.what] + [
                Item("target KV cache (one sequence at its longest; vLLM pages the rest)", kv_cache_bytes(tcfg, 1, length, DTYPE_BYTES[gen_dtype]))]
        where = f"{g.max_actors} generation actor(s) x {g.gpus_per_actor:g} GPU ({g.engine})" if device == "cuda" \
            else f"{g.max_actors} generation actor(s) x {g.cpus_per_actor:g} CPU ({g.engine})"
        out.append(StagePlan("generate", where, items, available, source,
                             "generate.batch_size, generate.max_prompt_tokens, generate.sampling[*].max_new_tokens, "
                             "generate.dtype", notes=notes))
        out.append(_generate_driver_plan(recipe))
    if recipe.distill is not None and "distill" in want:
        d = recipe.distill
        topk = recipe.generate.store_topk if recipe.generate is not None and d.loss != "ce" else 0
        out.append(_training_plan(recipe, "distill", "", dcfg, d.micro_batch_size, d.seq_len, d.compute, topk))
        out.append(_distill_driver_plan(recipe, dcfg, topk))
    if recipe.evaluate is not None and "evaluate" in want:
        e = recipe.evaluate
        length = max(t.max_prompt_tokens + t.max_new_tokens for t in e.tasks) + max(e.gammas + [e.gamma])
        available, source = offered(recipe, e.device)
        out.append(StagePlan("evaluate", f"one measurement task at a time x {'1 GPU' if e.device == 'cuda' else f'{e.cpus_per_task:g} CPU'}",
                             inference_items({"target": tcfg, "draft": dcfg}, 1, length, dtype), available, source,
                             "evaluate.device, target.dtype, evaluate.tasks[*].max_prompt_tokens"))
    if recipe.serve is not None and "serve" in want:
        s = recipe.serve
        available, source = offered(recipe, s.device)
        out.append(StagePlan("serve", f"{s.num_replicas} replica(s) on {s.device}",
                             inference_items({"target": tcfg, "draft": dcfg}, s.max_batch_size,
                                             min(s.max_tokens_cap + 2048, tcfg.max_position_embeddings), dtype),
                             available, source, "serve.max_batch_size, serve.max_tokens_cap, target.dtype"))
    if out:
        out[0].notes.insert(0, f"target shape from {tsource}")
    return out


def _driver_plan(recipe: Recipe, stage: str, items: list[Item], settings: str, notes: list[str]) -> StagePlan:
    """A stage's driver process against `cluster.driver_memory_gb` (unknown without it)."""
    spec = recipe.cluster
    available = spec.driver_memory_gb * GB if spec is not None and spec.driver_memory_gb else None
    return StagePlan(stage, "the driver process", items, available,
                     "cluster.driver_memory_gb" if available else "unknown: set cluster.driver_memory_gb",
                     f"{settings}, cluster.driver_memory_gb", notes=notes)


def _distill_driver_plan(recipe: Recipe, dcfg: PretrainedConfig, topk: int) -> StagePlan:
    """The driver reads the alignment set one column of one file at a time and packs only the held-out rows."""
    g, d = recipe.generate, recipe.distill
    per_row = g.max_prompt_tokens // 4 + max(s.max_new_tokens for s in g.sampling) if g is not None else d.seq_len
    held_rows = d.eval_prompts * (sum(s.n for s in g.sampling) if g is not None else 1)
    items = [Item(f"held-out rows ({held_rows:,} samples, packed)", held_rows * per_row * (8 + 12 * topk) * 3),
             Item("draft (fp32) for the agreement before training", params_of(dcfg) * 4)]
    return _driver_plan(recipe, "distill driver", items, "distill.eval_prompts", notes=[
        "the alignment set streams through Ray Data to the workers; the driver reads one column of one part file at a "
        "time; the target's held-out predictions run in a task on the training device"])


def _generate_driver_plan(recipe: Recipe) -> StagePlan:
    """The generate driver holds no prompt, planned row, written key or answer: Ray tasks encode the prompt set,
    Ray Data plans, filters and generates, the workers write the parts, and the driver gets a summary per part.
    What remains grows with Magpie's `limit` (the user turns the target writes), not with the prompt set."""
    from fastdraft.generation.prompts import MAGPIE_CHUNK, MAGPIE_QUERY_TOKENS

    g = recipe.generate
    magpie = sum(int(s.limit or 0) for s in g.prompts if s.kind == "magpie")
    # summaries are counted and dropped as they arrive: what stays is counters, the actor ids and the manifest
    items = [Item(f"per-source stats, progress counters, the manifest ({len(g.prompts)} sources, {g.max_actors} actors)", 1e6)]
    if magpie:
        # a user turn: up to MAGPIE_QUERY_TOKENS tokens, ~4 characters each, kept as text in the state (and its JSON)
        items.append(Item(f"Magpie user turns kept ({magpie:,} texts)", magpie * MAGPIE_QUERY_TOKENS * 4 * 3))
        # one chunk of answers in flight as Python lists of ints (8-byte pointer + 28-byte int a token)
        items.append(Item(f"Magpie answers of one chunk ({MAGPIE_CHUNK} x {MAGPIE_QUERY_TOKENS} tokens)",
                          MAGPIE_CHUNK * MAGPIE_QUERY_TOKENS * 36 * 2))
    return _driver_plan(recipe, "generate driver", items, "generate.prompts[magpie].limit", notes=[
        "flat in the number of prompts: one Ray task per source encodes the prompt set to Parquet, Ray Data plans the "
        "rows and filters the keys already written (held in the object store), the workers write the parts; the driver "
        "streams one summary per part (rows, tokens)"])


def check_stage(recipe: Recipe, stage: str) -> list[StagePlan]:
    """Refuse a stage whose workers would not fit (called when each stage starts).

    A target or draft that cannot be read here is left to the stage itself, which names what is missing."""
    try:
        plans = plan(recipe, [stage])
    except (FastdraftError, OSError, ValueError):
        return []
    for p in plans:
        if not p.fits:
            raise FastdraftError(
                f"{p.stage} needs about {p.peak / GB:.1f} GB per worker"
                f"{f' x {p.workers_per_pool} workers on one node' if p.workers_per_pool > 1 else ''}"
                f" and {p.available_from} offers {p.available / GB:.1f} GB; "
                f"lower one of: {p.fix} (fastdraft plan {recipe.name}.yaml shows the breakdown)")
    return plans


def format_plan(plans: list[StagePlan]) -> str:
    lines = []
    for p in plans:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        have = f"{p.available / GB:.1f} GB ({p.available_from})" if p.available else p.available_from
        total = f"{p.peak / GB:.2f} GB" + (f" x {p.workers_per_pool} workers" if p.workers_per_pool > 1 else "")
        lines.append(f"{p.stage}: {p.where}; peak {total} per worker, offered {have}: {verdict}")
        lines += [f"    {i.bytes / GB:8.2f} GB  {i.what}" for i in p.items if i.bytes]
        lines += [f"    note: {n}" for n in p.notes]
        if not p.fits:
            lines.append(f"    lower one of: {p.fix}")
    return "\n".join(lines)
