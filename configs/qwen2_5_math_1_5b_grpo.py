"""The paper's GRPO baseline: the Dr. GRPO 1.5B recipe with the `grpo` loss (std-normalised
advantages, per-response length normalisation), for the paper's comparison."""

import dataclasses
import importlib.util
from pathlib import Path

from r1zero_jax.config import RunConfig

_spec = importlib.util.spec_from_file_location(
    "_dr_grpo_1_5b", Path(__file__).with_name("qwen2_5_math_1_5b_dr_grpo.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def config() -> RunConfig:
    cfg = _base.config()
    return dataclasses.replace(cfg, name="qwen2_5_math_1_5b_grpo",
                               rl=dataclasses.replace(cfg.rl, loss="grpo"))
