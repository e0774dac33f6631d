"""fastdraft's speculative decoding engine: a draft proposes, the target verifies, output is lossless.

Each round, the draft proposes gamma tokens autoregressively (its own KV cache), the target scores
the last committed token plus all gamma proposals in ONE forward pass (its own KV cache), and the
proposals are accepted greedily (argmax match) or by exact rejection sampling (`sampling.py`). Both
caches are rolled back by length only, never recomputed. gamma = 0, or no draft, is the target alone
through the very same loop, so "speedup" compares like with like.

Penalties (presence, frequency, repetition), `logit_bias`, `allowed_token_ids` and `min_new_tokens` are applied to
the target's and the draft's logits alike before acceptance (`sampling.process_logits`), each verified position
seeing the tokens before it (the draft's proposals included) as history: the output is exactly the processed target's,
greedy or sampled. Every row of a batch has its own settings (`Run.add(params=...)`), greedy and sampled rows alike,
and its own seeded generator. Log-probabilities (`SamplingParams.logprobs`) come from the same verification pass: the
target's processed distribution at each emitted token, drafted and accepted or not. `should_stop` ends one row within a round
(cancellation, deadlines) while the rest of the batch goes on.

    from fastdraft.speculative.engine import SpeculativeEngine
    from fastdraft.speculative.types import SamplingParams
    engine = SpeculativeEngine.from_dirs("embedded:smollm2-135m-instruct", "runs/demo/drafts/FT", gamma=3)
    [result] = engine.generate([prompt_ids], SamplingParams(temperature=0.6, max_new_tokens=128, seed=0))
    result.token_ids, result.stats.acceptance_rate, result.stats.tau

Counters follow the definitions in `fastdraft.evaluation.metrics` exactly: per request and aggregated (`engine.last_stats`), drafted D,
accepted A, target passes F, emitted N, per-position acceptance, and seconds split into prefill,
draft, verify and overhead. Invariant: emitted + truncated == accepted + looked_up_accepted + target_passes, where
`truncated` counts verified tokens dropped after a stop token or max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel

from fastdraft.errors import FastdraftError, PrefillError
from fastdraft.quantize import round_model_to_int8_
from fastdraft.speculative.decoders import Decoder, make_decoder, resolve_weights, right_pad
from fastdraft.speculative.gamma import GammaController
from fastdraft.speculative.lookup import NgramLookup
from fastdraft.speculative.sampling import (Settings, greedy_accept, history, process_logits, rejection_accept, sample,
                                            warp_probs)
from fastdraft.speculative.types import GenerationResult, SamplingParams, SpecStats

PREFILL_CHUNK = 128
"""Default prompt tokens per step of chunked prefill (`Run`). A chunk bounds what a joining prompt adds to each round of
the running rows (on 2 cores an ~85M target takes ~0.15 s for 64 prompt tokens, ~0.35 s for 200: `decoders.
NATIVE_PASS_ROWS`); past ~64 tokens a pass costs about the same per token, so 128 loses little prefill efficiency and
admits bench_serve's prompts (169 tokens on average, 288 at most) in one or two rounds. The shared machine's timings
were too noisy to rank 64 against 128 end to end."""

OnTokens = Callable[..., None]
"""on_tokens(i, new_ids), or on_tokens(i, new_ids, logprobs) with `SamplingParams.logprobs` set, where logprobs holds
one (log-probability, [(token id, log-probability), ...top k]) per new id."""
ShouldStop = Callable[[int], "str | None"]
"""should_stop(i) -> None to go on, or a finish reason (e.g. "abort", "timeout") that ends prompt i's generation now."""


class _Timer:
    """Wall-clock phases; synchronizes CUDA so that asynchronous kernels land in the right phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last = self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed


class _Batch:
    """The live rows of one batched generation: tokens so far, settings, random streams, results, and where each
    cache ends.

    Sequences are numbered in the order they joined (`add`); `rows[r]` is the sequence in row r of the caches.
    Each sequence has its own `SamplingParams` (temperature, top-p/k, penalties, seed, max_new_tokens, stops, ...)
    and its own generator, seeded from its seed: what it samples does not depend on the settings or seeds of the
    rows beside it, only on how many tokens each round drafts (gamma, and fewer near the longest row's end)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tokens: list[list[int]] = []
        self.prompt_len: list[int] = []
        self.output_start: list[int] = []   # output tokens begin here (a continuation's prior output included)
        self.params: list[SamplingParams] = []
        self.generators: list[torch.Generator] = []
        self.results: list[GenerationResult] = []
        self.rows: list[int] = []            # row r of the caches holds sequence rows[r]
        self.draft_len: list[int] = []       # valid draft-cache tokens, per row
        self.lookups: list[NgramLookup] = []  # context lookup index, per sequence (`SpeculativeEngine(lookup_tokens=)`)

    def add(self, prompts: list[list[int]], prior_output: list[int], params: list[SamplingParams],
            lookup_ngram: tuple[int, int] = (2, 3)) -> list[int]:
        """Number new sequences (not live yet: `join` makes them rows once their prompts are in the caches)."""
        first = len(self.tokens)
        for p, k, sp in zip(prompts, prior_output, params):
            self.lookups.append(NgramLookup(*lookup_ngram))
            self.tokens.append(list(p))
            self.prompt_len.append(len(p))
            self.output_start.append(len(p) - k)
            self.params.append(sp)
            generator = torch.Generator(device=self.device)
            if sp.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sp.seed)
            self.generators.append(generator)
            result = GenerationResult([], "length", SpecStats())
            if sp.logprobs is not None:
                result.logprobs, result.top_logprobs = [], []
            self.results.append(result)
        return list(range(first, len(self.tokens)))

    def join(self, seqs: list[int]) -> None:
        """Make `seqs` live rows, after the running ones: their caches hold every prompt token but the last."""
        for s in seqs:
            self.rows.append(s)
            self.draft_len.append(self.prompt_len[s] - 1)

    def live_params(self) -> list[SamplingParams]:
        """The settings of the live rows, row by row (`sampling.Settings`)."""
        return [self.params[s] for s in self.rows]

    def live_generators(self) -> list[torch.Generator]:
        return [self.generators[s] for s in self.rows]

    def committed(self) -> list[int]:
        return [len(self.tokens[s]) for s in self.rows]

    def produced(self) -> list[int]:
        """Output tokens so far, per live row (a continuation's prior output included)."""
        return [len(self.tokens[s]) - self.output_start[s] for s in self.rows]

    def history(self, vocab: int, device) -> tuple:
        """(output counts, seen) of the live rows, for the penalties (`sampling.history`)."""
        return history([self.tokens[s][self.output_start[s]:] for s in self.rows],
                       [self.tokens[s][:self.output_start[s]] for s in self.rows], self.live_params(), vocab, device)

    def remaining(self, row: int) -> int:
        s = self.rows[row]
        return self.params[s].max_new_tokens - (len(self.tokens[s]) - self.prompt_len[s])


def seeded_rows(params: SamplingParams, n: int, first: int = 0) -> list[SamplingParams]:
    """n rows of one setting, row i seeded seed + first + i (as the server seeds choice i of a request), so that the
    rows do not all draw the same tokens and row 0 of a call samples as a lone request with that seed would."""
    return [dataclasses.replace(params, seed=None if params.seed is None else (params.seed + first + i) % (1 << 63))
            for i in range(n)]


@dataclasses.dataclass
class _Prefill:
    """The rows of one `Run.add` call while their prompts go into caches of their own, a chunk per step.

    The rows advance in lockstep (`fed` tokens each; a shorter prompt's finished row is fed padding past its length,
    never attended, as a right-padded prefill would be), so chunk i's logits are positions fed_i.. of every row: the
    chunks concatenated are the logits of one whole prefill. They join the batch together once all are in."""

    seqs: list[int]
    prefixes: list[list[int]]
    """Every prompt token but the last: the first round's verification pass feeds that one."""
    target_cache: object
    draft_cache: object | None
    scored: bool
    """Some row asked for prompt logprobs: the target's logits of every prompt position are kept."""
    deadline: int = 0
    """The step by which these rows would finish on their own: their `add` step, plus their prompt's chunks, plus
    their max new tokens (one token a round). Queued prompts are fed earliest deadline first (`Run._prefill`)."""
    fed: int = 0
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def left(self) -> int:
        """Prompt tokens the longest row still has to feed."""
        return max(len(p) for p in self.prefixes) - self.fed


class Run:
    """One batched generation, a speculative round at a time (`step`): rows join between rounds (`add`) and
    leave the batch as soon as they finish. `SpeculativeEngine.generate` is `start`, then `step` until `done`;
    a server runs several at once and adds requests to a running one (iteration-level, "continuous" batching).

    Every row has its own settings (`add(params=...)`): greedy and sampled rows, any temperature, top-p/k, min-p,
    penalties, logit bias, seed, max tokens and stops share one batch, each row exactly its own target distribution.
    Only gamma (drafted tokens per round) is the run's: a round drafts and verifies one block width for all rows.

    Chunked prefill: `add` only queues prompts; each `step` first feeds the queued prompts at most `prefill_chunk`
    tokens (rows x width of one pass, at least one token per step), into both caches, then runs the round of the live
    rows. A long prompt thus costs the running rows a chunk per round instead of a stall of its whole prefill. A row
    joins once its prompt is in both caches, and drafts in that same step's round. With no live row nothing waits,
    and the first queued prompts are prefilled whole. Queued prompts go earliest deadline first (`_Prefill.deadline`:
    the step by which they would finish alone), so a request for 4 tokens does not queue behind prompts that will
    generate 64, while a long request's fixed deadline still comes up in its turn (no starvation). Separate passes: a chunk and the round's
    verification are two forwards (one combined forward would save a weight read per step, not prompt compute).

    Callbacks get the sequence number `add` returned: on_tokens(s, new_ids[, logprobs]), should_stop(s),
    on_prompt_logprobs(s, entries) (when the row's prompt is fully in, before its first tokens).
    """

    def __init__(self, engine: "SpeculativeEngine", params: SamplingParams, gamma: int, on_tokens: OnTokens | None = None,
                 should_stop: ShouldStop | None = None, on_prompt_logprobs: Callable | None = None,
                 prefill_chunk: int | None = None):
        self.engine = engine
        self.params = params
        """The settings of rows added without their own."""
        self.gamma = 0 if engine.draft is None else gamma
        self.prefill_chunk = engine.prefill_chunk if prefill_chunk is None else prefill_chunk
        """Prompt tokens fed per step while rows are live (0: every prompt whole, in the step after its `add`)."""
        if self.prefill_chunk < 0:
            raise FastdraftError(f"prefill_chunk must be >= 0 (0: whole prompts), got {self.prefill_chunk}")
        self.on_tokens, self.should_stop, self.on_prompt = on_tokens, should_stop, on_prompt_logprobs
        self.batch = _Batch(engine.device)
        self.pending: list[_Prefill] = []
        self.steps = 0
        """Steps taken: the clock of the queued prompts' deadlines."""
        self.ragged = engine.target.ragged and (engine.draft is None or engine.draft.ragged)
        self.target_cache = self.draft_cache = None
        self.control = (GammaController(self.gamma, engine.max_gamma)
                        if engine.dynamic_gamma and engine.draft is not None and self.gamma > 0 else None)

    @property
    def done(self) -> bool:
        return not self.batch.rows and not self.pending

    @property
    def sequences(self) -> list[int]:
        """Every unfinished sequence: the live rows, then those whose prompts are still being prefilled."""
        return self.batch.rows + [s for group in self.pending for s in group.seqs]

    @property
    def size(self) -> int:
        """Rows the run holds or will hold once their prefill is done (what a batch-size limit counts)."""
        return len(self.batch.rows) + sum(len(group.seqs) for group in self.pending)

    @property
    def results(self) -> list[GenerationResult]:
        return self.batch.results

    def add(self, prompts: list[list[int]], prior_output: list[int] | None = None, max_new_tokens: list[int] | None = None,
            stop_token_ids: list[tuple[int, ...]] | None = None, params: Sequence[SamplingParams] | None = None) -> list[int]:
        """Queue `prompts` for the batch; returns their sequence numbers. Their prefill runs in the coming steps.

        Each has its own settings: `params[i]` (default: the run's, seeded by sequence number), with
        `max_new_tokens[i]` and `stop_token_ids[i]`, when given, in place of its max_new_tokens and stop tokens."""
        engine, n = self.engine, len(prompts)
        prior_output = list(prior_output) if prior_output is not None else [0] * n
        if any(v is not None and len(v) != n for v in (params, max_new_tokens, stop_token_ids)):
            raise FastdraftError(f"params, max_new_tokens and stop_token_ids must give one entry per prompt ({n})")
        # Rows without settings of their own take the run's, seeded as prompts of one `generate` call, by sequence
        # number, so that they do not all draw the same tokens.
        rows = list(params) if params is not None else seeded_rows(self.params, n, first=len(self.batch.tokens))
        if max_new_tokens is not None:
            rows = [dataclasses.replace(p, max_new_tokens=m) for p, m in zip(rows, max_new_tokens)]
        if stop_token_ids is not None:
            rows = [dataclasses.replace(p, stop_token_ids=tuple(st)) for p, st in zip(rows, stop_token_ids)]
        engine._validate_prompts(prompts)
        for p in set(rows):  # each row's own settings
            engine._validate([], p, self.gamma)
        if len(prior_output) != n or any(not 0 <= k < len(p) for k, p in zip(prior_output, prompts)):
            raise FastdraftError("prior_output must give, per prompt, a count below the prompt's length")
        if not self.ragged and self.size + n > 1:
            raise FastdraftError("this decoder runs one sequence at a time (not ragged): start one run per prompt")
        if not prompts:
            return []
        capacity = max(len(p) + r.max_new_tokens for p, r in zip(prompts, rows)) + engine.max_gamma + 2
        target_cache = engine.target.new_cache(n, capacity)
        draft_cache = engine.draft.new_cache(n, capacity) if engine.draft is not None and self.gamma > 0 else None
        seqs = self.batch.add(prompts, prior_output, rows, engine.lookup_ngram)
        scored = any(r.prompt_logprobs is not None for r in rows)
        prefixes = [p[:-1] for p in prompts]
        chunks = -(-max(len(p) for p in prefixes) // self.prefill_chunk) if self.prefill_chunk else 0
        deadline = self.steps + chunks + max(r.max_new_tokens for r in rows)
        self.pending.append(_Prefill(seqs, prefixes, target_cache, draft_cache, scored, deadline))
        return seqs

    def _prefill(self) -> None:
        """Feed the queued prompts their next chunk, earliest deadline first (ties: oldest first), within
        `prefill_chunk` tokens (rows x width) in all; groups whose prompts are then fully in both caches join the batch."""
        idle = not self.batch.rows
        budget = self.prefill_chunk
        for i, group in enumerate(sorted(self.pending, key=lambda g: g.deadline)):
            if group.left > 0:
                if self.prefill_chunk == 0 or (idle and i == 0):
                    width = group.left  # no chunking asked, or nobody waits: the whole prompt in one pass
                else:
                    width = min(group.left, budget // len(group.seqs))
                    if width <= 0 and i > 0:
                        break  # the budget is spent: the later groups wait for the next step
                    width = max(width, 1)  # the oldest group always advances, however many rows it has
                self._feed(group, width)
                budget -= width * len(group.seqs)
            if group.left <= 0:
                self._join(group)

    def _feed(self, group: _Prefill, width: int) -> None:
        """One pass of `width` prompt tokens of every row of `group`, into its target and draft caches."""
        engine = self.engine
        timer = _Timer(engine.device)
        ids = right_pad([p[group.fed:group.fed + width] for p in group.prefixes], engine.device)
        offsets = [group.fed] * len(group.seqs)  # aligned rows: one slice write per layer, no ragged mask
        try:
            with torch.inference_mode():
                logits = engine.target.forward(group.target_cache, ids, offsets, "all" if group.scored else None)
                if group.draft_cache is not None:
                    engine.draft.forward(group.draft_cache, ids, offsets, None)
        except Exception as exc:
            self.pending.remove(group)
            raise PrefillError(group.seqs, exc) from exc
        if group.scored:
            group.logits.append(logits)
        group.fed += width
        group.seconds += timer.lap()

    def _join(self, group: _Prefill) -> None:
        """`group`'s rows become live, after the running ones in both caches; their prompt logprobs are posted."""
        self.pending.remove(group)
        self.batch.join(group.seqs)
        if group.scored:
            logits = torch.cat(group.logits, dim=1) if group.logits else None
            prompts = [self.batch.tokens[s][:self.batch.prompt_len[s]] for s in group.seqs]
            self.engine._score_prompts(self.batch, group.seqs, prompts, logits, self.on_prompt)
        if self.target_cache is None:
            self.target_cache, self.draft_cache = group.target_cache, group.draft_cache
        else:  # the new rows go after the running ones, in both caches
            self.target_cache.append(group.target_cache)
            if group.draft_cache is not None:
                self.draft_cache.append(group.draft_cache)
        for s in group.seqs:
            self.batch.results[s].stats.prefill_s = group.seconds / len(group.seqs)

    def step(self) -> list[int]:
        """A prefill chunk for the queued prompts (`_prefill`), then one speculative round for every live row; returns
        the sequences that finished in it (they have left). A failed prefill raises `PrefillError` (its rows are
        dropped, the running rows untouched: `step` again goes on)."""
        engine, batch = self.engine, self.batch
        self.steps += 1
        if self.pending:
            self._prefill()
        if not batch.rows:
            return []
        params, generators = batch.live_params(), batch.live_generators()
        timer = _Timer(engine.device)
        with torch.inference_mode():
            g = self.control.next_gamma() if self.control else self.gamma
            room = max(batch.remaining(r) for r in range(len(batch.rows))) - 1  # never propose past max tokens
            g = min(g, room)
            # Rows whose recent tokens occurred before propose what followed them (`lookup.py`); the others, the draft's.
            # A batch shares `lookup_tokens` between its rows (at least one each, and never fewer than gamma): every
            # row is padded to the widest, and a wide pass of many rows is compute-bound (bench_serve, 4 clients, the
            # demo pair: 0.85x the target alone with 6 copied tokens a row, against 1.42x at 1 client).
            width = max(engine.lookup_tokens // len(batch.rows), min(self.gamma, engine.lookup_tokens), 1)
            looked = [batch.lookups[s].propose(batch.tokens[s], min(width, batch.remaining(r) - 1))
                      for r, s in enumerate(batch.rows)] if engine.lookup_tokens and self.gamma else [[] for _ in batch.rows]
            g = g if not all(looked) else 0  # every row copies: the draft model sits this round out
            catch_up = max(c - d for c, d in zip(batch.committed(), batch.draft_len))
            counts, seen = batch.history(engine.vocab_size, engine.device)
            drafts, q, draft_s = engine._draft(self.draft_cache, batch, g, params, generators, timer, counts, seen)
            if any(looked):
                drafts, q, lengths = _merge_proposals(drafts, q, looked, params, engine.vocab_size, engine.prob_dtype)
            else:
                lengths = None
            committed = batch.committed()
            ids = torch.cat([torch.tensor([[batch.tokens[s][-1]] for s in batch.rows], device=engine.device), drafts], dim=1)
            logits = engine.target.forward(self.target_cache, ids, [c - 1 for c in committed], "all")
            logits = process_logits(logits, params, batch.produced(), counts, seen, drafts)
            verify_s = timer.lap()
            if all(p.greedy for p in params):
                accepted, nxt = greedy_accept(drafts, logits, lengths)
            else:  # a greedy row among sampled ones is one-hot in p and q: rejection sampling accepts it greedily
                accepted, nxt = rejection_accept(drafts, q, warp_probs(logits.to(engine.prob_dtype), params), generators,
                                                 lengths)
            proposed = drafts.tolist() if lengths is None else [d[:n] for d, n in zip(drafts.tolist(), lengths.tolist())]
            finished = engine._commit(batch, proposed, accepted.tolist(), nxt.tolist(), self.on_tokens,
                                      logits if any(p.logprobs is not None for p in params) else None, self.should_stop,
                                      [bool(lk) for lk in looked])
            if self.control and not any(looked):
                self.control.observe(g, accepted.tolist(), draft_s, verify_s, catch_up)
            engine._drop_finished(batch, finished, self.target_cache, self.draft_cache)
            if not batch.rows:  # drained: prompts still being prefilled start the caches afresh when they join
                self.target_cache = self.draft_cache = None
            overhead_s = timer.lap()
        for s in batch.rows + finished:
            st = batch.results[s].stats
            share = 1 / (len(batch.rows) + len(finished))  # a round's time is split over its live rows
            st.draft_s += draft_s * share
            st.verify_s += verify_s * share
            st.overhead_s += overhead_s * share
        return finished


class SpeculativeEngine:
    """Speculative decoding over a target and an optional draft that share a vocabulary.

    Args:
        target_model: the target (a transformers causal LM, eval mode).
        draft_model: the draft, or None for the target alone.
        gamma: draft tokens per round (0 = the target alone).
        dynamic_gamma: choose gamma each round from measured acceptance and costs (see `gamma.py`),
            down to 0 when the draft does not pay for itself; `gamma` is then the starting value, and an
            explicit gamma of 0 still means the target alone. Report it separately from static gamma.
        max_gamma: the upper bound for dynamic gamma.
        backend: "auto" (lean decoder for the Llama family, transformers otherwise), "lean" or "hf".
        kernels: linear kernels of the lean decoder: "auto" (native, else oneDNN, on CPU fp32), "native", "onednn", "torch".
        draft_weights: "float" (the draft model's own), "int8" or "auto" (int8 where the native kernel runs the draft,
            `decoders.resolve_weights`). int8: the lean decoder streams the draft's matrices as int8 with per-row
            scales (`fastdraft.quantize`), a quarter of the bytes per draft step; lossless all the same, since the
            target verifies every token against the draft distribution actually proposed from.
        target_decoder: `target_model` already prepared by another engine (`engine.target`): engines that pair
            one target with several drafts share its prepared weights instead of holding a copy each.
        prefill_chunk: prompt tokens a `Run` feeds per step while other rows are generating (chunked prefill, see
            `Run`); 0 prefills every prompt whole. Output does not depend on it.
        lookup_tokens: context lookup beside the draft (`lookup.py`; 0: off): a row whose last `lookup_ngram` (max ..
            min) tokens occurred earlier proposes up to this many tokens that followed them, instead of the draft's. A
            batch of B rows copies up to max(lookup_tokens // B, gamma) tokens a row. Lossless like the draft's.
    """

    def __init__(self, target_model: PreTrainedModel, draft_model: PreTrainedModel | None = None, gamma: int = 3,
                 dynamic_gamma: bool = False, *, max_gamma: int = 8, backend: str = "auto", kernels: str = "auto",
                 target_decoder: Decoder | None = None, draft_weights: str = "float", prefill_chunk: int = PREFILL_CHUNK,
                 lookup_tokens: int = 0, lookup_ngram: tuple[int, int] = (2, 3)):
        if lookup_tokens < 0:
            raise FastdraftError(f"lookup_tokens must be >= 0, got {lookup_tokens}")
        NgramLookup(*lookup_ngram)  # checks the n-gram range now, not at the first request
        self.lookup_tokens, self.lookup_ngram = lookup_tokens, tuple(lookup_ngram)
        if prefill_chunk < 0:
            raise FastdraftError(f"prefill_chunk must be >= 0 (0: whole prompts), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if gamma < 0 or max_gamma < 1:
            raise FastdraftError(f"gamma must be >= 0 and max_gamma >= 1 (got gamma={gamma}, max_gamma={max_gamma})")
        self.target: Decoder = target_decoder or make_decoder(target_model, backend, kernels)
        self.draft: Decoder | None = (make_decoder(draft_model, backend, kernels, draft_weights)
                                      if draft_model is not None else None)
        self.device = next(target_model.parameters()).device
        # max_gamma also bounds a round's block width, which caches are sized for: copied proposals included
        self.gamma, self.dynamic_gamma, self.max_gamma = gamma, dynamic_gamma, max(max_gamma, gamma, lookup_tokens)
        self.vocab_size = self.target.vocab_size
        # p and q meet in one formula: compute both in float32, or float64 when the target runs in float64.
        self.prob_dtype = torch.float64 if next(target_model.parameters()).dtype == torch.float64 else torch.float32
        self.last_stats = SpecStats()

    @classmethod
    def from_dirs(cls, target_dir: str | Path, draft_dir: str | Path | None = None, dtype: str = "float32",
                  device: str = "cpu", gamma: int = 3, draft_dtype: str | None = None, draft_weights: str = "float",
                  **kwargs) -> "SpeculativeEngine":
        """Load a pair from local directories (safetensors); refuses a draft whose tokenizer differs.

        `draft_dtype` defaults to `dtype` (e.g. a bfloat16 target with a float32 draft on GPU). With `draft_weights`
        "int8" the loaded draft is rounded to the int8 grid first (`round_model_to_int8_`), so that the engine's
        draft and the HF model it returns as `draft_model` compute the same numbers.
        """
        from fastdraft.checkpoint import load_model
        from fastdraft.tokenizer import check_compatible

        target = load_model(target_dir, dtype=dtype, device=device)
        draft = None
        if draft_dir is not None:
            check_compatible(target_dir, draft_dir)
            draft = load_model(draft_dir, dtype=draft_dtype or dtype, device=device)
            draft_weights = resolve_weights(draft, draft_weights, kwargs.get("backend", "auto"), kwargs.get("kernels", "auto"))
            if draft_weights == "int8":
                round_model_to_int8_(draft)
        return cls(target, draft, gamma=gamma, draft_weights=draft_weights, **kwargs)

    @property
    def param_ratio(self) -> float:
        """c = draft params / target params (for MBSU)."""
        return self.draft.num_params / self.target.num_params if self.draft else 0.0

    def generate(self, prompts: list[list[int]], params: Settings, gamma: int | None = None,
                 on_tokens: OnTokens | None = None, should_stop: ShouldStop | None = None,
                 prior_output: list[int] | None = None, on_prompt_logprobs: Callable | None = None) -> list[GenerationResult]:
        """Generate for every prompt; `on_tokens(i, new_ids)` streams each round's new tokens of prompt i.

        Args:
            params: one setting for every prompt, prompt i then seeded seed + i (`seeded_rows`); or one per prompt,
                each seeded with its own seed, as separate requests would be.
            should_stop: asked after every round for each live prompt; a reason it returns ends that prompt alone
                (its rows leave the batch at once, the others go on): cancellation and deadlines.
            prior_output: per prompt, how many of its trailing tokens were already generated (a continuation):
                they count as output for `min_new_tokens` and the presence/frequency penalties, not for `max_new_tokens`.
            on_prompt_logprobs: with `SamplingParams.prompt_logprobs`, called once per prompt right after the prefill,
                with the entries that `GenerationResult.prompt_logprobs` holds.
        """
        gamma = self.gamma if gamma is None else gamma
        prior_output = list(prior_output) if prior_output is not None else [0] * len(prompts)
        if isinstance(params, SamplingParams):
            rows = seeded_rows(params, len(prompts))
        else:
            rows = list(params)
            if len(rows) != len(prompts):
                raise FastdraftError(f"{len(rows)} settings for {len(prompts)} prompts")
        self._validate_prompts(prompts)
        for p in set(rows):
            self._validate([], p, gamma)
        if len(prior_output) != len(prompts) or any(not 0 <= k < len(p) for k, p in zip(prior_output, prompts)):
            raise FastdraftError("prior_output must give, per prompt, a count below the prompt's length")
        if self.draft is None:
            gamma = 0
        if not prompts:
            self.last_stats = SpecStats()
            return []
        ragged = self.target.ragged and (self.draft is None or self.draft.ragged)
        groups = [list(range(len(prompts)))] if ragged else [[i] for i in range(len(prompts))]
        results: list[GenerationResult] = [None] * len(prompts)  # type: ignore[list-item]
        for group in groups:
            run = self.start(rows[group[0]], gamma,
                             on_tokens=None if on_tokens is None else (lambda i, *a, g=group: on_tokens(g[i], *a)),
                             should_stop=None if should_stop is None else (lambda i, g=group: should_stop(g[i])),
                             on_prompt_logprobs=None if on_prompt_logprobs is None else (lambda i, e, g=group: on_prompt_logprobs(g[i], e)))
            run.add([prompts[i] for i in group], [prior_output[i] for i in group], params=[rows[i] for i in group])
            while not run.done:
                run.step()
            for i, r in zip(group, run.results):
                results[i] = r
        self.last_stats = SpecStats()
        for r in results:
            self.last_stats += r.stats
        return results

    def start(self, params: SamplingParams, gamma: int | None = None, on_tokens: OnTokens | None = None,
              should_stop: ShouldStop | None = None, on_prompt_logprobs: Callable | None = None,
              prefill_chunk: int | None = None) -> Run:
        """An empty `Run` with these settings: `add` prompts, then `step` it (see `Run`); `prefill_chunk` defaults to
        the engine's."""
        gamma = self.gamma if gamma is None else gamma
        self._validate([], params, gamma)
        return Run(self, params, gamma, on_tokens, should_stop, on_prompt_logprobs, prefill_chunk)

    def _validate(self, prompts: list[list[int]], params: SamplingParams, gamma: int) -> None:
        if gamma < 0:
            raise FastdraftError(f"gamma must be >= 0, got {gamma}")
        if params.max_new_tokens < 1:
            raise FastdraftError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if not 0 <= params.min_new_tokens <= params.max_new_tokens:
            raise FastdraftError(f"min_new_tokens must be in [0, max_new_tokens], got {params.min_new_tokens}")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
            raise FastdraftError(f"invalid sampling params: temperature >= 0, 0 < top_p <= 1, top_k >= 0 expected, got {params}")
        if params.repetition_penalty <= 0 or not 0 <= params.min_p <= 1 or any(
                k is not None and not 0 <= k <= self.vocab_size for k in (params.logprobs, params.prompt_logprobs)):
            raise FastdraftError(f"invalid sampling params: repetition_penalty > 0, 0 <= min_p <= 1, 0 <= logprobs <= vocab expected, got {params}")
        ids = [t for t, _ in params.logit_bias] + list(params.allowed_token_ids or ()) + list(params.stop_token_ids)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise FastdraftError(f"token ids in logit_bias / allowed_token_ids / stop_token_ids must be in [0, {self.vocab_size})")
        if params.allowed_token_ids is not None and not params.allowed_token_ids:
            raise FastdraftError("allowed_token_ids must not be empty")
        self._validate_prompts(prompts)

    def _validate_prompts(self, prompts: list[list[int]]) -> None:
        for i, p in enumerate(prompts):
            if not p:
                raise FastdraftError(f"prompt {i} is empty: the engine needs at least one token (e.g. BOS)")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise FastdraftError(f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    # ------------------------------------------------------------------------------------------
    def _score_prompts(self, batch: _Batch, seqs: list[int], prompts: list[list[int]], logits: torch.Tensor | None,
                       on_prompt: Callable | None) -> None:
        """Prompt logprobs from the prefill's logits: for tokens 1.. of each prompt, (logprob, rank, top k) under the
        target's plain distribution (no penalties: nothing is generated yet); the first token has none. Only for the
        sequences whose settings ask for them."""
        for r, p in enumerate(prompts):
            k = batch.params[seqs[r]].prompt_logprobs
            if k is None:
                continue
            entries = []
            if len(p) > 1:
                lp = logits[r, :len(p) - 1].to(self.prob_dtype).log_softmax(dim=-1)
                chosen = lp[torch.arange(len(p) - 1, device=lp.device), torch.tensor(p[1:], device=lp.device)]
                ranks = ((lp > chosen[:, None]).sum(dim=-1) + 1).tolist()
                top = lp.topk(k, dim=-1) if k else None
                tops = ([list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())] if top is not None
                        else [[] for _ in ranks])
                entries = list(zip(chosen.tolist(), ranks, tops))
            batch.results[seqs[r]].prompt_logprobs = entries
            if on_prompt is not None:
                on_prompt(seqs[r], entries)

    def _draft(self, cache, batch: _Batch, g: int, params: list[SamplingParams], generators: list[torch.Generator],
               timer: _Timer, counts: torch.Tensor | None = None,
               seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Propose g tokens per row, each with its own settings and generator: ([B, g] tokens, [B, g, V] draft
        probabilities, or None when every row is greedy, seconds). A greedy row among sampled ones gets the one-hot q
        of its argmax (`warp_probs`), which its verification needs."""
        rows = len(batch.rows)
        if g <= 0:
            return torch.empty(rows, 0, dtype=torch.long, device=self.device), None, 0.0
        committed = batch.committed()
        # Feed the tokens the draft has not cached yet (1, or 2 after a full accept, or more after gamma 0).
        # Rows needing fewer start earlier and rewrite entries they already hold, so all rows share a width.
        width = max(c - d for c, d in zip(committed, batch.draft_len))
        starts = [max(0, c - width) for c in committed]
        ids = right_pad([batch.tokens[s][st:] for s, st in zip(batch.rows, starts)], self.device)
        logits = self.draft.forward(cache, ids, starts, [c - 1 - st for c, st in zip(committed, starts)])
        tokens, probs = [], []
        produced = batch.produced()
        for i in range(g):
            # The draft's logits get the target's processing (penalties, bias, masks) over its own proposals so far:
            # not needed for exactness (the target verifies against q as proposed), but it keeps acceptance up.
            logits = process_logits(self._to_target_vocab(logits), params, [n + i for n in produced], counts, seen)
            if all(p.greedy for p in params):
                tok = logits.argmax(dim=-1)
            else:
                probs.append(warp_probs(logits.to(self.prob_dtype), params))
                tok = sample(probs[-1], generators)
            tokens.append(tok)
            if counts is not None:
                counts = counts.scatter_add(1, tok[:, None], torch.ones_like(tok[:, None]))
            if seen is not None:
                seen = seen.scatter(1, tok[:, None], True)
            if i < g - 1:
                logits = self.draft.forward(cache, tok[:, None], [c + i for c in committed], [0] * rows)
        batch.draft_len = [c + g - 1 for c in committed]
        q = torch.stack(probs, dim=1) if probs else None
        return torch.stack(tokens, dim=1), q, timer.lap()

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary (embedding tables may be padded differently)."""
        v = self.vocab_size
        if logits.shape[-1] == v:
            return logits
        if logits.shape[-1] > v:
            return logits[..., :v]
        return torch.cat([logits, logits.new_full((*logits.shape[:-1], v - logits.shape[-1]), float("-inf"))], dim=-1)

    def _commit(self, batch: _Batch, drafts: list[list[int]], accepted: list[int], nxt: list[int],
                on_tokens: OnTokens | None, logits: torch.Tensor | None = None,
                should_stop: ShouldStop | None = None, looked_up: list[bool] | None = None) -> list[int]:
        """Append each row's accepted tokens + correction, honoring stop tokens and max tokens; count.

        `looked_up[r]`: row r's proposals were copied from its context (`lookup.py`), not drafted: counted as looked up
        (the draft's AR stays the draft's), and its draft cache holds none of them.

        `logits` ([B, g + 1, V], the target's processed logits of this round) gives the log-probabilities when asked.
        Returns the sequence ids that finished this round.
        """
        finished = []
        logprobs = None
        if logits is not None:
            # Position j of the verification pass scores the j-th new token of the round (accepted or the correction):
            # the target's own distribution there, whichever model proposed the token.
            logprobs = logits.to(self.prob_dtype).log_softmax(dim=-1)
            k = max(batch.params[s].logprobs or 0 for s in batch.rows)  # each row then takes its own k of these
            top = logprobs.topk(k, dim=-1) if k else None
        for r, s in enumerate(batch.rows):
            n, g = accepted[r], len(drafts[r])
            new = drafts[r][:n] + [nxt[r]]
            room = batch.remaining(r)
            cut = next((i + 1 for i, t in enumerate(new) if t in batch.params[s].stop_token_ids), None)
            reason = None
            if cut is not None and cut <= room:
                new, reason = new[:cut], "stop"
            elif len(new) >= room:
                new, reason = new[:room], "length"
            stats = batch.results[s].stats
            copied = bool(looked_up and looked_up[r])
            if copied:
                stats.looked_up += g
                stats.looked_up_accepted += n
            else:
                stats.drafted += g
                stats.accepted += n
                _count_positions(stats, g, n)
            stats.target_passes += 1
            stats.emitted += len(new)
            stats.truncated += n + 1 - len(new)
            committed = len(batch.tokens[s])
            batch.tokens[s].extend(new)
            batch.results[s].token_ids.extend(new)
            # draft KV past the accepted prefix is stale (all of this round's, when the row copied instead)
            batch.draft_len[r] = min(batch.draft_len[r], committed + (0 if copied else n))
            entries = None
            k = batch.params[s].logprobs
            if logprobs is not None and k is not None:
                at = torch.arange(len(new), device=logprobs.device)
                chosen = logprobs[r, at, torch.tensor(new, device=logprobs.device)].tolist()
                tops = ([list(zip(top.indices[r, j, :k].tolist(), top.values[r, j, :k].tolist())) for j in range(len(new))]
                        if k else [[] for _ in new])
                batch.results[s].logprobs.extend(chosen)
                batch.results[s].top_logprobs.extend(tops)
                entries = list(zip(chosen, tops))
            if on_tokens is not None:
                if entries is None:
                    on_tokens(s, new)
                else:
                    on_tokens(s, new, entries)
            if reason is None and should_stop is not None:
                reason = should_stop(s)
            if reason:
                batch.results[s].finish_reason = reason
                finished.append(s)
        return finished

    def _drop_finished(self, batch: _Batch, finished: list[int], target_cache, draft_cache) -> None:
        if not finished:
            return
        keep = [r for r, s in enumerate(batch.rows) if s not in finished]
        batch.rows = [batch.rows[r] for r in keep]
        batch.draft_len = [batch.draft_len[r] for r in keep]
        if keep:
            target_cache.keep_rows(keep)
            if draft_cache is not None:
                draft_cache.keep_rows(keep)


def _count_positions(stats: SpecStats, drafted: int, accepted: int) -> None:
    """Per-position acceptance: position i of a block was drafted / accepted (accepted => all before it were)."""
    grow = drafted - len(stats.per_position_drafted)
    if grow > 0:
        stats.per_position_drafted.extend([0] * grow)
        stats.per_position_accepted.extend([0] * grow)
    for i in range(drafted):
        stats.per_position_drafted[i] += 1
        stats.per_position_accepted[i] += i < accepted


def _merge_proposals(drafts: torch.Tensor, q: torch.Tensor | None, looked: list[list[int]], params: list[SamplingParams],
                     vocab: int, prob_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One block of proposals for the round: each row's copied tokens where it has some, else its drafted ones.

    Returns ([B, W] tokens, right-padded; [B, W, V] proposal distributions, or None when every row is greedy;
    [B] how many of each row's tokens are proposals). A copied token was proposed with certainty: its q is one-hot,
    so rejection sampling accepts it with probability p(token) and otherwise draws from p without it, exactly the
    target's distribution. Padding has q = 0, so a row whose proposals all pass draws its bonus token from p."""
    rows, g = drafts.shape
    lengths = [len(lk) if lk else g for lk in looked]
    width = max(lengths)
    tokens = torch.zeros(rows, width, dtype=torch.long, device=drafts.device)
    tokens[:, :g] = drafts
    probs = None
    if not all(p.greedy for p in params):
        probs = torch.zeros(rows, width, vocab, dtype=prob_dtype, device=drafts.device)
        if q is not None:
            probs[:, :g] = q
    for r, lk in enumerate(looked):
        if lk:
            tokens[r] = 0
            tokens[r, :len(lk)] = torch.tensor(lk, device=drafts.device)
            if probs is not None:
                probs[r] = 0
                probs[r, torch.arange(len(lk)), tokens[r, :len(lk)]] = 1
    return tokens, probs, torch.tensor(lengths, device=drafts.device)
