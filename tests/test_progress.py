"""The progress lines of train, eval and generate (r1zero_jax/progress.py)."""

import math

from r1zero_jax.progress import Progress, fmt_duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_rate_and_eta_leave_out_the_first_updates_wait():
    clock, lines = Clock(), []
    p = Progress("eval", 100, "problems", every_s=0, printer=lines.append, clock=clock)
    clock.t = 60.0  # the first batch: 50 s of compilation + 10 s of work
    p.update(10, tokens=1000)
    assert math.isclose(p.rate, 10 / 60)  # nothing better known yet
    clock.t = 80.0  # then 20 problems and 2000 tokens in 20 s
    p.update(30, tokens=3000)
    assert math.isclose(p.rate, 1.0) and math.isclose(p.tokens_per_s, 100.0)
    assert math.isclose(p.eta_s, 70.0)
    assert lines[-1] == ("eval: 30/100 problems, 1.00 problems/s, 100.0 tokens/s, "
                         "elapsed 1m20s, ETA 1m10s")


def test_slow_units_print_seconds_per_unit_and_lines_are_throttled():
    clock, lines = Clock(), []
    p = Progress("train", 10, "steps", start=2, every_s=30, printer=lines.append, clock=clock)
    clock.t = 100.0
    assert p.update(3)  # the first update prints
    clock.t = 110.0
    assert not p.update(4)  # 10 s later: not yet
    clock.t = 140.0
    assert p.update(5, note="x")
    assert lines[-1] == "train x: 5/10 steps, 20.0 s/step, elapsed 2m20s, ETA 1m40s"
    clock.t = 141.0
    assert p.update(10)  # the end always prints
    assert lines[-1].endswith("ETA 0m00s")
    assert not p.update(10)  # once
    assert p.update(10, note="done", force=True)


def test_fmt_duration():
    assert fmt_duration(65) == "1m05s"
    assert fmt_duration(2 * 3600 + 3 * 60 + 9) == "2h03m"
    assert fmt_duration(math.inf) == "?"
