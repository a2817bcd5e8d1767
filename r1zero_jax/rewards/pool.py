"""Bounded grading in worker processes: every step that reads model text runs there.

Workers are forked by a server process (`_worker.py`) that the pool starts with `python -m`, so
they never inherit the trainer's state, and a new one is ready in milliseconds. Each row gets a
CPU-time budget (`timeout_s`, CPU seconds, not wall seconds, so a loaded machine does not turn
slow-but-correct answers into zeros); the worker enforces it with a CPU timer, and the pool kills a
worker whose row passes the budget without returning (a long call in C). Any worker death, at any
moment, is survived: the worker is replaced, its unanswered rows go back to the queue, and a row
that kills two workers scores 0. Every row is answered, in order.
"""

import atexit
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import r1zero_jax
from r1zero_jax import jsonl, plugins
from r1zero_jax.rewards.math_grader import MATH_REWARD
from r1zero_jax.rewards.extract import MAX_RESPONSE_CHARS
from r1zero_jax.rewards.templates import check_template

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # wall time for the server to import and warm up, or a worker to fork
KILL_GRACE_S = 1.0  # CPU time past the budget before the pool kills a worker stuck in C code
# A row that has not finished after this much wall time (a stopped or starved worker) counts as a
# worker death; far above any CPU budget, so load alone never reaches it.
WALL_LIMIT_S = 300.0
WINDOW = 4  # rows queued per worker: it never waits for the pool, and a death re-queues few
# Consecutive server deaths with no worker ready in between: before any worker of the pool was ever
# ready, the install is broken (raise); later, the pool backs off and keeps trying.
MAX_SERVER_FAILURES = 3
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class GradeResult:
    reward: float  # the reward function's (math: 1.0 or 0.0)
    extracted: str | None  # the answer found in the response
    timed_out: bool
    reason: str = ""  # equal, not equal, hedge, no answer, timeout, worker died, memory, ...


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of a process, from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


class _Worker:
    def __init__(self, to_worker: int, from_worker: int):
        self.wfd, self.rfd = to_worker, from_worker
        os.set_blocking(self.wfd, False)
        self.pid: int | None = None  # known once it reports ready
        self.ready = False
        self.closed = False  # killed, its fds closed: it is replaced before the pool polls again
        self.spawned = time.monotonic()
        self.out = bytearray()
        self.buf = b""
        self.inflight: deque[int] = deque()  # row indices sent, in order; the first is running
        self.sizes: deque[int] = deque()  # their encoded sizes in bytes
        self.cpu_mark = 0.0  # the worker's CPU time when its first in-flight row started
        self.row_wall = 0.0  # monotonic time when that row started
        self.next_check = 0.0

    def queue(self, i: int, data: bytes) -> None:
        self.inflight.append(i)
        self.sizes.append(len(data))
        self.out += data

    def answered(self) -> int:
        self.sizes.popleft()
        return self.inflight.popleft()

    def read_any(self) -> bool:
        """Whether the worker read any of the rows written to it: one found dead with all of them
        still in its pipe died of something else (killed while idle), not of its first row."""
        written = sum(self.sizes) - len(self.out)
        try:
            unread = struct.unpack("i", fcntl.ioctl(self.wfd, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return True
        return unread < written

    def start_row(self, cpu: float) -> None:
        self.cpu_mark, self.row_wall = cpu, time.monotonic()
        self.next_check = 0.0

    def flush(self) -> bool:
        """Write what is queued without blocking; False when the worker is gone."""
        try:
            while self.out:
                n = os.write(self.wfd, self.out)
                del self.out[:n]
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True

    def read(self) -> list[dict] | None:
        """Messages now available, or None when the worker has exited."""
        try:
            chunk = os.read(self.rfd, 1 << 16)
        except OSError:
            return None
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        try:
            return [json.loads(line) for line in lines if line]
        except ValueError:
            return None  # not our protocol: treated as a dead worker

    def kill(self) -> None:
        """Idempotent: a second call must not signal a reused pid or close a reused fd."""
        if self.closed:
            return
        self.closed = True
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        for fd in (self.wfd, self.rfd):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Server:
    """The fork server: one process that forks ready-to-grade workers on request."""

    def __init__(self, cpu_budget_s: float, reward_fn: str):
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(r1zero_jax.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "r1zero_jax.rewards._worker", repr(cpu_budget_s), reward_fn],
            stdin=theirs, stdout=subprocess.DEVNULL, env=env,
        )
        theirs.close()
        ours.setblocking(False)
        self.sock = ours

    def spawn(self) -> _Worker:
        """A worker, forked once the server gets to the request; if it never does, its pipes close
        (the pool then sees a failed start)."""
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        try:
            socket.send_fds(self.sock, [b"F"], [to_r, from_w])
        except OSError:  # gone, or stuck with a full queue: the next _ensure_server starts anew
            self.proc.kill()
        finally:
            os.close(to_r)
            os.close(from_w)
        return _Worker(to_w, from_r)

    def kill(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


def default_workers() -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class GraderPool:
    """Context manager grading batches of responses, each row bounded by `timeout_s` CPU seconds.

    `reward_fn`: the import spec of the reward function the workers run (plugins.py), the math
    grader by default. Counters over the pool's life: `timeouts`, `worker_deaths` (workers that
    died holding rows), `start_failures` (workers that died before reporting ready),
    `server_restarts`."""

    def __init__(self, workers: int | None = None, timeout_s: float = 2.0,
                 reward_fn: str = MATH_REWARD):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        # Loaded here too, so a bad spec is named at once rather than as a dead server.
        plugins.load(reward_fn, "reward function")
        self.reward_fn = plugins.absolute(reward_fn)
        self.timeout_s = timeout_s
        self.timeouts = self.worker_deaths = self.start_failures = self.server_restarts = 0
        self._lock = threading.Lock()
        self._server_failures = 0
        self._failed_starts, self._failing_since = 0, 0.0  # the current run of failed starts
        self._ever_ready = False
        self._server: _Server | None = _Server(timeout_s, self.reward_fn)
        self._workers = [self._server.spawn() for _ in range(workers or default_workers())]
        self._closed = False

    def __enter__(self) -> "GraderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                w.kill()
            self._workers = []
            if self._server is not None:
                self._server.kill()
                self._server = None

    def worker_pids(self) -> list[int]:
        """Process ids of the workers that have reported ready."""
        return [w.pid for w in self._workers if w.pid is not None and not w.closed]

    def server_pid(self) -> int | None:
        return self._server.proc.pid if self._server is not None else None

    def grade(self, responses: Sequence[str], answers: Sequence, template: str = "qwen_math"
              ) -> list[GradeResult]:
        """One GradeResult per response, in order. Raises only on bad arguments, never because
        of what a response contains. For the math reward, `answers[i]` is a string (or number)
        or a list of them and `template` says where the answer is; another reward function gets
        (response, answer) with any JSON answer."""
        math_reward = self.reward_fn == MATH_REWARD
        kwargs = {"template": check_template(template)} if math_reward else {}
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        rows: list[tuple[str, object]] = []
        results: list[GradeResult | None] = [None] * len(responses)
        for i, (resp, ans) in enumerate(zip(responses, answers, strict=False)):
            if not isinstance(resp, str):
                raise TypeError(f"response {i} is {type(resp).__name__}, expected str")
            rows.append((resp, _references(ans, i) if math_reward else ans))
            if len(resp) > MAX_RESPONSE_CHARS:  # not read at all: it earns nothing
                results[i] = GradeResult(0.0, None, False, "too long")
        pending = deque(i for i, r in enumerate(results) if r is None)
        if pending:
            with self._lock:
                if self._closed:
                    raise RuntimeError("GraderPool is closed")
                self._run(rows, kwargs, pending, results)
        return results

    # -- the event loop ----------------------------------------------------------------------

    def _ensure_server(self) -> None:
        if self._server is not None and self._server.proc.poll() is None:
            return
        if self._server is not None:
            code = self._server.proc.returncode
            self._server.kill()
            self._server = None
            self._server_failures += 1
            log.warning("grader server exited (code %s); restarting it", code)
            if self._server_failures >= MAX_SERVER_FAILURES:
                if not self._ever_ready:
                    raise RuntimeError(
                        f"grader server exited {self._server_failures} times before any worker "
                        f"started (last exit code {code}): is the install broken?")
                time.sleep(min(0.1 * 2 ** self._server_failures, 10.0))
        self._server = _Server(self.timeout_s, self.reward_fn)
        self.server_restarts += 1

    def _replace(self, w: _Worker, pending: deque, results: list, *, penalise: bool,
                 deaths: dict) -> None:
        """Kill `w`, put its unanswered rows back in front of the queue, fork a new worker."""
        penalise = penalise and w.read_any()
        w.kill()
        rows = list(w.inflight)
        if rows and penalise:
            head = rows.pop(0)
            deaths[head] = deaths.get(head, 0) + 1
            if deaths[head] >= 2:
                log.warning("row %d killed two grader workers; scored 0", head)
                results[head] = GradeResult(0.0, None, False, "worker died")
            else:
                rows.insert(0, head)
        pending.extendleft(reversed(rows))
        self._ensure_server()
        self._workers[self._workers.index(w)] = self._server.spawn()

    def _died(self, w: _Worker, pending: deque, results: list, deaths: dict, *,
              penalise: bool = True) -> None:
        """`w` is gone: count, log, replace it. `penalise`: its first row may have killed it."""
        if w.ready:
            self.worker_deaths += 1
            log.warning("grader worker %s died with %d rows queued (%d deaths in this pool)",
                        w.pid, len(w.inflight), self.worker_deaths)
        else:
            self._failed_start()
        self._replace(w, pending, results, penalise=penalise and w.ready, deaths=deaths)

    def _failed_start(self) -> None:
        """A worker died before it was ready. Killed ones are replaced at once; a run of failures
        (a server that cannot fork, say under memory pressure) backs off, restarts the server every
        8 failures, and raises after STARTUP_TIMEOUT_S: then no row can be graded at all."""
        self.start_failures += 1
        now = time.monotonic()
        if not self._failing_since:
            self._failing_since = now
        n = self._failed_starts = self._failed_starts + 1
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: a streak does not flood the log
            log.warning("grader worker died before it was ready (%d in a row, %d in this pool)",
                        n, self.start_failures)
        if now - self._failing_since > STARTUP_TIMEOUT_S:
            raise RuntimeError(f"no grader worker could start for {STARTUP_TIMEOUT_S:.0f} s "
                               f"({n} attempts)")
        if n % 8 == 0:
            self._server.proc.kill()  # _ensure_server starts a new one
        if n > 1:
            time.sleep(min(0.01 * 2 ** n, 1.0))

    def _on_message(self, w: _Worker, m: dict, pending: deque, results: list, deaths: dict) -> bool:
        """Handle one message; False when the worker was retired."""
        if m.get("ready"):
            w.ready, w.pid = True, m["pid"]
            w.start_row(m["cpu"])
            self._server_failures = self._failed_starts = 0
            self._failing_since = 0.0
            self._ever_ready = True
            return True
        if not w.inflight or m.get("id") != w.inflight[0]:
            self._died(w, pending, results, deaths)  # out of protocol: treat as broken
            return False
        i = w.answered()
        reason = m["reason"]
        results[i] = GradeResult(float(m["reward"]), m["extracted"], reason == "timeout", reason)
        w.start_row(m["cpu"])
        if reason in ("timeout", "memory"):
            # Interrupted mid-computation: sympy's caches may be half-written. A fresh worker.
            self.timeouts += reason == "timeout"
            self._replace(w, pending, results, penalise=False, deaths=deaths)
            return False
        return True

    def _check_time(self, w: _Worker, now: float, pending: deque, results: list,
                    deaths: dict) -> float:
        """Enforce the row bound on `w`; the next time it needs a look."""
        if not w.ready:
            if now - w.spawned > STARTUP_TIMEOUT_S:
                log.warning("grader worker not ready after %.0f s; restarting the server",
                            STARTUP_TIMEOUT_S)
                self._server.proc.kill()  # _ensure_server (in _replace) starts a new one
                self._server.proc.wait()
                self._died(w, pending, results, deaths)
                return now
            return w.spawned + STARTUP_TIMEOUT_S
        if not w.inflight:
            return float("inf")
        limit = self.timeout_s + KILL_GRACE_S
        wall = now - w.row_wall
        if wall < max(limit, w.next_check):
            return w.row_wall + max(limit, w.next_check)
        cpu = _cpu_seconds(w.pid)
        used = wall if cpu is None else cpu - w.cpu_mark
        if used > limit:
            i = w.answered()
            log.warning("row %d ran past its CPU budget in uninterruptible code; worker killed", i)
            results[i] = GradeResult(0.0, None, True, "timeout")
            self.timeouts += 1
            self._replace(w, pending, results, penalise=False, deaths=deaths)
            return now
        if wall > WALL_LIMIT_S:
            log.warning("row %d made no progress in %.0f s of wall time; worker killed",
                        w.inflight[0], wall)
            self._died(w, pending, results, deaths)
            return now
        # CPU time cannot run faster than wall time: look again when the budget could be spent.
        w.next_check = wall + max(limit - used, 0.01)
        return w.row_wall + w.next_check

    def _run(self, rows: list, kwargs: dict, pending: deque, results: list) -> None:
        deaths: dict[int, int] = {}

        def encode(i: int) -> bytes:
            task = {"id": i, "response": rows[i][0], "answer": rows[i][1], "kwargs": kwargs}
            return (json.dumps(task) + "\n").encode()

        self._failed_starts, self._failing_since = 0, 0.0  # each call gets STARTUP_TIMEOUT_S
        for k, w in enumerate(self._workers):
            if w.closed:  # a previous call raised while replacing it
                self._ensure_server()
                self._workers[k] = self._server.spawn()
        while pending or any(w.inflight for w in self._workers):
            self._ensure_server()
            for w in list(self._workers):
                while w.ready and pending and len(w.inflight) < WINDOW:
                    i = pending.popleft()
                    if results[i] is not None:
                        continue
                    if not w.inflight:
                        w.start_row(w.cpu_mark)  # idle until now: the row's clock starts here
                    w.queue(i, encode(i))
                if w.out and not w.flush():
                    # Found dead while idle: the rows just sent never ran there.
                    self._died(w, pending, results, deaths, penalise=False)
            now = time.monotonic()
            wake = min((self._check_time(w, now, pending, results, deaths)
                        for w in list(self._workers)), default=now + 1.0)
            poller = select.poll()  # not select(): the trainer may hold fds above 1024
            by_fd = {}
            for w in self._workers:
                by_fd[w.rfd] = w
                poller.register(w.rfd, select.POLLIN)
                if w.out:
                    poller.register(w.wfd, select.POLLOUT)
            wait_ms = max(0.0, min(wake, now + 1.0) - time.monotonic()) * 1000
            for fd, _ in poller.poll(wait_ms):
                w = by_fd.get(fd)
                if w is None or w not in self._workers:
                    continue  # a write end, or a worker retired during this round
                msgs = w.read()
                if msgs is None:
                    self._died(w, pending, results, deaths)
                    continue
                for m in msgs:
                    if not self._on_message(w, m, pending, results, deaths):
                        break


def _references(ans, i: int) -> list[str]:
    refs = ([ans] if isinstance(ans, (str, int, float))
            else list(ans) if isinstance(ans, (list, tuple)) else None)
    if not refs or not all(isinstance(r, (str, int, float)) for r in refs):
        raise TypeError(f"answer {i} must be a string, a number or a non-empty list of them; "
                        f"got {ans!r:.80}")
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


def grade_responses(responses: Sequence[str], answers: Sequence, template: str = "qwen_math",
                    pool: GraderPool | None = None) -> list[GradeResult]:
    """`GraderPool.grade` on `pool`, or on a shared pool when none is given."""
    return (pool or _default_pool()).grade(responses, answers, template)


def compute_rewards(responses: Sequence[str], answers: Sequence, template: str = "qwen_math",
                    pool: GraderPool | None = None) -> list[float]:
    """Reward 1.0/0.0 per response (the trainer's reward function); a shared pool when none
    given."""
    return [r.reward for r in grade_responses(responses, answers, template, pool)]


def _read_rows(path: str) -> list[dict]:
    """The rows of a `grade` input, every one checked before any grading: a string `response`,
    an `answer` (a string, a number or a non-empty list of them) and a known template; a bad row
    is named by its 1-based line in the file."""
    scalar = (str, int, float)
    rows = []
    for n, row in jsonl.read_objects(path):
        if "response" not in row or "answer" not in row:
            raise ValueError(f"{path}:{n}: a row needs `response` and `answer`")
        if not isinstance(row["response"], str):
            raise ValueError(f"{path}:{n}: `response` must be a string, got "
                             f"{row['response']!r:.80}")
        ans = row["answer"]
        if not (isinstance(ans, scalar)
                or isinstance(ans, list) and ans and all(isinstance(x, scalar) for x in ans)):
            raise ValueError(f"{path}:{n}: `answer` must be a string, a number or a "
                             f"non-empty list of them, got {ans!r:.80}")
        try:
            check_template(row.get("template", "qwen_math"))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        rows.append(row)
    return rows


def grade_file(input_path: str, output_path: str | None = None, workers: int | None = None,
               chunk: int = 1024) -> int:
    """Grade a JSONL of {response, answer[, template]} (rows written back with reward, extracted
    answer and reason); print accuracy, timeouts and lost workers; return 0."""
    # Output and rows are checked before any grading: found after an hour of grading, a bad row
    # or an unwritable output would lose the hour.
    if output_path:
        jsonl.check_writable(output_path)
    rows = _read_rows(input_path)
    graded: list[GradeResult | None] = [None] * len(rows)
    start = time.monotonic()
    # Written chunk by chunk, so rows graded before a failure are kept.
    with (open(output_path, "w") if output_path else contextlib.nullcontext()) as out, \
            GraderPool(workers) as pool:
        for lo in range(0, len(rows), chunk):
            idx = range(lo, min(lo + chunk, len(rows)))
            by_template: dict[str, list[int]] = {}
            for i in idx:
                by_template.setdefault(rows[i].get("template", "qwen_math"), []).append(i)
            for template, ids in by_template.items():
                res = pool.grade([rows[i]["response"] for i in ids],
                                 [rows[i]["answer"] for i in ids], template)
                for i, r in zip(ids, res, strict=False):
                    graded[i] = r
            if out is not None:
                for i in idx:
                    r = graded[i]
                    out.write(json.dumps({**rows[i], "reward": r.reward,
                                          "extracted": r.extracted, "reason": r.reason}) + "\n")
                out.flush()
            done, dt = idx.stop, time.monotonic() - start
            rate = done / max(dt, 1e-9)
            print(f"graded {done}/{len(rows)} ({rate:.0f}/s, ETA "
                  f"{(len(rows) - done) / rate:.0f} s)", file=sys.stderr)
        deaths = pool.worker_deaths
    correct = sum(r.reward for r in graded)
    timeouts = sum(r.timed_out for r in graded)
    acc = correct / len(rows) if rows else 0.0
    print(f"accuracy: {int(correct)}/{len(rows)} = {acc:.2%}  timeouts: {timeouts}  "
          f"no answer: {sum(r.extracted is None for r in graded)}  grader workers lost: {deaths}")
    return 0
