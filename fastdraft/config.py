"""Typed recipes: one config model per stage, loaded from YAML, overridden from the command line.

A recipe is one YAML file with a section per stage (see `jobs/recipes/demo.yaml`):

    name: demo
    workdir: runs/demo
    target: {model: embedded:smollm2-135m-instruct}
    draft: {params: 10M}
    prepare: {...}   pretrain: {...}   generate: {...}   distill: {...}   evaluate: {...}   serve: {...}

Unknown keys and wrong types are errors that name the key and the file. Overrides use dotted paths,
`--set pretrain.optim.lr=3e-4`, and their values are parsed as YAML scalars/lists.

Token counts accept suffixes: `5B`, `2.5B`, `300M`, `64k` (see `parse_count`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from fastdraft.errors import RecipeError

_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(value: Any) -> Any:
    """'5B' -> 5_000_000_000, '50M' -> 50_000_000, 1e6 -> 1_000_000; other values pass through."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKMBGT]?)\s*", value)
        if not m:
            raise ValueError(f"expected a count such as 5B, 300M, 64k or 1000, got {value!r}")
        return int(round(float(m.group(1)) * _SUFFIXES.get(m.group(2), 1)))
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(parse_count)]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    SCHEDULING_ONLY: ClassVar[frozenset[str]] = frozenset()
    """Fields that change how a stage is scheduled (CPUs, threads, actors, retries), not what it computes."""
    KEYED_WHEN_SET: ClassVar[frozenset[str]] = frozenset()
    """Fields added after recipes were keyed: part of the identity only when set, so those keys stay as they were."""

    def identity(self) -> dict:
        """The section as JSON without its scheduling-only fields, at every depth: what decides its outputs
        (stage keys and `Recipe.section_hash` use it, so changing threads or CPUs never reruns a stage)."""
        unset = {name for name in self.KEYED_WHEN_SET if getattr(self, name) is None}
        data = self.model_dump(mode="json", exclude=set(self.SCHEDULING_ONLY) | unset)
        for name, value in self:
            if isinstance(value, Strict) and name in data:
                data[name] = value.identity()
        return data


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class TargetConfig(Strict):
    model: str = "embedded:smollm2-135m-instruct"
    """A local Hugging Face directory, or `embedded:smollm2-135m-instruct` (works offline)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    """Never set unless you trust the model's repository: it runs code from it."""


class DraftConfig(Strict):
    params: Count | None = 10_000_000
    """Parameter budget for `make-draft` (embeddings and head included)."""
    layers: int | None = Field(default=None, ge=1)
    hidden: int | None = Field(default=None, ge=16)
    init: str | None = None
    """How the draft starts: `scratch` (default when unset: random weights in a scaled-down shape, the paper's
    recipe), `target` (the target's first `layers` layers with its embeddings, final norm and head: acceptance
    comes much sooner on a small budget; needs `layers`, keeps the target's width), or an existing draft
    directory."""
    head_tokens: Count | None = Field(default=None, ge=16)
    """Output layer over only this many tokens, the most frequent in the training data (the alignment set's
    responses first at distill); the draft proposes only those. Lossless: the target verifies with its full
    distribution. On a small target the head is most of the draft's cost (49k x 576 of SmolLM2's 135M).
    Unset: the whole vocabulary. Drafts keep the full embedding table, so every engine loads them as they are."""

    @property
    def init_dir(self) -> Path | None:
        """The draft directory `init` names, or None when the draft is built (`scratch`, `target`)."""
        return None if self.init in (None, "scratch", "target") else Path(self.init)


# --------------------------------------------------------------------------------------------
# prepare: corpora -> packed shards
# --------------------------------------------------------------------------------------------
SourceKind = Literal["hf", "parquet", "jsonl", "files", "stdlib_code", "stdlib_prose", "text_files"]


class SourceConfig(Strict):
    name: str
    kind: SourceKind
    """hf: a datasets name or local dataset dir; parquet/jsonl: files or globs; files: a directory of
    source files filtered by `extensions`; stdlib_code / stdlib_prose: the offline Python corpora;
    text_files: a directory of plain-text documents (one document per file)."""
    path: str | None = None
    hf_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    extensions: list[str] = Field(default_factory=lambda: [".py"])
    tokens: Count | None = None
    """Stop reading this source once this many tokens have been written (its budget)."""
    weight: float | None = Field(default=None, gt=0)
    """Mixing weight; with a corpus-level `tokens` budget, this source gets weight/sum of it."""

    @model_validator(mode="after")
    def _needs_path(self):
        if self.kind not in ("stdlib_code", "stdlib_prose") and not self.path:
            raise ValueError(f"source '{self.name}' of kind '{self.kind}' needs a 'path'")
        return self


class CorpusConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    tokens: Count | None = None
    """Total token budget of this corpus, split between sources by `weight`."""


class PrepareConfig(Strict):
    seq_len: int = Field(default=512, ge=8)
    validation_fraction: float = Field(default=0.01, ge=0, lt=1)
    """Share of *documents* held out (by a hash of the document, so no document is in both)."""
    docs_per_batch: int = Field(default=512, ge=1)
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=2, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    corpora: dict[str, CorpusConfig] = Field(default_factory=dict)
    """Named corpora, e.g. `pt` (FineWeb) and `cp` (code + text); each becomes `data/<name>/`."""


# --------------------------------------------------------------------------------------------
# One training loop for pretrain and distill
# --------------------------------------------------------------------------------------------
class OptimConfig(Strict):
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, ge=0)
    freeze_embeddings: bool = False
    """Keep the draft's token embeddings as they are (and the output layer, where it is tied to them, as SmolLM2's
    and the demo's drafts are): for a draft that starts from the target's weights (`draft.init: target`) they are
    already the target's own. Updating them is most of a small draft's optimizer work: AdamW over the demo draft's
    28.3M embedding weights against 7.1M in its 2 layers."""


class ComputeConfig(Strict):
    device: Literal["cpu", "cuda", "hpu"] = "cpu"
    num_workers: int = Field(default=1, ge=0)
    """0 runs the loop in the driver process (Ray Train local mode)."""
    cpus_per_worker: float = Field(default=0.5, gt=0)
    """Keep below the node's CPUs: workers that hold every CPU starve the Ray Data reads."""
    gpus_per_worker: float = Field(default=0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    max_failures: int = Field(default=2, ge=-1)
    torch_threads: int | None = Field(default=None, ge=1)
    """CPU training: torch threads per worker; default: one per CPU Ray reserved for it. More threads than
    reserved CPUs lets a lone worker use the whole machine while its few CPUs stay free for the data reads."""
    logits_chunk_tokens: int = Field(default=2048, ge=1)
    """Training losses apply the output layer to this many positions at a time (fastdraft.training.losses.
    ChunkedLMLoss): the peak of the logits is chunk x vocabulary, not micro-batch x sequence x vocabulary."""

    SCHEDULING_ONLY = frozenset({"max_failures", "cpus_per_worker", "torch_threads", "logits_chunk_tokens"})


class TrainStageConfig(Strict):
    name: str
    """Stage label recorded in the draft's history, e.g. PT, CP."""
    corpus: str
    """Which `prepare.corpora` entry to train on."""
    tokens: Count = Field(gt=0)
    """Token budget of this stage: the run ends after exactly this many training tokens."""
    optim: OptimConfig | None = None
    """Overrides `pretrain.optim` for this stage."""


class PretrainConfig(Strict):
    stages: list[TrainStageConfig] = Field(min_length=1)
    micro_batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    optim: OptimConfig = OptimConfig()
    compute: ComputeConfig = ComputeConfig()
    eval_every: int = Field(default=200, ge=1)
    """Steps between validation-loss evaluations."""
    eval_batches: int = Field(default=8, ge=1)
    ckpt_every: int = Field(default=200, ge=1)
    seed: int = 0
    crash_at_step: int | None = None
    """Testing aid: raise once at this step (first attempt only) to exercise resume."""
    in_memory_mb: int = Field(default=64, ge=0)
    """A stage whose training shards total at most this many MiB reaches Ray Train from memory (no read tasks to
    start: 9 s of a 2-step run on 2 cores); bigger ones stream from the shards. 0: always stream."""
    loss: Literal["ce", "kl", "tvd", "ce+kl", "ce+tvd"] = "ce"
    """`ce`: next-token cross-entropy on the corpus (the paper's PT and CP). The others distil the target on the
    corpus, online: each micro-batch first goes through the target (`target.model`, in the training worker, no
    gradients), whose top `teacher_topk` log-probs per position are the soft labels (`losses.sparse_kd`), so the
    draft learns the target's next-token distribution, which is what acceptance measures, rather than the
    corpus's next token. It costs one target forward per micro-batch: the demo's PT + CP took 18 minutes instead of
    5.4 on 2 cores shared with generation."""
    teacher_topk: int = Field(default=32, ge=1)
    """With a KD `loss`: how many of the target's log-probs per position the draft is trained on (+ a rest bucket)."""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The target's dtype as the online teacher (default: `target.dtype`). Its log-probs are soft labels only, so
    bfloat16 serves: on a CPU with AMX (Sapphire Rapids) it runs the teacher's pass 1.6x faster than float32."""

    SCHEDULING_ONLY = frozenset({"in_memory_mb"})


# --------------------------------------------------------------------------------------------
# generate: prompts -> target responses
# --------------------------------------------------------------------------------------------
PromptFormat = Literal["auto", "alpaca", "dolly", "sharegpt", "messages", "plain", "code"]


class PromptSourceConfig(Strict):
    name: str
    kind: Literal["jsonl", "parquet", "hf", "stdlib_code", "magpie"]
    path: str | None = None
    format: PromptFormat = "auto"
    text_field: str = "prompt"
    limit: Count | None = None
    """At most this many prompts from this source."""
    split: str = "train"
    """kind hf: the split to read."""
    template: Literal["auto", "chat", "raw"] = "auto"
    """auto: the target's chat template when it has one, except `code` prompts, which the target continues
    as they are (raw); chat / raw force one or the other."""
    engine: Literal["transformers", "lean", "vllm", "openai"] | None = None
    """Who answers this source's prompts; default: `generate.engine`. One recipe can send some sources to an
    endpoint (`openai`, with `generate.openai`) and others to a local engine; each row's `origin` says which."""


class SamplingConfig(Strict):
    temperature: float = Field(default=0.0, ge=0)
    """0 means greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=256, ge=1)
    n: int = Field(default=1, ge=1)
    """Samples per prompt at this setting."""


class OpenAIEndpointConfig(Strict):
    """`generate.engine: openai`: the target answers through an OpenAI-compatible HTTP endpoint (vLLM, SGLang,
    TGI, fastdraft's own server...). The recipe's `target.model` is still needed locally: fastdraft renders the
    chat template and tokenizes the prompts itself, and the endpoint's tokenizer is checked against it."""

    base_url: str
    """Up to and including `/v1`, e.g. http://vllm.internal:8000/v1."""
    model: str
    """The endpoint's model name (the `id` in GET /v1/models)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (sent as a bearer token); None: no key."""
    max_concurrency: int = Field(default=8, ge=1)
    """Requests in flight per generation actor (at most generate.batch_size: one actor answers one batch at a time)."""
    requests_per_s: float | None = Field(default=None, gt=0)
    """Request starts per second per generation actor (retries included); None: no limit."""
    max_retries: int = Field(default=8, ge=0)
    """Retries of one request on 408/409/429/5xx, timeouts and dropped connections, with exponential backoff."""
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    """Each retry waits min(backoff_max_s, backoff_initial_s * 2**attempt) (jittered), or the server's Retry-After."""
    timeout_s: float = Field(default=600.0, gt=0)
    """One request's timeout (connect, read, write), a retryable failure."""
    prompt_format: Literal["auto", "token_ids", "text"] = "auto"
    """token_ids: send the prompt's exact ids (vLLM, SGLang and fastdraft's server accept them); text: send the
    prompt text, which the server re-tokenizes; auto: token ids when a probe request shows the server takes them."""
    vllm_extensions: bool = True
    """Send vLLM's extra request fields (return_token_ids, return_tokens_as_token_ids, top_k, stop_token_ids,
    add_special_tokens, skip_special_tokens): exact response ids and log-prob ids. Off for strict OpenAI servers
    (then token strings are mapped back to ids through the target's vocabulary)."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Merged into every completion request as it is."""
    tokenizer_check: Literal["auto", "fingerprint", "probe"] = "auto"
    """auto: compare GET /v1/models' `tokenizer_fingerprint` when the model entry has one, else probe strings
    through the endpoint (round trips and prompt token counts); a mismatch is refused either way."""

    SCHEDULING_ONLY = frozenset({"api_key_env", "max_concurrency", "requests_per_s", "max_retries", "backoff_initial_s",
                                 "backoff_max_s", "timeout_s"})


class GenerateConfig(Strict):
    engine: Literal["transformers", "lean", "vllm", "openai"] = "transformers"
    """transformers (any causal LM, any device); lean (fastdraft's own decoder for the Llama family: no padding
    computed, 1.45x transformers measured on 2 CPU cores); vllm (GPU actors, the `[gpu]` extra); openai (an
    OpenAI-compatible endpoint, `generate.openai`)."""
    openai: OpenAIEndpointConfig | None = None
    """The endpoint of `engine: openai`."""
    prompts: list[PromptSourceConfig] = Field(min_length=1)
    sampling: list[SamplingConfig] = Field(default_factory=lambda: [SamplingConfig()])
    max_prompt_tokens: int = Field(default=512, ge=1)
    overlong: Literal["truncate", "skip"] = "skip"
    batch_size: int = Field(default=16, ge=1)
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)
    """CPU engines: torch threads per actor; default: one per CPU Ray reserved for it. A lone actor may use
    more threads than it reserves (the whole machine) while the rest stays free for Ray Data's own tasks."""
    gpus_per_actor: float = Field(default=0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    """The target's dtype while it generates; default: `target.dtype`. `auto`: bfloat16 on a CPU actor whose CPU has
    AMX tiles (Intel Sapphire Rapids and later), else `target.dtype` (vLLM: its own `auto`). With AMX, bfloat16
    generates SmolLM2's answers at 336 tok/s against 168 in float32 (batch 64, 2 cores, `jobs/bench_generate.py
    --lean-bf16`, measured 2026-12-06); the answers and the stored top-k are then the bfloat16 target's, a rounding
    away from the float32 target's."""
    store_topk: int = Field(default=0, ge=0)
    """Store the target's top-k log-probs per response token (for token-level KD); 0 = off."""
    seed: int = 0
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to the engine as they are, e.g. vLLM's engine arguments `{gpu_memory_utilization: 0.9,
    tensor_parallel_size: 2}` (Ray Data LLM's `engine_kwargs`, see `generation/vllm_processor.py`)."""
    runtime_env: dict[str, Any] | None = None
    """Ray runtime_env of the generation actors, e.g. `{pip: [vllm==0.33.0]}` or `{image_uri: ...}`: vLLM cannot
    share the CPU stack's environment."""

    SCHEDULING_ONLY = frozenset({"min_actors", "max_actors", "cpus_per_actor", "torch_threads"})
    KEYED_WHEN_SET = frozenset({"dtype"})

    def engines(self) -> dict[str, str]:
        """Source name -> the engine that answers it (its own `engine`, else `generate.engine`)."""
        return {source.name: source.engine or self.engine for source in self.prompts}

    @model_validator(mode="after")
    def _endpoint(self):
        engines = self.engines()
        if "openai" in engines.values() and self.openai is None:
            users = [name for name, e in engines.items() if e == "openai"]
            raise ValueError(f"engine 'openai' (generate.engine or generate.prompts[].engine of {', '.join(users)}) needs "
                             f"a generate.openai section (base_url, model, ...)")
        if "openai" not in engines.values() and self.openai is not None:
            raise ValueError(f"generate.openai is set but no source uses it (generate.engine is {self.engine!r}); set "
                             f"engine: openai on generate or on the sources the endpoint should answer")
        if self.openai is not None and self.openai.max_concurrency > self.batch_size:
            raise ValueError(f"generate.openai.max_concurrency ({self.openai.max_concurrency}) exceeds generate.batch_size "
                             f"({self.batch_size}): an actor answers one batch at a time, so raise batch_size")
        return self


# --------------------------------------------------------------------------------------------
# distill: sequence-level KD (+ optional token-level KD)
# --------------------------------------------------------------------------------------------
class DistillConfig(Strict):
    init: str | None = None
    """Draft to start from; default: the last pretrain stage's output."""
    loss: Literal["ce", "kl", "tvd", "ce+kl", "ce+tvd"] = "ce"
    epochs: int = Field(default=1, ge=1)
    tokens: Count | None = None
    """Token budget; overrides epochs when set."""
    seq_len: int = Field(default=512, ge=8)
    packing: bool = True
    micro_batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    optim: OptimConfig = OptimConfig(lr=3e-4, warmup_steps=20)
    compute: ComputeConfig = ComputeConfig()
    eval_every: int = Field(default=50, ge=1)
    eval_prompts: int = Field(default=16, ge=1)
    """Held-out prompts used to select the checkpoint by acceptance."""
    ckpt_every: int = Field(default=50, ge=1)
    seed: int = 0
    crash_at_step: int | None = None


# --------------------------------------------------------------------------------------------
# evaluate / serve
# --------------------------------------------------------------------------------------------
class EvalTaskConfig(Strict):
    name: str
    kind: Literal["humaneval", "stdlib_prose", "instructions", "jsonl", "hf"]
    path: str | None = None
    text_field: str = "prompt"
    prompts: int = Field(default=16, ge=1)
    timed_prompts: int | None = Field(default=None, ge=1)
    """How many of the prompts (the first) are timed: the target alone and each engine pair, batch 1, side by side.
    The others count for acceptance only (every draft reads the target's continuations offline); the target writes
    their continuations in one batch, a fraction of the time. Default, or more than `prompts`: all of them."""
    max_new_tokens: int = Field(default=64, ge=1)
    template: str | None = None
    """jsonl/hf: a format string over the record's fields, e.g. "Summarize:\n\n{article}"; default `{<text_field>}`."""
    chat: bool | None = None
    """Render prompts with the target's chat template; default: yes for instructions (and `messages` records), no otherwise."""
    split: str = "test"
    hf_config: str | None = None
    max_prompt_tokens: int = Field(default=512, ge=8)
    """Longer prompt texts are cut to this many tokens (before templating) so articles fit."""


class LookupConfig(Strict):
    """Context lookup beside the draft (`fastdraft.speculative.lookup`; prompt lookup decoding, vLLM's `ngram`): a row
    whose last `max_ngram` .. `min_ngram` tokens occurred earlier in its prompt or output proposes up to `tokens` tokens
    that followed them, in place of the draft's. Copying costs no model step; verification keeps output exact."""

    tokens: int = Field(default=6, ge=1)
    min_ngram: int = Field(default=2, ge=1)
    max_ngram: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _ngram_range(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"lookup.min_ngram ({self.min_ngram}) must be <= lookup.max_ngram ({self.max_ngram})")
        return self

    def engine_args(self) -> dict:
        """`SpeculativeEngine` keyword arguments."""
        return {"lookup_tokens": self.tokens, "lookup_ngram": (self.min_ngram, self.max_ngram)}


class EvaluateConfig(Strict):
    KEYED_WHEN_SET = frozenset({"lookup"})

    tasks: list[EvalTaskConfig] = Field(min_length=1)
    gamma: int = Field(default=3, ge=1)
    gammas: list[int] = Field(default_factory=lambda: [1, 2, 3, 5, 8])
    """Gamma sweep for the acceptance/speedup-vs-gamma plots."""
    temperature: float = Field(default=0.6, ge=0)
    greedy: bool = True
    """Also report greedy decoding (temperature 0)."""
    drafts: list[str] = Field(default_factory=list)
    """Draft directories to compare (e.g. PT, CP, FT); default: the pipeline's drafts."""
    engine_drafts: list[str] | None = None
    """Labels of the drafts (e.g. [FT]) whose pairs the engine also runs and times: wall-clock speedup and the greedy
    identity check. The others are measured offline only (teacher-forced AR, tau and MBSU, the paper's per-stage
    numbers), which costs a fraction of a timed run. Default: every draft."""
    wall_clock: bool = True
    dynamic_gamma: bool = False
    """Also run the engine with dynamic gamma (backs off when acceptance collapses), reported as its own rows
    (method `engine-dynamic`, gamma = mean drafted tokens per pass), timed in the same loop."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the measurements run; `cuda` asks Ray for one GPU per measurement task."""
    cpus_per_task: float = Field(default=1.0, gt=0)
    """CPUs (and torch threads) per measurement task; with `wall_clock` the tasks run one at a time, so this
    can be the whole machine (capped at the cluster's CPUs)."""
    draft_weights: Literal["auto", "float", "int8"] = "auto"
    """How the engine stores the draft's matrices: int8 (per-row scales, a quarter of float32's bytes per draft
    step, as the paper deploys its drafts), float (the draft's own dtype), or auto: int8 where fastdraft's native
    CPU kernel runs the draft (Llama family, float32 on CPU), else float. Lossless either way."""
    seed: int = 0
    lookup: LookupConfig | None = None
    """Also time each engine pair with context lookup beside its draft (`LookupConfig`), reported as method
    `engine+lookup` beside `engine` (the draft alone), in the same loop. Unset: the draft alone."""


class ServeConfig(Strict):
    KEYED_WHEN_SET = frozenset({"lookup"})

    draft: str | None = None
    """Draft directory; default: the pipeline's final draft."""
    model_name: str = "fastdraft"
    gamma: int = Field(default=3, ge=0)
    max_gamma: int = Field(default=8, ge=1)
    speculative: bool = True
    max_tokens_cap: int = Field(default=512, ge=1)
    max_n: int = Field(default=4, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    num_replicas: int | Literal["auto"] = 1
    api_key_env: str | None = None
    """Name of an environment variable holding a bearer token; unset: no auth (logged at start)."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_replicas: int = Field(default=2, ge=1)
    """Upper bound of the model deployment's replicas when `num_replicas` is 'auto' (autoscaling)."""
    cpus_per_replica: float = Field(default=1.0, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    """How long a replica waits to fill a batch of up to `max_batch_size` requests."""
    prefill_chunk: int = Field(default=128, ge=0)
    """Prompt tokens a replica's engine feeds per speculative round while other requests are generating (chunked
    prefill, `speculative.engine.Run`; the default is the engine's `PREFILL_CHUNK`): smaller keeps the running requests
    emitting steadily while a long prompt is admitted, larger admits it in fewer rounds. 0: every prompt whole,
    stalling the running requests for its prefill. Output does not depend on it."""
    dynamic_gamma: bool = False
    request_timeout_s: float = Field(default=600.0, gt=0)
    """The longest a request may take (a request's own `timeout` may only shorten it); past it the request alone
    ends with a 504, and its rows leave the engine's batch within one speculative round."""
    stall_timeout_s: float = Field(default=60.0, gt=0)
    """A model replica whose engine thread has work but commits no token for this long fails its health check."""
    draft_weights: Literal["auto", "float", "int8"] = "auto"
    """How the engine stores the draft's matrices: int8 (per-row scales, a quarter of float32's bytes per draft
    step, as the paper deploys its drafts), float (the draft's own dtype), or auto: int8 where fastdraft's native
    CPU kernel runs the draft (Llama family, float32 on CPU), else float. Lossless either way."""
    lookup: LookupConfig | None = None
    """Context lookup beside the draft (`LookupConfig`): repeated text (code, quoted prompts) is proposed by copying.
    Unset: the draft alone."""


class ClusterConfig(Strict):
    """The hardware a recipe is declared for: `fastdraft plan` (and every stage, when it starts) checks each
    worker's estimated peak memory against it. Unset values come from the connected Ray cluster, else this
    machine (CPU stages)."""

    accelerator: str | None = None
    """GPU or Gaudi model of the workers, e.g. A10G (24 GB), A100-80G, H100, Gaudi2: see fastdraft.plan.DEVICE_MEMORY_GB."""
    device_memory_gb: float | None = Field(default=None, gt=0)
    """Memory per accelerator, when the model is not in that table (overrides `accelerator`)."""
    node_memory_gb: float | None = Field(default=None, gt=0)
    """Host memory of the nodes CPU stages run on."""
    driver_memory_gb: float | None = Field(default=None, gt=0)
    """Memory of the process that runs the pipeline's driver (the head pod on KubeRay)."""

    @model_validator(mode="after")
    def _known_accelerator(self):
        from fastdraft.plan import DEVICE_MEMORY_GB

        if self.accelerator is not None and self.device_memory_gb is None and self.accelerator not in DEVICE_MEMORY_GB:
            raise ValueError(f"cluster.accelerator '{self.accelerator}' is not one of {', '.join(DEVICE_MEMORY_GB)}; "
                             f"set cluster.device_memory_gb for it")
        return self


class Recipe(Strict):
    name: str
    workdir: str = "runs/${name}"
    """Where every artifact of this recipe goes; `${name}` expands to the recipe name. A relative path is made
    absolute when the recipe loads (see `fastdraft.layout.resolve_workdir`: `$FASTDRAFT_OUTPUT_DIR`, else the
    current directory; refused inside Ray's temporary copy of a `ray job submit --working-dir` upload)."""
    target: TargetConfig = TargetConfig()
    draft: DraftConfig = DraftConfig()
    prepare: PrepareConfig | None = None
    pretrain: PretrainConfig | None = None
    generate: GenerateConfig | None = None
    distill: DistillConfig | None = None
    evaluate: EvaluateConfig | None = None
    serve: ServeConfig | None = None
    cluster: ClusterConfig | None = None

    @model_validator(mode="after")
    def _absolute_workdir(self):
        # Resolved here, on the driver, once: Ray Train V2 changes its workers' working directory, so a
        # relative path handed to a worker would name another directory (or none).
        from fastdraft.layout import resolve_workdir

        object.__setattr__(self, "workdir", str(resolve_workdir(self.workdir.replace("${name}", self.name))))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir)

    def section(self, stage: str):
        """The config of one stage, or a RecipeError naming the missing section."""
        value = getattr(self, stage)
        if value is None:
            raise RecipeError(f"recipe '{self.name}' has no '{stage}' section")
        return value

    def section_hash(self, *stages: str) -> str:
        """Stable hash of some sections (plus the target), used to tell whether outputs are stale."""
        payload = {s: _dump(getattr(self, s)) for s in ("target", *stages)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _dump(value: Any) -> Any:
    if isinstance(value, Strict):
        return value.identity()
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{source}: override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)]
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, (dict, list)):
                raise RecipeError(f"{source}: cannot set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        value = yaml.safe_load(raw) if raw.strip() else None
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return data


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    """Validate a recipe dict; errors name the key path and the source file."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top level>"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key (not part of this section's config)"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise RecipeError(f"{source}: {loc}: {msg}{more}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe, apply `--set` overrides, validate.

    Args:
        path: the recipe file.
        overrides: `key.sub=value` strings applied after loading.
    Raises:
        RecipeError: missing file, malformed YAML, unknown key or wrong type (naming key and file).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return recipe_from_dict(apply_overrides(data, overrides or [], f"{path} --set"), str(path))


def dump_recipe(recipe: Recipe) -> dict:
    """The resolved recipe as plain data, saved next to every artifact."""
    return recipe.model_dump(mode="json")
