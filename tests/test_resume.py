"""Exact resume (local and gs:// on the emulator) and SIGTERM preemption of the trainer."""

import os
import signal

import jax
import numpy as np
import pytest

from r1zero_jax import checkpoint, paths
from r1zero_jax.convert import hf as conv
from r1zero_jax.rl.launch import train_cli
from r1zero_jax.rl.metrics import RunLogger, read_metrics
from test_trainer import TINY


def _train(workdir, steps, **kw):
    return train_cli("cpu_smoke", TINY, workdir=str(workdir), steps=steps, **kw)


def _metrics(workdir):
    """metrics.jsonl without the wall-clock figures, which differ between any two runs."""
    return [{k: v for k, v in row.items() if "time" not in k and "per_s" not in k}
            for row in read_metrics(paths.join(str(workdir), "metrics.jsonl"))]


def _params(workdir):
    return checkpoint.restore_params(paths.join(str(workdir), "checkpoints"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert _train(workdir, 2) == 0
    return _metrics(workdir), _params(workdir)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_stop_and_resume_equals_uninterrupted_run(where, uninterrupted, tmp_path, request):
    workdir = (request.getfixturevalue("gcs_emulator").gs("resume-run") if where == "gcs"
               else tmp_path / "run")
    assert _train(workdir, 1) == 0
    assert [r["step"] for r in _metrics(workdir)] == [1]
    assert _train(workdir, 2) == 0  # "--steps 2" on a resumed run: continue until step 2

    ref_metrics, ref_params = uninterrupted
    assert _metrics(workdir) == ref_metrics  # rewards, losses, lengths: identical
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(_params(workdir)), strict=True):
        np.testing.assert_array_equal(a, b)
    # The run's checkpoint directory is a model path (load_model / convert to-hf).
    assert conv.is_our_checkpoint(paths.join(str(workdir), "checkpoints"))


def test_sigterm_checkpoints_and_the_next_start_continues(gcs_emulator, monkeypatch, capsys):
    workdir = gcs_emulator.gs("preempted-run")
    log = RunLogger.log

    def log_then_preempt(self, metrics):
        log(self, metrics)
        if metrics["step"] == 1:  # what a TPU maintenance event sends
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    with pytest.raises(SystemExit) as exit_info:
        _train(workdir, 3)
    assert exit_info.value.code == checkpoint.PREEMPTED_EXIT_CODE
    with checkpoint.Checkpointer(paths.join(workdir, "checkpoints"), save_every=1) as ckpt:
        assert ckpt.all_steps() == [1]
    assert "preempted: checkpointed step 1" in capsys.readouterr().out

    monkeypatch.setattr(RunLogger, "log", log)
    assert _train(workdir, 3) == 0
    assert "resumed" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3]
