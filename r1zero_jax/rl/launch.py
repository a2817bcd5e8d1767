"""`r1zero-jax train`: read the config, set up devices before JAX starts, run the trainer."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

from r1zero_jax import paths
from r1zero_jax.config import config_name, load_config, to_dict


def default_workdir(config: str) -> str:
    return os.path.join("runs", f"{config_name(config)}-{time.strftime('%Y%m%d-%H%M%S')}")


def request_cpu_devices(count: int, num_processes: int = 1) -> None:
    """Ask XLA for `count` virtual CPU devices in total, before JAX starts (notebooks)."""
    from r1zero_jax import distributed

    distributed.set_cpu_device_count(distributed.split_virtual_devices(count, num_processes))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def train_cli(config: str, overrides=(), workdir: str | None = None, steps: int | None = None,
              allow_config_change: bool = False, coordinator: str | None = None,
              num_processes: int | None = None, process_id: int | None = None) -> int:
    cfg = load_config(config, list(overrides))
    if steps is not None:
        if steps < 0:
            raise ValueError(f"--steps must be >= 0, got {steps}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    from r1zero_jax import distributed

    if "jax" in sys.modules and cfg.mesh.num_cpu_devices:
        print("note: JAX already imported; mesh.num_cpu_devices applies only to a fresh process",
              file=sys.stderr)
    try:
        distributed.initialize(coordinator, num_processes, process_id,
                               cpu_devices=cfg.mesh.num_cpu_devices)
    except RuntimeError as e:  # a backend already started in this process (notebooks, tests)
        print(f"note: {e}", file=sys.stderr)

    import jax

    from r1zero_jax.rl.trainer import Trainer

    workdir = workdir or default_workdir(config)
    # The command line also turns Ctrl-C into a checkpointed stop (at once before the first step).
    trainer = Trainer(cfg, workdir, allow_config_change=allow_config_change,
                      stop_signals=(signal.SIGTERM, signal.SIGINT))
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, "config.json"),
                         json.dumps(to_dict(trainer.cfg), indent=2))
        print(f"train {cfg.name}: {jax.device_count()} {jax.devices()[0].platform} devices, "
              f"mesh {dict(trainer.mesh.shape)}, run directory {workdir}", flush=True)
    trainer.run()
    if jax.process_index() == 0:
        print(f"wrote {paths.join(workdir, 'summary.json')} and curves.png", flush=True)
    return 0
