"""Length-bias toy, GRPO side: configs/toy_dr_grpo.py with `rl.loss="grpo"` (std-normalised
advantages, each response's token losses averaged over its own length). Nothing else differs."""

import dataclasses
import importlib.util
from pathlib import Path

from r1zero_jax.config import RunConfig

_spec = importlib.util.spec_from_file_location("_toy_dr_grpo",
                                               Path(__file__).with_name("toy_dr_grpo.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def config() -> RunConfig:
    cfg = _base.config()
    return dataclasses.replace(cfg, name="toy_grpo", rl=dataclasses.replace(cfg.rl, loss="grpo"))
