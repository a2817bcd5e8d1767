"""A non-finite loss or gradient norm stops training with a clear message before that step is
checkpointed, leaving the last good checkpoint intact."""

import os

import pytest

from r1zero_jax.checkpoint import Checkpointer
from r1zero_jax.rl.launch import train_cli
from r1zero_jax.rl.trainer import Trainer
from test_trainer import TINY


def test_nan_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    wd = str(tmp_path / "run")
    learn = Trainer._learn

    def diverging_learn(self, state, ref_params, rollout, rewards, i, *args):
        m, state = learn(self, state, ref_params, rollout, rewards, i, *args)
        if i == 1:  # the second step diverges, as an overflowing update would make it
            m["loss"] = float("nan")
        return m, state

    monkeypatch.setattr(Trainer, "_learn", diverging_learn)
    with pytest.raises(ValueError, match=r"step 2: loss=nan is not finite; stopped without "
                                         r"checkpointing it \(the last checkpoint in .* "
                                         r"is intact\)"):
        train_cli("cpu_smoke", TINY, workdir=wd, steps=3)
    with Checkpointer(os.path.join(wd, "checkpoints"), save_every=1) as ckpt:
        assert ckpt.all_steps() == [1]
    assert not os.path.exists(os.path.join(wd, "run.lock"))  # released on the way out
