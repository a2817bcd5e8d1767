"""Greedy evaluation in a two-process run (2 x 4 CPU devices): it used to crash right after the
warm-up placing the sampler's key on a mesh spanning both processes."""

import json
import os
import subprocess
import sys

from test_multihost import ROOT, _free_port

ARGS = ["train", "cpu_smoke", "--steps", "1", "--set", "train.warmup_sft_steps=5",
        "--set", "train.warmup_sft_habit_steps=2", "--set", "eval.size=8", "--set", "eval.batch_size=8",
        "--set", "rl.rollout_batch_size=32", "--set", "train.minibatch_size=16",
        "--set", "sampling.max_new_tokens=24", "--set", "log.tensorboard=false",
        "--set", "log.plot=false"]


def test_two_processes_with_eval_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1ZERO_") and k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    port, wd = _free_port(), tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "r1zero_jax.cli", *ARGS, "--workdir", str(wd),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    summary = json.load(open(wd / "summary.json"))
    assert summary["num_processes"] == 2
    assert 0 <= summary["eval_accuracy_before"] <= 1 and 0 <= summary["eval_accuracy_after"] <= 1
    # Process 0 reports; process 1 evaluates its part silently.
    assert logs[0].count("eval: greedy accuracy") == 2 and "eval: greedy" not in logs[1]
