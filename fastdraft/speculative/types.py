"""Types shared by the speculative engine, the evaluation harness and the server.

Metric definitions: `fastdraft.evaluation.metrics` (one definition each, used everywhere). For one generation: D drafted
tokens, A of them accepted, F target forward passes, N tokens emitted (accepted + one correction/bonus
token per pass):
    acceptance rate        AR   = A / D
    block efficiency       tau  = N / F          (tokens per target pass, bonus included; state gamma)
    memory-bound speedup   MBSU = tau / (1 + gamma * c),  c = draft_params / target_params
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings, applied identically to target and draft. temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    min_p: float = 0.0
    """transformers' / vLLM's min-p: tokens below min_p times the top token's probability are dropped (after top-p)."""
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    """Stop tokens are masked (probability 0, for target and draft alike) until this many tokens are out:
    the output is then exactly the target's under that mask, as `generate(min_new_tokens=...)` gives."""
    seed: int | None = None
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already in the output (prompt excluded)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per occurrence of a token in the output so far (prompt excluded)."""
    repetition_penalty: float = 1.0
    """transformers' / vLLM's: logits of tokens in the prompt or the output are divided by it (multiplied when
    negative); 1 = off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits (OpenAI's `logit_bias`)."""
    allowed_token_ids: tuple[int, ...] | None = None
    """When set, every other token is masked (vLLM's `allowed_token_ids`)."""
    logprobs: int | None = None
    """None: no log-probabilities. k >= 0: each new token's log-probability under the TARGET (its processed logits:
    penalties, bias and masks applied, before temperature / top-k / top-p), and the k most likely alternatives."""
    prompt_logprobs: int | None = None
    """None: off. k >= 0: each prompt token's log-probability under the target (from the prefill, which then computes
    logits at every prompt position), its rank, and the k most likely alternatives there."""

    @property
    def processed(self) -> bool:
        """Whether logits are modified before warping (penalties, bias, masks); min_new_tokens aside."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SpecStats:
    """Counters of one or many generations; add them with `+=` to aggregate."""

    drafted: int = 0          # D
    accepted: int = 0         # A
    target_passes: int = 0    # F (verification passes; the prefill is not counted)
    emitted: int = 0          # N
    per_position_drafted: list[int] = field(default_factory=list)   # index i: drafts at position i of a block
    per_position_accepted: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    overhead_s: float = 0.0
    prefill_s: float = 0.0
    truncated: int = 0        # verified tokens dropped after a stop token / max_new_tokens: N + truncated == A + L + F
    looked_up: int = 0        # proposals copied from the context (`lookup.py`), not drafted: not in D
    looked_up_accepted: int = 0  # L: those the target accepted (not in A: AR stays the draft model's)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tau(self) -> float:
        return self.emitted / self.target_passes if self.target_passes else 0.0

    @property
    def decode_s(self) -> float:
        """Seconds after the prefill: drafting, verification and the loop's own work."""
        return self.draft_s + self.verify_s + self.overhead_s

    @property
    def total_s(self) -> float:
        return self.decode_s + self.prefill_s

    def __iadd__(self, other: "SpecStats") -> "SpecStats":
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_passes += other.target_passes
        self.emitted += other.emitted
        self.truncated += other.truncated
        self.looked_up += other.looked_up
        self.looked_up_accepted += other.looked_up_accepted
        for mine, theirs in ((self.per_position_drafted, other.per_position_drafted),
                             (self.per_position_accepted, other.per_position_accepted)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, v in enumerate(theirs):
                mine[i] += v
        self.draft_s += other.draft_s
        self.verify_s += other.verify_s
        self.overhead_s += other.overhead_s
        self.prefill_s += other.prefill_s
        return self

    def to_dict(self) -> dict:
        return {
            "drafted": self.drafted, "accepted": self.accepted, "target_passes": self.target_passes,
            "emitted": self.emitted, "truncated": self.truncated, "acceptance_rate": self.acceptance_rate, "tau": self.tau,
            "looked_up": self.looked_up, "looked_up_accepted": self.looked_up_accepted,
            "per_position_drafted": list(self.per_position_drafted),
            "per_position_accepted": list(self.per_position_accepted),
            "draft_s": self.draft_s, "verify_s": self.verify_s, "overhead_s": self.overhead_s, "prefill_s": self.prefill_s,
        }


@dataclass
class GenerationResult:
    """One sequence's output: the new token ids (prompt excluded) and why it stopped."""

    token_ids: list[int]
    finish_reason: str
    """"stop" (a stop/EOS token, included in token_ids), "length", or the reason `should_stop` gave (e.g. "abort")."""
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[float] | None = None
    """With `SamplingParams.logprobs`: per new token, its log-probability under the target."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """With `SamplingParams.logprobs` = k: per new token, the target's k most likely (token id, log-probability)."""
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None = None
    """With `SamplingParams.prompt_logprobs` = k: per prompt token after the first, (log-probability, rank, top k)."""
