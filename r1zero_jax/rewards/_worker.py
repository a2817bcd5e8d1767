"""Grader processes: a fork server, and the workers it forks.

`GraderPool` starts the server with `python -m` (never a fork of the trainer, which holds JAX
threads). The server imports and warms the grader once, then forks a worker for each request that
arrives on its stdin, a Unix socket, with the worker's two pipe ends attached: a new worker is
ready in milliseconds, so killing workers costs little, and every worker starts from the same
state. The server exits when the pool closes its socket.

A worker reads JSON lines {"id", "response", "refs", "template"} and answers each with {"id",
"ok", "reason", "extracted", "cpu"}: every step that reads model text (extraction included) runs
here, under a CPU-time budget (ITIMER_PROF), and any failure is a 0 with its reason. "cpu" is the
worker's CPU time after the row, which the pool uses to bound a row stuck in C code.
"""

import gc
import json
import os
import resource
import signal
import socket
import sys
import time

from r1zero_jax.rewards import math_grader
from r1zero_jax.rewards.extract import extract_answer
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


def grade_row(task: dict, cpu_budget_s: float) -> dict:
    """The verdict on one row, within `cpu_budget_s` of CPU time. Raises nothing but a CpuTimeout
    that fires while an error is being handled (the caller answers that row as a timeout)."""
    extracted, ok, reason = None, False, "no answer"
    signal.setitimer(signal.ITIMER_PROF, cpu_budget_s)
    try:
        extracted = extract_answer(task["response"], task["template"])
        if extracted is not None:
            ok, reason = math_grader.judge(extracted, task["refs"])
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
    return {"id": task["id"], "ok": bool(ok), "reason": reason, "extracted": extracted,
            "cpu": time.process_time()}


def _serve(rfd: int, wfd: int, cpu_budget_s: float) -> None:
    out = os.fdopen(wfd, "wb", buffering=0)
    ready = {"ready": True, "pid": os.getpid(), "cpu": time.process_time()}
    out.write((json.dumps(ready) + "\n").encode())
    for line in os.fdopen(rfd, "rb"):
        try:
            task = json.loads(line)
        except ValueError:
            continue  # the pool writes whole lines; a torn one cannot be answered by id
        try:
            reply = grade_row(task, cpu_budget_s)
        except CpuTimeout:  # the timer fired while grade_row was already handling an error
            reply = {"id": task["id"], "ok": False, "reason": "timeout", "extracted": None,
                     "cpu": time.process_time()}
        out.write((json.dumps(reply) + "\n").encode())


def _fork_worker(sock: socket.socket, fds: list[int], cpu_budget_s: float) -> None:
    try:
        pid = os.fork()
    except OSError:
        pid = -1  # the pool sees the pipes close and counts a failed start
    if pid == 0:
        code = 1
        try:
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _serve(fds[0], fds[1], cpu_budget_s)
            code = 0
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)


def main() -> None:
    cpu_budget_s = float(sys.argv[1])
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):
        pass  # a lower hard limit is already in place
    signal.signal(signal.SIGPROF, _on_cpu_timer)
    for response, refs in _WARM_UP:
        grade_row({"id": 0, "response": response, "refs": refs, "template": "qwen_math"}, 60.0)
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
            _fork_worker(sock, fds, cpu_budget_s)
        else:
            for fd in fds:
                os.close(fd)


if __name__ == "__main__":
    main()
