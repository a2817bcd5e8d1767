"""Bounded grading: string/number fast path in the caller, sympy work in killable worker processes.

Workers are plain subprocesses (`python -m r1zero_jax.rewards._worker`), never forks of the
trainer (which holds JAX threads), and they live as long as the pool, so a call costs no start-up.
A call that runs past `timeout_s` has its worker killed and replaced; the response gets 0.
"""

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import r1zero_jax
from r1zero_jax import jsonl
from r1zero_jax.rewards.extract import extract_answer
from r1zero_jax.rewards.normalize import quick_verdict
from r1zero_jax.rewards.templates import check_template

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GradeResult:
    reward: float  # 1.0 or 0.0
    extracted: str | None  # the answer found in the response
    timed_out: bool


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(r1zero_jax.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "r1zero_jax.rewards._worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
        )
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None  # index of the response in flight
        self.payload: tuple | None = None  # (index, pred, refs) of that response
        self.deadline = 0.0

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, index: int, pred: str, refs: list[str], timeout_s: float) -> bool:
        self.task, self.deadline = index, time.monotonic() + timeout_s
        self.payload = (index, pred, refs)
        try:
            self.proc.stdin.write((json.dumps({"id": index, "pred": pred, "refs": refs}) + "\n").encode())
            return True
        except (BrokenPipeError, OSError):
            return False

    def read(self) -> list[dict] | None:
        """Messages now available, or None when the worker has exited."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def kill(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.proc.kill()
        self.proc.wait()


def default_workers() -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class GraderPool:
    """Context manager grading batches of responses with a per-call wall-clock bound."""

    def __init__(self, workers: int | None = None, timeout_s: float = 2.0):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._workers = [_Worker() for _ in range(workers or default_workers())]
        self.timeouts = 0  # over the pool's life
        self.crashes = 0

    def __enter__(self) -> "GraderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.kill()
            self._workers = []

    def grade(self, responses: Sequence[str], answers: Sequence, template: str = "qwen_math"
              ) -> list[GradeResult]:
        """One GradeResult per response; `answers[i]` is a string (or number) or a list of them."""
        check_template(template)
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        results: list[GradeResult | None] = [None] * len(responses)
        pending = deque()
        for i, (resp, ans) in enumerate(zip(responses, answers)):
            if not isinstance(resp, str):
                raise TypeError(f"response {i} is {type(resp).__name__}, expected str")
            refs = _references(ans, i)
            pred = extract_answer(resp, template)
            if pred is None:
                results[i] = GradeResult(0.0, None, False)
                continue
            verdict = quick_verdict(pred, refs)
            if verdict is None:
                pending.append((i, pred, refs))
            else:
                results[i] = GradeResult(float(verdict), pred, False)
        if pending:
            with self._lock:
                if not self._workers:
                    raise RuntimeError("GraderPool is closed")
                self._run(pending, results)
        return results

    def _ready_to_read(self, wait_s: float) -> list[_Worker]:
        # poll, not select: a trainer process may hold file descriptors above select's 1024 limit
        poller = select.poll()
        by_fd = {w.fileno(): w for w in self._workers}
        for fd in by_fd:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        return [by_fd[fd] for fd, _ in poller.poll(wait_s * 1000)]

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker()

    def _run(self, pending: deque, results: list) -> None:
        preds = {i: p for i, p, _ in pending}
        deaths = dict.fromkeys(preds, 0)

        def finish(w: _Worker, ok: bool, timed_out: bool = False):
            results[w.task] = GradeResult(float(ok), preds[w.task], timed_out)
            w.task = None

        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:
                while w.ready and w.task is None and pending:
                    i, pred, refs = pending.popleft()
                    if not w.send(i, pred, refs, self.timeout_s):
                        pending.appendleft((i, pred, refs))
                        self._replace(w)
                        break
            now = time.monotonic()
            busy = [w.deadline for w in self._workers if w.task is not None]
            wait = max(0.0, min(busy) - now) if busy else 1.0
            for w in self._ready_to_read(wait):
                msgs = w.read()
                if msgs is None:
                    if not w.ready:
                        raise RuntimeError(f"grader worker failed to start (exit code {w.proc.wait()})")
                    self.crashes += 1
                    if w.task is not None:
                        # Retry once elsewhere: the worker may have died before reading the task.
                        deaths[w.task] += 1
                        if deaths[w.task] < 2:
                            pending.appendleft(w.payload)
                            w.task = None
                        else:
                            log.warning("response %d killed two grader workers; scored 0", w.task)
                            finish(w, False)
                    self._replace(w)
                    continue
                for m in msgs:
                    if m.get("ready"):
                        w.ready = True
                    elif w.task is not None and m.get("id") == w.task:
                        finish(w, m["ok"])
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now > w.deadline:
                    self.timeouts += 1
                    finish(w, False, timed_out=True)
                    self._replace(w)
                elif not w.ready and now - w.started > STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"grader worker not ready after {STARTUP_TIMEOUT_S:.0f} s")


def _references(ans, i: int) -> list[str]:
    refs = [ans] if isinstance(ans, (str, int, float)) else list(ans) if isinstance(ans, (list, tuple)) else None
    if not refs or not all(isinstance(r, (str, int, float)) for r in refs):
        raise TypeError(f"answer {i} must be a string, a number or a non-empty list of them; got {ans!r:.80}")
    return [str(r) for r in refs]


_default: GraderPool | None = None
_default_lock = threading.Lock()


def _default_pool() -> GraderPool:
    global _default
    with _default_lock:
        if _default is None:
            _default = GraderPool()
            atexit.register(_default.close)
        return _default


def compute_rewards(responses: Sequence[str], answers: Sequence, template: str = "qwen_math",
                    pool: GraderPool | None = None) -> list[float]:
    """Reward 1.0/0.0 per response (the trainer's reward function); a shared pool when none given."""
    return [r.reward for r in (pool or _default_pool()).grade(responses, answers, template)]


def _read_rows(path: str) -> list[dict]:
    rows = []
    for n, row in jsonl.read_objects(path):
        if "response" not in row or "answer" not in row:
            raise ValueError(f"{path}:{n}: a row needs `response` and `answer`")
        check_template(row.get("template", "qwen_math"))
        rows.append(row)
    return rows


def grade_file(input_path: str, output_path: str | None = None, workers: int | None = None,
               chunk: int = 1024) -> int:
    """Grade a JSONL of {response, answer[, template]}; print accuracy and timeouts; return 0."""
    rows = _read_rows(input_path)
    graded: list[GradeResult | None] = [None] * len(rows)
    start = time.monotonic()
    with GraderPool(workers) as pool:
        for lo in range(0, len(rows), chunk):
            idx = range(lo, min(lo + chunk, len(rows)))
            by_template: dict[str, list[int]] = {}
            for i in idx:
                by_template.setdefault(rows[i].get("template", "qwen_math"), []).append(i)
            for template, ids in by_template.items():
                res = pool.grade([rows[i]["response"] for i in ids], [rows[i]["answer"] for i in ids],
                                 template)
                for i, r in zip(ids, res):
                    graded[i] = r
            done, dt = idx.stop, time.monotonic() - start
            rate = done / max(dt, 1e-9)
            print(f"graded {done}/{len(rows)} ({rate:.0f}/s, ETA {(len(rows) - done) / rate:.0f} s)",
                  file=sys.stderr)
    if output_path:
        with open(output_path, "w") as f:
            for row, r in zip(rows, graded):
                f.write(json.dumps({**row, "reward": r.reward, "extracted": r.extracted}) + "\n")
    correct = sum(r.reward for r in graded)
    timeouts = sum(r.timed_out for r in graded)
    acc = correct / len(rows) if rows else 0.0
    print(f"accuracy: {int(correct)}/{len(rows)} = {acc:.2%}  timeouts: {timeouts}  "
          f"no answer: {sum(r.extracted is None for r in graded)}")
    return 0
