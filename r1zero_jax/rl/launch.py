"""`r1zero-jax train`: read the config, set up devices before JAX starts, run the trainer."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from r1zero_jax.config import config_name, load_config, to_dict


def default_workdir(config: str) -> str:
    return os.path.join("runs", f"{config_name(config)}-{time.strftime('%Y%m%d-%H%M%S')}")


def request_cpu_devices(count: int, num_processes: int = 1) -> None:
    """Ask XLA for `count` virtual CPU devices in total (split over the local processes).

    Only effective before JAX initialises its backends, hence before `import jax` here."""
    if count % num_processes:
        raise ValueError(f"mesh.num_cpu_devices={count} cannot be split over {num_processes} processes")
    per_process = count // num_processes
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={per_process}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def train_cli(config: str, overrides=(), workdir: str | None = None, steps: int | None = None,
              allow_config_change: bool = False, coordinator: str | None = None,
              num_processes: int | None = None, process_id: int | None = None) -> int:
    cfg = load_config(config, list(overrides))
    if steps is not None:
        if steps < 0:
            raise ValueError(f"--steps must be >= 0, got {steps}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    nproc = num_processes or 1
    if cfg.mesh.num_cpu_devices:
        if "jax" in sys.modules:
            print("note: JAX already imported; mesh.num_cpu_devices applies only to a fresh process",
                  file=sys.stderr)
        else:
            request_cpu_devices(cfg.mesh.num_cpu_devices, nproc)

    import jax

    if coordinator or nproc > 1:
        if cfg.mesh.num_cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)

    from r1zero_jax.rl.trainer import Trainer

    workdir = workdir or default_workdir(config)
    trainer = Trainer(cfg, workdir, allow_config_change=allow_config_change)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(to_dict(trainer.cfg), f, indent=2)
        print(f"train {cfg.name}: {jax.device_count()} {jax.devices()[0].platform} devices, "
              f"mesh {dict(trainer.mesh.shape)}, run directory {workdir}", flush=True)
    trainer.run()
    if jax.process_index() == 0:
        print(f"wrote {os.path.join(workdir, 'summary.json')} and curves.png", flush=True)
    return 0
