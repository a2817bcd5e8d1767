"""Greedy evaluation in a two-process run (2 x 4 CPU devices): it used to crash right after the
warm-up placing the sampler's key on a mesh spanning both processes."""

import json
import os
import subprocess
import sys

from test_multihost import ROOT, _free_port

ARGS = ["train", "cpu_smoke", "--steps", "1", "--set", "train.warmup_sft_steps=5",
        "--set", "train.warmup_sft_habit_steps=2", "--set", "eval.size=8",
        "--set", "eval.batch_size=8",
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
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert 0 <= summary["eval_accuracy_before"] <= 1 and 0 <= summary["eval_accuracy_after"] <= 1
    # Process 0 reports; process 1 evaluates its part silently.
    assert logs[0].count("eval: greedy accuracy") == 2 and "eval: greedy" not in logs[1]


def test_eval_command_on_two_processes_matches_one(tmp_path, qwen_tokenizer_dir):
    """`r1zero-jax eval` over 2 processes x 4 CPU devices: each samples its share of a batch on
    the global mesh and grades its share of the responses; process 0 alone writes, and the
    records equal a one-process run's."""
    import shutil

    from hf_models import make_hf_model

    from r1zero_jax import cli

    model = tmp_path / "model"
    make_hf_model(str(model), vocab=151680, hidden=16, inter=32, layers=1, heads=2, kv_heads=1,
                  tie=True)
    for f in os.listdir(qwen_tokenizer_dir):
        shutil.copy(os.path.join(qwen_tokenizer_dir, f), model)
    data = tmp_path / "data"
    data.mkdir()
    problems = ["What is 2+3?", "Solve x+1=4.", "Compute 7*6.", "What is 10-4?", "Find 3^2.",
                "What is 1/2+1/2?"]
    (data / "math500.jsonl").write_text("".join(
        json.dumps({"problem": p, "answer": str(i)}) + "\n" for i, p in enumerate(problems)))
    args = ["eval", "--model", str(model), "--data-dir", str(data), "--benchmarks", "math500",
            "--max-new-tokens", "6", "--dtype", "float32", "--batch-size", "4", "--workers", "1"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "one")]) == 0

    env = {k: v for k, v in os.environ.items() if not k.startswith("R1ZERO_")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "r1zero_jax.cli", *args, "--output-dir",
                               str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outs[i][1][-4000:]}"
    assert "MATH500" in outs[0][0] and "MATH500" not in outs[1][0]  # process 0 reports
    assert "ETA" not in outs[1][1]

    def records(d):
        return [{k: r[k] for k in ("index", "response", "length", "finish_reason", "correct",
                                   "extracted")}
                for r in map(json.loads,
                             (tmp_path / d / "generations.jsonl").read_text().splitlines())]

    assert len(records("two")) == len(problems) and records("two") == records("one")
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["benchmarks"] == one["benchmarks"]
