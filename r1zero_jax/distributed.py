"""Multi-host start-up: one JAX process per host (TPU VM worker), or several local CPU processes.

On a Cloud TPU VM `jax.distributed.initialize()` finds the coordinator, the process count and
this worker's id by itself. Elsewhere they come from the arguments or, when an argument is None,
from the environment variables below (all three or none). A CPU run that asks for N virtual
devices gets N / num_processes of them in each process, with gloo collectives between processes.

Call `initialize` before anything touches a JAX backend (`jax.devices()`, an array, a jit): the
device count and the distributed client are fixed when the first backend starts.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys

ENV_COORDINATOR = "R1ZERO_COORDINATOR"  # HOST:PORT of process 0
ENV_NUM_PROCESSES = "R1ZERO_NUM_PROCESSES"
ENV_PROCESS_ID = "R1ZERO_PROCESS_ID"

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Virtual CPU devices meet at every collective; XLA:CPU aborts the process when one arrives 40 s
# after its stuck warning (20 s), which a loaded 2-core machine reaches on a real-vocabulary
# forward pass. One hour instead, for the local rendezvous and across processes (gloo).
CPU_COLLECTIVE_TIMEOUT_FLAGS = {"--xla_cpu_collective_call_terminate_timeout_seconds": 3600,
                                "--xla_cpu_collective_timeout_seconds": 3600}
# PCI ids of TPU chips (vendor Google); the same table JAX uses to detect a Cloud TPU VM.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}  # v4, v5p, v5e, v6e, 7x


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """Where this process sits in a multi-process run."""

    coordinator: str  # HOST:PORT
    num_processes: int
    process_id: int


def _int_or_error(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve_process_spec(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, environ=None) -> ProcessSpec | None:
    """The explicit multi-process spec from arguments, else the R1ZERO_* environment, else None.

    Arguments win over the environment field by field. A partial spec (say a coordinator without
    a process id) is an error naming what is missing, never a silent single-process run.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _int_or_error(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _int_or_error(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"multi-process run needs --coordinator, --num-processes and --process-id (or "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
            f"missing {', '.join(missing)}")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    return ProcessSpec(coordinator, int(num_processes), int(process_id))


def split_virtual_devices(total: int, num_processes: int) -> int:
    """Virtual CPU devices per process when `total` are split evenly over `num_processes`."""
    if total < 1 or num_processes < 1:
        raise ValueError(f"need total >= 1 and num_processes >= 1, got {total} and {num_processes}")
    if total % num_processes:
        raise ValueError(f"{total} virtual CPU devices cannot be split evenly over "
                         f"{num_processes} processes; choose a total divisible by {num_processes}")
    return total // num_processes


def set_cpu_device_count(n: int) -> None:
    """Ask XLA for `n` virtual CPU devices in this process (replacing any earlier request), with
    the collective timeouts raised (CPU_COLLECTIVE_TIMEOUT_FLAGS).

    Works until the first backend starts; after that the count is fixed and this raises.
    """
    flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    flags += [f"{k}={v}" for k, v in CPU_COLLECTIVE_TIMEOUT_FLAGS.items()
              if not any(f.startswith(k + "=") for f in flags)]  # a user's own value wins
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={n}"])
    if "jax" in sys.modules:  # XLA_FLAGS may already have been read; the config option wins
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError as e:
            raise RuntimeError(f"cannot set {n} CPU devices: a JAX backend already started "
                               f"({e}); call this before any JAX computation") from None


def on_cloud_tpu_vm() -> bool:
    """True when TPU chips are attached to this machine (read from PCI, without starting JAX)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_devices: int = 0,
               timeout_s: int = 300) -> ProcessSpec | None:
    """Start this process's part of a multi-process run; returns its spec, None when alone.

    `cpu_devices` > 0: the run's total of virtual CPU devices (a CPU config's
    `mesh.num_cpu_devices`), split evenly over the processes. On a Cloud TPU VM without an
    explicit spec the TPU runtime supplies it.
    """
    spec = resolve_process_spec(coordinator, num_processes, process_id)
    if cpu_devices:
        set_cpu_device_count(split_virtual_devices(cpu_devices, spec.num_processes if spec else 1))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU config: no accelerator probing
    if spec is None:
        if cpu_devices or not on_cloud_tpu_vm():
            return None
        import jax

        jax.distributed.initialize(initialization_timeout=timeout_s)
        state = jax.distributed.global_state  # read without starting the backend
        return ProcessSpec(state.coordinator_address or "", state.num_processes or 1,
                           state.process_id or 0)
    import jax

    if spec.num_processes > 1:
        # gloo is JAX's default today; naming it keeps CPU runs working if the default moves.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=spec.coordinator,
                               num_processes=spec.num_processes, process_id=spec.process_id,
                               initialization_timeout=timeout_s)
    return spec


def is_main_process() -> bool:
    """Process 0 alone writes logs, metrics and plots (checkpoints are written by all)."""
    import jax

    return jax.process_index() == 0
