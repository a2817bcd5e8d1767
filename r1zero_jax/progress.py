"""Progress lines for long work (train steps, eval problems, generated prompts): done / total,
the rate, tokens/s and an ETA, in one style.

The first update of a run pays for compilation, so once a second update has come the rate and
tokens/s are measured from the first one: they describe the steady state, and so does the ETA.
"""

from __future__ import annotations

import math
import sys
import time


def fmt_duration(s: float) -> str:
    """Seconds as '4m05s' or '2h03m'; '?' when unknown."""
    if not math.isfinite(s):
        return "?"
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Counts toward `total` `unit`s; `update` prints a line at most every `every_s` seconds
    (always at the end, or with force). Counts are absolute (done so far), not increments."""

    def __init__(self, label: str, total: int, unit: str = "rows", *, start: int = 0,
                 every_s: float = 10.0, printer=None, clock=time.monotonic):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.print = printer or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.done, self.tokens, self._start = start, 0, start
        self.t0 = clock()
        self._warm: tuple[float, int, int] | None = None  # (time, done, tokens) at update 1
        self._last_print, self._last_state = -math.inf, None

    def _window(self) -> tuple[float, int, int]:
        """(seconds, units, tokens) the rates are measured over."""
        if self._warm is not None and self.done > self._warm[1]:
            t, done, tokens = self._warm
        else:
            t, done, tokens = self.t0, self._start, 0
        return max(self.clock() - t, 1e-9), self.done - done, self.tokens - tokens

    @property
    def rate(self) -> float:
        """Units per second, compilation (the first update's wait) left out once known."""
        dt, done, _ = self._window()
        return done / dt

    @property
    def tokens_per_s(self) -> float:
        dt, _, tokens = self._window()
        return tokens / dt

    @property
    def eta_s(self) -> float:
        r = self.rate
        return (self.total - self.done) / r if r > 0 else math.inf

    def line(self, note: str = "") -> str:
        parts = [f"{self.label}{' ' + note if note else ''}: {self.done}/{self.total} {self.unit}"]
        r = self.rate
        parts.append(f"{r:.2f} {self.unit}/s" if r >= 1 or r == 0
                     else f"{1 / r:.1f} s/{self.unit.rstrip('s')}")
        if self.tokens:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        parts.append(f"elapsed {fmt_duration(self.clock() - self.t0)}")
        parts.append(f"ETA {fmt_duration(self.eta_s) if self.done < self.total else '0m00s'}")
        return ", ".join(parts)

    def update(self, done: int | None = None, *, tokens: int | None = None, note: str = "",
               force: bool = False) -> bool:
        """Sets the counts (absolute); prints when due. Returns whether it printed."""
        if done is not None:
            self.done = done
        if tokens is not None:
            self.tokens = tokens
        if self._warm is None:
            self._warm = (self.clock(), self.done, self.tokens)
        now, state = self.clock(), (self.done, self.tokens, note)
        due = now - self._last_print >= self.every_s or self.done >= self.total
        if not force and (not due or state == self._last_state):
            return False
        self._last_print, self._last_state = now, state
        self.print(self.line(note))
        return True
