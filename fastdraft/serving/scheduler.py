"""Iteration-level ("continuous") batching for a model replica: the engine thread's loop.

Requests arrive at any time (`submit`, thread-safe). Between speculative rounds the loop admits them: a request
joins a running batch (`speculative.engine.Run.add`) of its gamma while it has room (`max_batch_size` rows, those still
being prefilled included), else it starts a new one. Gamma is all that must match (`batch_key`): a round drafts one block width for all its rows, while
every other setting (temperature, top-p/k, min-p, penalties, logit bias, seed, max tokens, stops, logprobs) is the
row's own, each row sampling exactly its own target distribution from its own seeded generator. Every running batch then takes one round, in turn, so a short request never waits for a long one to
finish: its prompt goes in a chunk per round (the run's `prefill_chunk`, so that a long prompt does not stall the rows
already generating), and it leaves (its result posted) in the round it finishes.

Each request posts its own events through `request["post"](kind, payload)`:
    ("prompt", entries)                 the prefill's prompt log-probabilities (when asked)
    ("tokens", (ids, logprobs|None))    each round's new tokens
    ("done", (result, gamma, rows, queue_s))
    ("error", message)                  the engine failed on this request (only this one)

Isolation: when a round fails, every request of that batch is continued on its own from what it had streamed
(`continuation`), so only a request that fails alone gets an error; when a prefill fails (`PrefillError`), only the
requests being prefilled are, the running rows untouched. `should_stop` ends a row within
a round: a cancelled request (its `cancel` event set, a client gone), a passed `deadline`, or a stop sequence its
`text` stream has seen.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from fastdraft.errors import PrefillError
from fastdraft.serving import protocol as P

logger = logging.getLogger("ray.serve")


def continuation(request: dict, generated: list[int]) -> dict:
    """The rest of `request` after what it `generated`: the prompt plus those tokens, fewer new tokens.

    Exact for greedy decoding, and a correct sample for sampling (a continuation from a prefix).
    """
    params = request["params"]
    # A fresh seed would repeat the lost attempt's first draws; derive one from the progress instead.
    seed = None if params.seed is None else (params.seed + 1_000_003 * (len(generated) + 1)) % (1 << 63)
    # Once tokens came, the prompt was scored (its logprobs precede them): the continuation does not score it again.
    rest = dataclasses.replace(params, max_new_tokens=params.max_new_tokens - len(generated), seed=seed,
                               prompt_logprobs=params.prompt_logprobs if not generated else None)
    # What was generated stays output: min_tokens and the presence/frequency penalties count it (`prior_output`).
    prior = request.get("prior_output", 0) + len(generated)
    return {**request, "prompt_ids": list(request["prompt_ids"]) + list(generated), "params": rest, "prior_output": prior}


def batch_key(request: dict) -> tuple:
    """What requests must share to run in one batch: gamma alone (one block width per round); see the module doc."""
    return (request["gamma"],)


@dataclass
class _Batch:
    """One running `Run` and the requests in it, by the sequence number `Run.add` gave them."""

    key: tuple
    run: object = None
    requests: dict[int, dict] = field(default_factory=dict)
    streamed: dict[int, list[int]] = field(default_factory=dict)
    texts: dict[int, P.TextStream] = field(default_factory=dict)
    alone: bool = False
    """A batch of one request retried on its own after a failure: it takes no other request."""


class Scheduler:
    """The engine loop of one model replica (one thread: torch already uses the replica's cores for each pass)."""

    def __init__(self, engine, tokenizer, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 counters: dict | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.counters = counters if counters is not None else {}
        self.inbox: queue.Queue = queue.Queue()
        self.batches: list[_Batch] = []
        self.live = 0                      # requests submitted and not yet answered
        self.progress = time.monotonic()   # the last time a round committed tokens (for health)
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def submit(self, request: dict) -> None:
        self.live += 1
        self.inbox.put(request)

    # ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._admit(self._incoming(block=not self.batches))
            for batch in list(self.batches):
                self._step(batch)

    def _incoming(self, block: bool) -> list[dict]:
        """Requests that arrived since the last round; when idle, wait for one, then `batch_wait_timeout_s` more."""
        out = []
        if block:
            out.append(self.inbox.get())
            deadline = time.monotonic() + self.batch_wait_timeout_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    out.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _admit(self, requests: list[dict], alone: bool = False) -> None:
        """Each request joins a running batch of its key with room (one `add` each: every request is its own
        prefill, fed by its own deadline), else starts one; a request retried `alone` always starts its own."""
        ragged = self.engine.target.ragged and (self.engine.draft is None or self.engine.draft.ragged)
        for r in requests:
            key = batch_key(r)
            batch = None if alone or not ragged else next(
                (b for b in self.batches if b.key == key and not b.alone and b.run.size < self.max_batch_size), None)
            self._add(batch or self._new_batch(key, r, alone), [r])

    def _new_batch(self, key: tuple, first: dict, alone: bool) -> _Batch:
        batch = _Batch(key, alone=alone)
        batch.run = self.engine.start(first["params"], first["gamma"],
                                      on_tokens=lambda s, ids, lps=None: self._on_tokens(batch, s, ids, lps),
                                      should_stop=lambda s: self._should_stop(batch, s),
                                      on_prompt_logprobs=lambda s, e: batch.requests[s]["post"]("prompt", [list(x) for x in e]))
        self.batches.append(batch)
        return batch

    def _add(self, batch: _Batch, requests: list[dict]) -> None:
        admitted = time.perf_counter()
        before = dict(batch.requests)
        try:
            # The sequence numbers `add` will hand out, so that prompt logprobs posted during the prefill find them.
            first = len(batch.run.batch.tokens)
            for j, r in enumerate(requests):
                batch.requests[first + j] = r
            seqs = batch.run.add([r["prompt_ids"] for r in requests], [r.get("prior_output", 0) for r in requests],
                                 params=[r["params"] for r in requests])
        except Exception as exc:  # noqa: BLE001 - the running rows are untouched; the new ones go on alone
            batch.requests = before
            if batch.run.done:
                self.batches.remove(batch)
            self._isolate(requests, [[] for _ in requests], exc, alone=batch.alone or len(requests) == 1)
            return
        rows = batch.run.size
        for s, r in zip(seqs, requests):
            batch.streamed[s] = []
            r["queue_s"] = admitted - r["arrived"]
            r["rows"] = rows
            if r.get("text", {}).get("stop") and not r.get("prior_output"):
                batch.texts[s] = P.TextStream(self.tokenizer, **r["text"])

    def _step(self, batch: _Batch) -> None:
        try:
            finished = batch.run.step()
        except PrefillError as exc:  # the prefilled requests alone failed (nothing streamed yet): they go on alone
            failed = [batch.requests.pop(s) for s in exc.seqs]
            if batch.run.done:
                self.batches.remove(batch)
            self._isolate(failed, [[] for _ in failed], exc.cause, alone=batch.alone or len(failed) == 1)
            return
        except Exception as exc:  # noqa: BLE001 - isolate: continue each request of the batch on its own
            self.batches.remove(batch)
            live = batch.run.sequences  # rows still being prefilled included
            self._isolate([batch.requests[s] for s in live], [batch.streamed[s] for s in live], exc,
                          alone=batch.alone or len(live) == 1)
            return
        self.progress = time.monotonic()
        for s in finished:
            r = batch.requests.pop(s)
            batch.streamed.pop(s, None)
            batch.texts.pop(s, None)
            r["post"]("done", (batch.run.results[s], batch.run.gamma, r.get("rows", 1), r.get("queue_s", 0.0)))
            self.live -= 1
        if batch.run.done:
            self.batches.remove(batch)

    def _isolate(self, requests: list[dict], streamed: list[list[int]], exc: BaseException, alone: bool) -> None:
        if alone:
            for r in requests:
                self.counters["failed"] = self.counters.get("failed", 0) + 1
                logger.error(f"request failed in the engine: {type(exc).__name__}: {exc}")
                r["post"]("error", f"{type(exc).__name__}: {exc}"[:500])
                self.live -= 1
            return
        logger.warning(f"engine failed on a batch of {len(requests)} ({type(exc).__name__}: {exc}); "
                       f"continuing each request on its own")
        for r, done in zip(requests, streamed):
            self.counters["retried_alone"] = self.counters.get("retried_alone", 0) + 1
            rest = continuation(r, done) if done else r
            self._admit([{**rest, "post": r["post"], "arrived": r["arrived"]}], alone=True)

    # ------------------------------------------------------------------------------------------
    def _on_tokens(self, batch: _Batch, s: int, ids, lps=None) -> None:
        self.progress = time.monotonic()
        ids = [int(t) for t in ids]
        batch.streamed[s].extend(ids)
        if s in batch.texts:
            batch.texts[s].add(ids)
        batch.requests[s]["post"]("tokens", (ids, None if lps is None else [[lp, top] for lp, top in lps]))

    def _should_stop(self, batch: _Batch, s: int) -> str | None:
        r = batch.requests[s]
        if r["cancel"].is_set():
            self.counters["cancelled"] = self.counters.get("cancelled", 0) + 1
            self.counters["last_cancelled_tokens"] = len(batch.streamed[s])  # how far it got: for tests and logs
            return "abort"
        if r.get("deadline") is not None and time.time() > r["deadline"]:
            self.counters["timed_out"] = self.counters.get("timed_out", 0) + 1
            return "timeout"
        if s in batch.texts and batch.texts[s].stopped:  # a stop sequence: no tokens past it are wanted
            return "stop"
        return None
