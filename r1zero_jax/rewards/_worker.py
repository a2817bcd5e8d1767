"""Grader worker process: JSON lines in on stdin ({"id", "pred", "refs"}), {"id", "ok"} out.

Started by `GraderPool` with `python -m`, so it imports neither the trainer's `__main__` nor JAX;
the parent kills it when a call runs past the timeout.
"""

import json
import resource
import sys

MEMORY_LIMIT_BYTES = 2 << 30  # a runaway sympy computation raises MemoryError instead of swapping


def main() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):
        pass  # a lower hard limit is already in place
    from r1zero_jax.rewards.math_grader import is_equiv

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        task = json.loads(line)
        try:
            ok = is_equiv(task["pred"], task["refs"])
        except Exception:  # noqa: BLE001 - any failure on hostile input is reward 0
            ok = False
        out.write(json.dumps({"id": task["id"], "ok": bool(ok)}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
