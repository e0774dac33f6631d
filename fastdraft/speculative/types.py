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
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

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
    truncated: int = 0        # verified tokens dropped after a stop token / max_new_tokens: N + truncated == A + F

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
            "per_position_drafted": list(self.per_position_drafted),
            "per_position_accepted": list(self.per_position_accepted),
            "draft_s": self.draft_s, "verify_s": self.verify_s, "overhead_s": self.overhead_s, "prefill_s": self.prefill_s,
        }


@dataclass
class GenerationResult:
    """One sequence's output: the new token ids (prompt excluded) and why it stopped."""

    token_ids: list[int]
    finish_reason: str            # "stop" (a stop/EOS token, included in token_ids) or "length"
    stats: SpecStats = field(default_factory=SpecStats)
