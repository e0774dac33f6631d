"""Dynamic gamma: pick each round's gamma to maximize expected tokens per second.

Model: each drafted position is accepted with probability a (independently), so a round with gamma g
emits E(g) = 1 + a + ... + a^g tokens and costs g * t_draft + t_verify * (1 + slope * g). `a` is a
decayed estimate A / (A + R) over recent rounds (R = rounds that hit a rejection); t_draft (per draft
token) and t_verify (per pass, normalized by the slope) are decayed averages of measured seconds, one
of each shared by all gammas, with outliers clipped, so that one slow round on a busy machine cannot
lock a gamma out for good. When the draft does not pay for itself (acceptance collapsed, or a slow
draft) the best gamma is 0, the target alone; then a gamma-1 probe every `probe_every` rounds keeps the
estimate fresh so a draft that starts agreeing again is noticed. This bounds the cost of a bad draft
near the target-alone speed, which a static gamma cannot.
"""

from __future__ import annotations


class GammaController:
    def __init__(self, start: int, max_gamma: int, decay: float = 0.9, probe_every: int = 16, slope: float = 0.1):
        self.start, self.max_gamma, self.decay, self.probe_every = max(1, start), max_gamma, decay, probe_every
        self.slope = slope  # extra verify cost per drafted token, relative to a one-token pass
        self.accepts, self.rejects = 1.4, 0.6  # a weak prior: a = 0.7
        self.t_draft: float | None = None
        self.t_verify: float | None = None
        self.zero_rounds = 0
        self.rounds = 0

    @property
    def acceptance(self) -> float:
        return self.accepts / (self.accepts + self.rejects)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * min(new, 3 * old)

    def next_gamma(self) -> int:
        """The gamma for the next round."""
        if self.t_draft is None or self.t_verify is None:
            return min(self.start, self.max_gamma)  # nothing measured yet
        if self.zero_rounds >= self.probe_every:
            self.zero_rounds = 0
            return 1
        a = self.acceptance

        def rate(g: int) -> float:
            return sum(a ** i for i in range(g + 1)) / (g * self.t_draft + self.t_verify * (1 + self.slope * g))

        best = max(range(self.max_gamma + 1), key=rate)
        self.zero_rounds = self.zero_rounds + 1 if best == 0 else 0
        return best

    def observe(self, gamma: int, accepted: list[int], draft_s: float, verify_s: float, catch_up: int = 1) -> None:
        """Record one round: gamma used, tokens accepted per live row, the round's measured seconds, and how
        many tokens the draft had to catch up on first (after gamma-0 rounds: not a per-token cost)."""
        self.rounds += 1
        timed = self.rounds > 1  # the very first round pays one-off warm-up costs
        if timed:
            self.t_verify = self._ema(self.t_verify, verify_s / (1 + self.slope * gamma))
        if gamma == 0:
            return
        if timed and (catch_up <= 2 or self.t_draft is None):
            self.t_draft = self._ema(self.t_draft, draft_s / gamma)
        self.accepts *= self.decay
        self.rejects *= self.decay
        for n in accepted:
            self.accepts += n
            self.rejects += n < gamma
