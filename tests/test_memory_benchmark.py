"""benchmarks/memory.py end to end on a real-vocabulary model (2 of Qwen2.5-0.5B's 24 layers,
the real Qwen2.5 tokenizer): plan, train --steps 2, eval --limit 4, convert both ways. Slow
(several minutes, a few GB of RAM); the full 24-layer figures are in BENCHMARKS.md."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


@pytest.mark.slow
def test_memory_benchmark_real_vocab(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "memory.py"), "--layers", "2",
         "--max-new-tokens", "16", "--workdir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    phases = report["phases"]
    assert all(p["exit"] == 0 for p in phases.values()), phases
    assert report["plan_num_params"] == 136_134_656 + 2 * 14_912_384 + 896  # embed + 2 layers
    train = phases["train"]["peak_rss_bytes"]
    assert train <= 12 * GB
    assert abs(train - report["plan_host_bytes"]) <= 0.25 * report["plan_host_bytes"], report
    names = [p["phase"] for p in report["train_phases"]]
    for want in ("load (model, tokenizer, data)", "step 1 rollout", "step 2 old log-probs",
                 "step 2 learner step", "final save"):
        assert want in names
    # the converted-back checkpoint and the eval read the run's own tokenizer files
    assert os.path.exists(tmp_path / "hf_out" / "tokenizer.json")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["benchmarks"]["math500"]["n"] == 4
