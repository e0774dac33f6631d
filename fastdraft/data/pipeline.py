"""Stage prepare: corpora -> target-tokenizer ids -> packed Parquet shards, streamed through Ray Data.

    fastdraft prepare jobs/recipes/demo.yaml
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/prepare.py jobs/recipes/demo.yaml

For each corpus in `prepare.corpora`:
  1. every source is planned into shards (`sources.plan_shards`: file groups, Parquet row groups,
     dataset shards); this validates it (files exist, the text field is there) before anything is written;
  2. the shards of all sources are interleaved (each source spread over the whole order) and flow through
     `ray.data.from_items(shards).map_batches(ShardTokenizer, compute=ActorPoolStrategy(min, max))`:
     each actor loads the target's tokenizer once, streams the documents of one shard, splits them
     into train/validation by a hash of the document id, tokenizes `docs_per_batch` at a time and
     packs them (EOS after each document, rows of exactly `seq_len`, carried across batches);
     reading and tokenizing sit in one actor so that a shard packs deterministically and can be
     recorded as done (resume granularity = one shard);
  3. the actor writes the shard's rows to its own Parquet files as they fill, taking each batch of rows
     from a `BudgetBoard` actor that grants rows up to each source's token budget (validation gets its
     fraction of it in whole rows) and tells the readers when to stop reading;
  4. the driver receives one small record per finished shard (counts, files) and writes the manifest: no
     token passes through it, so its memory does not grow with the corpus.

Remainder handling: the last < seq_len tokens of each shard and split are dropped (counted as
`dropped_tail_tokens` per source); budgets are met to within one row, never exceeded. (An actor that dies
mid-shard keeps the rows it was granted counted: the rerun of that shard can leave the source short of its
budget by up to that shard's rows, never over it.)
"""

from __future__ import annotations

import hashlib
import json
import resource
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from fastdraft.config import CorpusConfig, PrepareConfig, Recipe, SourceConfig
from fastdraft.data.packing import Packer
from fastdraft.data.sources import Doc, plan_shards, read_shard
from fastdraft.data.writer import SPLITS, CorpusWriter, ShardOutput, existing_state, rows_to_arrow
from fastdraft.errors import FastdraftError, RecipeError
from fastdraft.layout import RunLayout
from fastdraft.progress import Progress

MAX_BATCH_CHARS = 8 << 20
"""A tokenize batch also ends at this many characters (bounds an actor's memory on very long documents)."""
STREAM_SCHEMA = pa.schema([("shard", pa.string()), ("split", pa.string()), ("input_ids", pa.list_(pa.int32())), ("stats", pa.string())])


# --------------------------------------------------------------------------------------------
# Plan: budgets, mixing, split
# --------------------------------------------------------------------------------------------
def source_budgets(name: str, corpus: CorpusConfig) -> dict[str, int | None]:
    """Token budget per source: its own `tokens`, else its `weight` share of the corpus `tokens` (None: read it all)."""
    names = [s.name for s in corpus.sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"prepare.corpora.{name}.sources: source names must be unique, got {names}")
    if corpus.tokens is None:
        weighted = [s.name for s in corpus.sources if s.weight is not None]
        if weighted:
            raise RecipeError(f"prepare.corpora.{name}: sources {weighted} have a 'weight' but the corpus has no 'tokens' "
                              f"total to share out; set prepare.corpora.{name}.tokens or give each source 'tokens'")
        return {s.name: s.tokens for s in corpus.sources}
    fixed = {s.name: s.tokens for s in corpus.sources if s.tokens is not None}
    rest = corpus.tokens - sum(fixed.values())
    shared = [s for s in corpus.sources if s.tokens is None]
    if shared and rest <= 0:
        raise RecipeError(f"prepare.corpora.{name}: the sources' own budgets ({sum(fixed.values()):,}) leave nothing "
                          f"of the corpus total ({corpus.tokens:,}) for {[s.name for s in shared]}")
    total_weight = sum(s.weight or 1.0 for s in shared)
    return {**fixed, **{s.name: int(rest * (s.weight or 1.0) / total_weight) for s in shared}}


def interleave(plans: dict[str, list[dict]]) -> list[dict]:
    """All shards, each source's spread evenly over the order, so that sources are read side by side."""
    keyed = [((k + 0.5) / len(shards), i, shard) for i, shards in enumerate(plans.values()) for k, shard in enumerate(shards)]
    return [shard for *_, shard in sorted(keyed, key=lambda t: t[:2])]


def in_validation(doc_id: str, fraction: float) -> bool:
    """Deterministic split by document: the same id always lands on the same side."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def corpus_section_hash(recipe: Recipe, name: str) -> str:
    """What decides a corpus's content: target, seq_len, validation share and its sources (not actor counts)."""
    cfg = recipe.prepare
    payload = {"target": recipe.target.model, "seq_len": cfg.seq_len, "validation_fraction": cfg.validation_fraction,
               "corpus": cfg.corpora[name].model_dump(mode="json")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Ray side: the budget board and the tokenizing actor
# --------------------------------------------------------------------------------------------
def split_caps(budget: int | None, fraction: float, seq_len: int) -> dict[str, int | None]:
    """A source's budget shared by the splits: validation gets its fraction in whole rows, train the rest.

    Capping each split on its own keeps the validation split from being starved when train rows
    happen to arrive first (the order across actors is not deterministic).
    """
    if budget is None:
        return {s: None for s in SPLITS}
    validation = round(budget * fraction / seq_len) * seq_len
    return {"train": budget - validation, "validation": validation}


class Budgets:
    """Tokens per source and split against their caps: rows that would pass a cap are not taken."""

    def __init__(self, caps: dict[str, dict[str, int | None]], seq_len: int, counts: dict[str, dict[str, int]]):
        self.caps, self.seq_len = caps, seq_len
        self.counts = {src: dict(counts[src]) for src in caps}

    def room(self, source: str, split: str) -> int | None:
        """Rows that still fit (None: no cap)."""
        cap = self.caps[source][split]
        return None if cap is None else max(0, (cap - self.counts[source][split]) // self.seq_len)

    def take(self, source: str, split: str, rows: int) -> int:
        room = self.room(source, split)
        taken = rows if room is None else min(rows, room)
        self.counts[source][split] += taken * self.seq_len
        return taken

    def full(self, source: str) -> bool:
        return all(self.room(source, split) == 0 for split in SPLITS)


class BudgetBoard(Budgets):
    """Ray actor: the rows written per source and split, summed over all the actors that write them.

    An actor asks for its rows before writing them (`take`: granted up to the caps, so the total is exact
    whatever the order the actors finish in) and asks before reading each batch whether its source still
    needs rows (`full`), so every actor stops within one batch of the budget.
    """


def stream_table(shard: str, split: str, ids: pa.Array, stats: str = "") -> pa.Table:
    n = len(ids)
    return pa.table({"shard": [shard] * n, "split": [split] * n, "input_ids": ids, "stats": [stats] * n}, schema=STREAM_SCHEMA)


def batches_of(docs: Iterator[Doc], size: int) -> Iterator[list[Doc]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text or "")
        if len(batch) >= size or chars >= MAX_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class ShardTokenizer:
    """Ray Data actor: reads whole shards, tokenizes with the target's tokenizer, packs per split, writes.

    `process` yields a shard's packed rows as tables as they fill, then one `split == "done"` row whose
    `stats` hold its counts (documents, skipped by reason, tokens read, tail dropped). As a Ray Data UDF the
    actor writes those rows under `root` itself (`write_shard`) and passes on only the done row, with the
    sequences and files it wrote.
    """

    def __init__(self, tokenizer_json: str, eos: int, cfg: dict, sources: dict[str, dict], board=None,
                 root: str | None = None):
        from tokenizers import Tokenizer

        # The driver's own fast tokenizer travels with the actor (no per-node copy that could differ), and
        # plain `tokenizers` starts in well under a second where importing transformers takes several.
        self.encoder, self.eos = Tokenizer.from_str(tokenizer_json), eos
        self.cfg = PrepareConfig.model_validate(cfg)
        self.sources = {k: SourceConfig.model_validate(v) for k, v in sources.items()}
        self.board, self.root = board, Path(root) if root else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.encoder.encode_batch_fast(texts, add_special_tokens=False)]

    def _wanted(self, source: str) -> bool:
        import ray

        return self.board is None or not ray.get(self.board.full.remote(source))

    def _granted(self, source: str, split: str, rows: int) -> int:
        import ray

        return rows if self.board is None else ray.get(self.board.take.remote(source, split, rows))

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for text in batch.column("shard").to_pylist():
            yield self.write_shard(json.loads(text))

    def write_shard(self, shard: dict) -> pa.Table:
        """Tokenize, pack and write one shard here, in the actor; returns its done row for the manifest."""
        out = ShardOutput(self.root, shard["id"])
        for table in self.process(shard):
            split = table.column("split")[0].as_py()
            if split == "done":
                stats = json.loads(table.column("stats")[0].as_py())
                continue
            n = self._granted(shard["source"], split, len(table))
            out.write(split, table.column("input_ids").slice(0, n).combine_chunks())
        record = {**stats, "sequences": out.publish(), "files": {s: len(out.files[s]) for s in SPLITS}}
        return stream_table(shard["id"], "done", pa.array([[]], type=pa.list_(pa.int32())), json.dumps(record))

    def process(self, shard: dict) -> Iterator[pa.Table]:
        packers = {s: Packer(self.eos, self.cfg.seq_len) for s in SPLITS}
        stats = {"source": shard["source"], "documents": 0, "tokens_read": 0, "skipped": Counter(), "stopped_early": False}
        for docs in batches_of(read_shard(shard, self.sources[shard["source"]]), self.cfg.docs_per_batch):
            if not self._wanted(shard["source"]):
                stats["stopped_early"] = True
                break
            by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
            for doc in docs:
                if doc.skip:
                    stats["skipped"][doc.skip] += 1
                else:
                    by_split["validation" if in_validation(doc.id, self.cfg.validation_fraction) else "train"].append(doc.text)
            for split, texts in by_split.items():
                ids = self.encode(texts) if texts else []
                stats["documents"] += len(ids)
                stats["tokens_read"] += sum(map(len, ids)) + len(ids)  # + one EOS each
                rows = packers[split].add(ids)
                if len(rows):
                    yield stream_table(shard["id"], split, rows_to_arrow(rows))
        stats["dropped_tail_tokens"] = sum(p.tail for p in packers.values())
        stats["actor_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # flat if streaming
        stats["skipped"] = dict(stats["skipped"])
        yield stream_table(shard["id"], "done", pa.array([[]], type=pa.list_(pa.int32())), json.dumps(stats))


def token_stream(shards: list[dict], cfg: PrepareConfig, sources: list[SourceConfig], tokenizer, board, root: Path):
    """The Ray Dataset of per-shard 'done' records for these shards, whose rows the actors write under `root`."""
    import ray.data

    items = [{"shard": json.dumps(s)} for s in shards]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardTokenizer,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=min(cfg.min_actors, cfg.max_actors), max_size=cfg.max_actors),
        num_cpus=cfg.cpus_per_actor,
        udf_modifying_row_count=True,
        fn_constructor_kwargs=dict(
            tokenizer_json=tokenizer.backend_tokenizer.to_str(), eos=tokenizer.eos_token_id, cfg=cfg.model_dump(mode="json"),
            sources={s.name: s.model_dump(mode="json") for s in sources}, board=board, root=str(root),
        ),
    )


def user_error(exc: BaseException) -> FastdraftError | None:
    """The FastdraftError an actor raised, out of Ray's wrappers (RayTaskError, UserCodeException), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # a RayTaskError also subclasses the cause's class: unwrap it first
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if isinstance(exc, FastdraftError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# --------------------------------------------------------------------------------------------
# Driver: record the shards the actors finish, summarize
# --------------------------------------------------------------------------------------------
def consume(stream, writer: CorpusWriter, seq_len: int, shard_source: dict[str, str], progress: Progress) -> None:
    """Record each shard as its actor finishes it (the stream carries one small record per shard)."""
    for table in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard, stats in zip(table.column("shard").to_pylist(), table.column("stats").to_pylist()):
            record = writer.record_shard(shard, json.loads(stats))
            tokens = sum(record["sequences"].values()) * seq_len
            progress.update(tokens, docs=record["documents"], **{shard_source[shard]: tokens})


def summarize(done: dict[str, dict], sources: list[SourceConfig], budgets: dict, seq_len: int) -> dict:
    splits = {s: {"sequences": 0, "tokens": 0, "files": 0} for s in SPLITS}
    per_source = {s.name: {"kind": s.kind, "budget": budgets[s.name], "shards": 0, "documents": 0, "tokens": 0,
                           "tokens_read": 0, "dropped_tail_tokens": 0, "skipped": Counter()} for s in sources}
    for record in done.values():
        src = per_source[record["source"]]
        src["shards"] += 1
        for key in ("documents", "tokens_read", "dropped_tail_tokens"):
            src[key] += record[key]
        src["skipped"].update(record["skipped"])
        for split in SPLITS:
            n = record["sequences"][split]
            splits[split]["sequences"] += n
            splits[split]["tokens"] += n * seq_len
            splits[split]["files"] += record["files"][split]
            src["tokens"] += n * seq_len
    for src in per_source.values():
        src["skipped"] = dict(src["skipped"])
    peak = max((r.get("actor_peak_rss_mb", 0) for r in done.values()), default=0)
    return {"splits": splits, "sources": per_source, "actor_peak_rss_mb": peak}


@dataclass
class CorpusPlan:
    """One corpus, checked: its sources' shards, budgets and what its output directory already holds."""

    name: str
    root: Path
    budgets: dict[str, int | None]
    section_hash: str
    shards: dict[str, list[dict]]
    state: str  # fresh | resume | done


def plan_corpus(recipe: Recipe, name: str, fingerprint: str) -> CorpusPlan:
    """Validate one corpus (recipe, sources, existing output) without writing anything."""
    corpus = recipe.prepare.corpora[name]
    root = RunLayout(recipe.run_dir).corpus(name)
    section_hash = corpus_section_hash(recipe, name)
    budgets = source_budgets(name, corpus)
    shards = {s.name: plan_shards(s) for s in corpus.sources}
    return CorpusPlan(name, root, budgets, section_hash, shards, existing_state(root, fingerprint, section_hash))


def prepare_corpus(recipe: Recipe, plan: CorpusPlan, tokenizer, fingerprint: str) -> dict:
    """Prepare one planned corpus into `<run_dir>/data/<name>` (skip if finished, resume if partial)."""
    import ray

    cfg, name, root = recipe.prepare, plan.name, plan.root
    if plan.state == "done":
        print(f"[prepare {name}] {root} is already complete (section_hash {plan.section_hash}); skipping", flush=True)
        return {"corpus": name, "path": str(root), "skipped": True}
    header = {"tokenizer_fingerprint": fingerprint, "seq_len": cfg.seq_len, "target": recipe.target.model, "corpus": name,
              "recipe": cfg.model_dump(mode="json"), "section_hash": plan.section_hash, "budgets": plan.budgets}
    writer = CorpusWriter(root, header, resume=plan.state == "resume")
    done = writer.done_shards
    if done:
        print(f"[prepare {name}] resuming {root}: {len(done)} shards already written", flush=True)
    written = {src: {sp: sum(r["sequences"][sp] for r in done.values() if r["source"] == src) * cfg.seq_len for sp in SPLITS}
               for src in plan.budgets}
    caps = {src: split_caps(b, cfg.validation_fraction, cfg.seq_len) for src, b in plan.budgets.items()}
    budgets = Budgets(caps, cfg.seq_len, written)
    todo = [s for s in interleave(plan.shards) if s["id"] not in done and not budgets.full(s["source"])]
    totals = list(plan.budgets.values())
    already = sum(sum(w.values()) for w in written.values())
    progress = Progress(f"prepare {name}", total=sum(totals) - already if None not in totals else None)
    if todo:
        board = ray.remote(num_cpus=0)(BudgetBoard).remote(caps, cfg.seq_len, written)
        stream = token_stream(todo, cfg, cfg.corpora[name].sources, tokenizer, board, root)
        try:
            consume(stream, writer, cfg.seq_len, {s["id"]: s["source"] for s in todo}, progress)
        except Exception as exc:
            raise (user_error(exc) or exc) from None
    progress.done()
    manifest = writer.complete(summarize(done, cfg.corpora[name].sources, plan.budgets, cfg.seq_len))
    return {"corpus": name, "path": str(root), "skipped": False, **{f"{s}_sequences": v["sequences"] for s, v in manifest["splits"].items()},
            "tokens": {k: v["tokens"] for k, v in manifest["sources"].items()}, "seconds": round(progress.elapsed, 1)}


def run_prepare(recipe: Recipe, **_options) -> dict:
    """Prepare every corpus of `recipe.prepare`; returns a summary per corpus."""
    from fastdraft.raycluster import ensure_ray
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    cfg = recipe.section("prepare")
    if not cfg.corpora:
        raise RecipeError(f"recipe '{recipe.name}': prepare.corpora is empty; name at least one corpus with its sources")
    tokenizer = load_tokenizer(recipe.target.model, trust_remote_code=recipe.target.trust_remote_code)
    if not tokenizer.is_fast or tokenizer.eos_token_id is None:
        raise FastdraftError(f"target {recipe.target.model}: prepare needs a fast tokenizer (tokenizer.json) with an EOS "
                             f"token to put between documents (fast: {tokenizer.is_fast}, eos: {tokenizer.eos_token})")
    fingerprint = tokenizer_fingerprint(tokenizer)
    plans = [plan_corpus(recipe, name, fingerprint) for name in cfg.corpora]  # every refusal before any write
    ensure_ray()
    return {plan.name: prepare_corpus(recipe, plan, tokenizer, fingerprint) for plan in plans}
