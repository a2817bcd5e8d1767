"""SIGTERM / SIGINT before the first step finishes: nothing new to save, so `train` stops within
seconds with exit code 75 and releases the run directory (checkpoint.PreemptionGuard)."""

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(workdir):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "r1zero_jax.cli", "train",
         os.path.join(ROOT, "configs", "cpu_smoke.py"), "--workdir", str(workdir),
         "--set", "log.tensorboard=False", "--set", "log.plot=False"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_setup(proc, workdir) -> list[str]:
    """Lines up to the one printed once the trainer has loaded its model and holds the run
    directory; the supervised warm-up, first compiles and rollout (minutes) follow."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("train cpu_smoke:"):
            break
    assert (workdir / "run.lock").exists(), "".join(lines)
    return lines


def test_stop_signals_during_setup_exit_75_at_once(tmp_path):
    signums = (signal.SIGTERM, signal.SIGINT)
    workdirs = [tmp_path / s.name for s in signums]
    procs = [_start(w) for w in workdirs]  # side by side: one start-up's wait for both
    try:
        lines = [_wait_for_setup(p, w) for p, w in zip(procs, workdirs, strict=False)]
        time.sleep(1.0)
        for proc, signum, out, workdir in zip(procs, signums, lines, workdirs, strict=False):
            t0 = time.monotonic()
            proc.send_signal(signum)
            rc = proc.wait(timeout=30)
            took = time.monotonic() - t0
            text = "".join(out) + proc.stdout.read()
            assert rc == 75, text
            assert took < 10, f"{signum.name}: {took:.1f}s to stop"
            assert "nothing new to save yet" in text and "exit code 75" in text
            assert not (workdir / "run.lock").exists()  # the next run may start at once
            assert not (workdir / "checkpoints" / "1").exists()
    finally:
        for proc in procs:
            proc.kill()
