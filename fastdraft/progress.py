"""Progress lines for long work: counts, rate per second and ETA, printed at most every `every_s`."""

from __future__ import annotations

import sys
import time


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Tracks a main counter (e.g. tokens) toward an optional total and prints rate and ETA.

    >>> p = Progress("prepare", unit="tok", total=1_000_000)
    >>> p.update(4096, docs=3)   # prints at most every `every_s` seconds
    """

    def __init__(self, label: str, unit: str = "tok", total: int | None = None, every_s: float = 5.0, stream=None):
        self.label, self.unit, self.total, self.every_s = label, unit, total, every_s
        self.stream = stream or sys.stdout
        self.count = 0
        self.extra: dict[str, int] = {}
        self.start = self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, n: int = 0, force: bool = False, **extra: int) -> None:
        self.count += n
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0) + v
        now = time.perf_counter()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.emit(self.line())

    def line(self) -> str:
        parts = [f"[{self.label}] {self.count:,} {self.unit}"]
        if self.total:
            parts[0] += f"/{self.total:,} ({self.count / self.total:.0%})"
        parts += [f"{k} {v:,}" for k, v in self.extra.items()]
        parts.append(f"{self.rate:,.0f} {self.unit}/s")
        if self.total and self.rate > 0:
            parts.append(f"ETA {_fmt_duration((self.total - self.count) / self.rate)}")
        return " | ".join(parts)

    def done(self) -> str:
        line = self.line() + f" | done in {_fmt_duration(self.elapsed)}"
        self.emit(line)
        return line

    def emit(self, line: str) -> None:
        """Write one line. Not `print`: Ray Train V2 patches `print` in its workers and tees it to the driver
        a second time, which showed every progress line twice."""
        self.stream.write(line + "\n")
        self.stream.flush()
