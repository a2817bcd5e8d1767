"""Grader processes: a fork server, and the workers it forks.

`GraderPool` starts the server with `python -m` (never a fork of the trainer, which holds JAX
threads). The server imports and warms the grader once, then forks a worker for each request that
arrives on its stdin, a Unix socket, with the worker's two pipe ends attached: a new worker is
ready in milliseconds, so killing workers costs little, and every worker starts from the same
state. The server exits when the pool closes its socket.

The server loads the pool's reward function (an import spec, see plugins.py) once. A worker reads
JSON lines {"id", "response", "answer", "kwargs"} and answers each with {"id", "reward", "reason",
"extracted", "cpu"}: the reward function, `fn(response, answer, **kwargs)` returning a reward or
(reward, extracted[, reason]), is every step that reads model text (extraction included), so it
runs here, under a CPU-time budget (ITIMER_PROF), and any failure is a 0 with its reason. "cpu" is
the worker's CPU time after the row, which the pool uses to bound a row stuck in C code.
"""

import contextlib
import gc
import json
import math
import os
import resource
import signal
import socket
import sys
import time

from r1zero_jax import plugins
from r1zero_jax.rewards import math_grader
from r1zero_jax.rewards.normalize import normalize

MEMORY_LIMIT_BYTES = 2 << 30  # a runaway sympy computation raises MemoryError instead of swapping
_WARM_UP = (  # code paths whose first call is slow (imports inside sympy, caches of constants)
    ("\\boxed{\\sqrt{8}}", ["2\\sqrt{2}"]), ("\\boxed{x^2+1}", ["1+x^2"]),
    ("\\boxed{(1,2)}", ["(1,2)"]), ("\\boxed{e^{i\\pi}}", ["-1"]),
    ("\\boxed{\\frac{1}{3}}", ["0.33"]),
    ("\\boxed{\\sin(\\pi/6)}", ["\\frac12"]), ("\\boxed{\\log_2 8}", ["3"]),
)


class CpuTimeout(BaseException):
    """The row used up its CPU budget (a BaseException, so sympy's `except Exception` cannot eat
    it)."""


def _on_cpu_timer(signum, frame):
    raise CpuTimeout


def _verdict(out) -> tuple[float, str | None, str]:
    """(reward, extracted, reason) of a reward function's return value."""
    if not isinstance(out, tuple):
        out = (out,)
    if not 1 <= len(out) <= 3:
        raise TypeError(f"a reward function returned {len(out)} values")
    reward = float(out[0])
    if not math.isfinite(reward):
        raise ValueError(f"a reward function returned {reward}")
    extracted = None if len(out) < 2 or out[1] is None else str(out[1])
    reason = str(out[2]) if len(out) == 3 else ""
    return reward, extracted, reason


def grade_row(task: dict, fn, cpu_budget_s: float) -> dict:
    """The verdict of `fn` on one row, within `cpu_budget_s` of CPU time. Raises nothing but a
    CpuTimeout that fires while an error is being handled (the caller answers that row as a
    timeout)."""
    extracted, reward, reason = None, 0.0, ""
    signal.setitimer(signal.ITIMER_PROF, cpu_budget_s)
    try:
        reward, extracted, reason = _verdict(fn(task["response"], task["answer"],
                                                **task.get("kwargs", {})))
    except CpuTimeout:
        reason = "timeout"
    except MemoryError:
        reason = "memory"
    except RecursionError:
        reason = "recursion"
    except Exception as e:  # noqa: BLE001 - any failure on hostile input is reward 0
        reason = f"error: {type(e).__name__}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    return {"id": task["id"], "reward": reward, "reason": reason, "extracted": extracted,
            "cpu": time.process_time()}


def _serve(rfd: int, wfd: int, fn, cpu_budget_s: float) -> None:
    out = os.fdopen(wfd, "wb", buffering=0)
    ready = {"ready": True, "pid": os.getpid(), "cpu": time.process_time()}
    out.write((json.dumps(ready) + "\n").encode())
    for line in os.fdopen(rfd, "rb"):
        try:
            task = json.loads(line)
        except ValueError:
            continue  # the pool writes whole lines; a torn one cannot be answered by id
        try:
            reply = grade_row(task, fn, cpu_budget_s)
        except CpuTimeout:  # the timer fired while grade_row was already handling an error
            reply = {"id": task["id"], "reward": 0.0, "reason": "timeout", "extracted": None,
                     "cpu": time.process_time()}
        out.write((json.dumps(reply) + "\n").encode())


def _fork_worker(sock: socket.socket, fds: list[int], fn, cpu_budget_s: float) -> None:
    try:
        pid = os.fork()
    except OSError:
        pid = -1  # the pool sees the pipes close and counts a failed start
    if pid == 0:
        code = 1
        try:
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _serve(fds[0], fds[1], fn, cpu_budget_s)
            code = 0
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)


def main() -> None:
    cpu_budget_s, spec = float(sys.argv[1]), sys.argv[2]
    with contextlib.suppress(ValueError, OSError):  # a lower hard limit is already in place
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    signal.signal(signal.SIGPROF, _on_cpu_timer)
    fn = plugins.load(spec, "reward function")
    if spec == math_grader.MATH_REWARD:
        for response, refs in _WARM_UP:
            grade_row({"id": 0, "response": response, "answer": refs}, fn, 60.0)
    # Workers start cold on answers (as the timing of a row must not depend on which worker got it)
    # but warm on sympy's imports; frozen objects are not touched by the workers' collections, so
    # their pages stay shared with the server.
    normalize.cache_clear()
    math_grader._parse.cache_clear()
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps dead workers
    sock = socket.socket(fileno=0)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 2)
        except OSError:
            return
        if not msg:
            return  # the pool closed its end
        if len(fds) == 2:
            _fork_worker(sock, fds, fn, cpu_budget_s)
        else:
            for fd in fds:
                os.close(fd)


if __name__ == "__main__":
    main()
