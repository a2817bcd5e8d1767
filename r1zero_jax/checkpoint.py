"""Checkpoints on Orbax (local or gs://), resume checks, and preemption handling.

A checkpoint step holds two Orbax items: `state`, a dict of pytrees of arrays (params,
optimizer state, typed `jax.random.key`s, step counters) saved sharded, and `meta`, a JSON
dict (resolved config, data-pipeline position, anything else a resumed run needs). Orbax
writes each step to a temporary place and commits it atomically (rename locally, a commit file
on GCS), so a process killed mid-save leaves the previous step restorable; the partial one is
deleted when the next `Checkpointer` opens the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from r1zero_jax import paths  # first: sets the GCS environment before gcsfs/etils load

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_lib  # noqa: E402
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_lib  # noqa: E402
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # noqa: E402

log = logging.getLogger(__name__)

# Orbax builds every tensorstore context from these dicts; give them the GCS deadline policy's
# retries (paths.py sets tensorstore's connect and stall timeouts).
for _context in (_ts_utils._BASE_TS_CONTEXT, _ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
    _context.setdefault("gcs_request_retries", paths.TENSORSTORE_GCS_RETRIES)

# Markers of a storage fault (endpoint down or stalled, credentials) in tensorstore's and the
# HTTP clients' errors, as opposed to a damaged checkpoint (NOT_FOUND, OUT_OF_RANGE, DATA_LOSS).
_STORAGE_FAULTS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED",
                   "Timeout", "timed out", "did not complete", "Connection", "connect")


def _storage_fault(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, paths.GcsError) or any(m in str(e) or m in type(e).__name__
                                                 for m in _STORAGE_FAULTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(e: BaseException) -> bool:
    # tensorstore reports ENOSPC inside a ValueError's text ("No space left on device").
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."

STATE = "state"
META = "meta"

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". Distinct from
# 143 (128+SIGTERM, what a process killed by SIGTERM reports) so a scheduler or wrapper script
# can tell "checkpointed and exited on request, restart me" from "killed".
PREEMPTED_EXIT_CODE = 75


def _abspath(directory: str) -> str:
    return directory if paths.is_gcs(directory) else os.path.abspath(directory)


def _check_json(meta: Mapping[str, Any]) -> None:
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint meta must be plain JSON (dicts, lists, str, int, float, bool, None); "
            f"convert numpy/jax values first: {e}"
        ) from e


def _preservation(keep_last: int, keep_every: int | None) -> keep_lib.PreservationPolicy:
    latest = keep_lib.LatestN(n=keep_last)
    if keep_every is None:
        return latest
    return keep_lib.AnyPreservationPolicy([latest, keep_lib.EveryNSteps(interval_steps=keep_every)])


class Checkpointer:
    """Saves and restores `(state, meta)` every `save_every` steps under `directory`.

    Keeps the last `keep_last` steps plus every step divisible by `keep_every`. With
    `async_save`, `save` returns once arrays are copied off the devices and writes in the
    background; the next `save`, `wait` or `close` waits for it.
    """

    def __init__(
        self,
        directory: str,
        save_every: int,
        keep_last: int = 3,
        keep_every: int | None = None,
        async_save: bool = True,
        save_concurrent_gb: float = 96,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be None or >= 1, got {keep_every}")
        self.directory = _abspath(directory)
        paths.check_gcs_bucket(self.directory)
        with self._storage("open"):
            self._open(save_every, keep_last, keep_every, async_save, save_concurrent_gb)

    def _open(self, save_every: int, keep_last: int, keep_every: int | None,
              async_save: bool, save_concurrent_gb: float) -> None:
        options = ocp.CheckpointManagerOptions(
            # Preemption and end-of-run saves come from the trainer with force=True; on a pod
            # PreemptionGuard.should_stop already agrees on the step across hosts.
            save_decision_policy=save_lib.FixedIntervalPolicy(save_every),
            preservation_policy=_preservation(keep_last, keep_every),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                # bytes Orbax copies off the arrays at once (Orbax's default: 96 GB)
                STATE: ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
                META: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    @contextlib.contextmanager
    def _storage(self, op: str):
        """Storage faults on gs:// become the GCS policy's GcsError, naming the bucket."""
        t0 = time.monotonic()
        try:
            yield
        except paths.GcsError:
            raise
        except Exception as e:
            if _disk_full(e):
                kept = sorted(self._manager.all_steps()) if hasattr(self, "_manager") else []
                raise paths.StorageError(
                    f"checkpoint {op} in {self.directory} failed: no space left on the device; "
                    "free space there and rerun the same command: it resumes from the last "
                    f"complete checkpoint (complete steps: {kept})") from e
            if paths.is_gcs(self.directory) and _storage_fault(e):
                raise paths.gcs_error(f"checkpoint {op}", self.directory, _first_line(e),
                                      time.monotonic() - t0) from e
            raise

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        with self._storage("listing"):
            return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        with self._storage("listing"):
            return sorted(self._manager.all_steps())

    def save(
        self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any], force: bool = False
    ) -> bool:
        """Starts saving `state` (dict of pytrees of arrays) and `meta` (JSON dict) as `step`.

        Without `force`, only steps divisible by `save_every` are saved. A step that already
        exists is never overwritten. Returns whether a save was started.
        """
        if not isinstance(state, Mapping) or not state:
            raise ValueError("state must be a non-empty dict of pytrees, e.g. {'params': ...}")
        _check_json(meta)
        if step in self.all_steps():
            return False
        with self._storage(f"save of step {step}"):
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(dict(state)),
                                           META: ocp.args.JsonSave(dict(meta))}),
                force=force,
            )
        if saved:
            log.info("checkpoint step %d started in %s", step, self.directory)
        return saved

    def _candidate_steps(self, step: int | None) -> list[int]:
        """[step], or every complete step newest first when `step` is None."""
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[::-1]
        if step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not in {self.directory}; "
                                    f"steps: {steps}")
        return [step]

    def _newest_readable(self, step: int | None, args: ocp.args.Composite) -> tuple[int, dict]:
        """Restores `step`, or without one the newest step that reads back whole.

        A damaged step (a file truncated or deleted after its commit) is reported, deleted so
        the resumed run can save that step again, and the previous one tried. Storage faults
        (endpoint down, permissions) are raised: an older step is no answer to them.
        """
        candidates = self._candidate_steps(step)
        first_error = None
        for s in candidates:
            try:
                with self._storage(f"restore of step {s}"):
                    return s, self._manager.restore(s, args=args)
            except paths.GcsError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged step; tried the next
                if step is not None:
                    raise
                first_error = first_error or e
                msg = (f"checkpoint step {s} in {self.directory} is unreadable "
                       f"({_first_line(e)}); skipping it")
                log.warning(msg)
                print(f"warning: {msg}", flush=True)
        raise ValueError(f"no readable checkpoint in {self.directory} (steps {sorted(candidates)} "
                         f"all failed; the newest: {_first_line(first_error)})") from first_error

    def _drop_newer(self, step: int) -> None:
        for s in self.all_steps():
            if s > step:
                with self._storage(f"deletion of unreadable step {s}"):
                    self._manager.delete(s)
                print(f"deleted unreadable checkpoint step {s}; continuing from step {step}",
                      flush=True)

    def restore(
        self, step: int | None = None, *, abstract_state: Mapping[str, Any]
    ) -> tuple[dict, dict]:
        """Restores `(state, meta)` of `step`; without a step, of the newest step that reads
        back whole (damaged newer steps are named, skipped and deleted).

        `abstract_state` has the structure of the saved state, with `jax.ShapeDtypeStruct`
        leaves whose `.sharding` says where each array goes: a different mesh than at save
        time reshards on load. Raises FileNotFoundError when there is nothing to restore.
        """
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(dict(abstract_state)),
                                     META: ocp.args.JsonRestore()})
        restored, out = self._newest_readable(step, args)
        if step is None:
            self._drop_newer(restored)
        return dict(out[STATE]), dict(out[META])

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON meta of `step` (default: the newest readable) without touching the arrays:
        check the config before building the abstract state it determines."""
        _, out = self._newest_readable(step, ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(out[META])

    def wait(self) -> None:
        """Blocks until the background save (if any) is committed."""
        with self._storage("save (background)"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._storage("close"):
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_step_dir(path: str) -> tuple[str, int | None]:
    """`.../run/ckpt/120` -> (`.../run/ckpt`, 120); a root directory -> (root, None)."""
    path = _abspath(path.rstrip("/"))
    name = path.rsplit("/", 1)[-1]
    if name.isdigit() and paths.exists(paths.join(path, STATE)):
        return path[: -len(name) - 1], int(name)
    return path, None


def restore_params(path: str, abstract_params: Any | None = None, key: str = "params") -> Any:
    """Reads only `state[key]` of a checkpoint, for evaluation and conversion.

    `path` is a checkpoint directory (its latest step is used) or one step directory in it.
    With `abstract_params` (ShapeDtypeStruct leaves with shardings) arrays land sharded; without,
    they come back as host numpy arrays with the saved shapes and dtypes.
    """
    root, step = _split_step_dir(path)
    paths.check_gcs_bucket(root)
    manager = ocp.CheckpointManager(
        root,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {root}")
        saved = manager.item_metadata(step)[STATE]
        if key not in saved:
            raise KeyError(f"checkpoint {root}/{step} has no {key!r}; it holds {sorted(saved)}")
        given = abstract_params is not None
        if not given:
            abstract_params = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[key]
            )
            restore_args = jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract_params
            )
        else:
            _check_against_model(f"{root}/{step}", saved[key], abstract_params)
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        out = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.PyTreeRestore(
                        item={key: abstract_params},
                        restore_args={key: restore_args},
                        partial_restore=True,
                    )
                }
            ),
        )
        return out[STATE][key] if given else _int_keys(out[STATE][key])
    finally:
        manager.close()


def _check_against_model(where: str, saved: Any, abstract: Any) -> None:
    """Every saved array floating point with the model's shape: Orbax would otherwise cast
    integer arrays into the requested dtype without a word."""
    model = _flatten(abstract)
    for name, m in _flatten(saved).items():
        if name not in model:
            continue  # a missing or extra array is Orbax's own, clear, error
        want = model[name].shape
        if tuple(m.shape) != tuple(want):
            raise ValueError(f"{where}: array {name!r} has shape {tuple(m.shape)}, the model "
                             f"expects {tuple(want)}")
        if not jax.numpy.issubdtype(m.dtype, jax.numpy.floating):
            raise ValueError(f"{where}: array {name!r} has dtype {m.dtype}; model weights must "
                             "be floating point")


def _int_keys(tree: Any) -> Any:
    """Orbax metadata names every dict key as a string; our params use int layer keys."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for k, v in tree.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


_ABSENT = "<absent>"


def check_config_compatible(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    allow_change: bool = False,
    ignore: Iterable[str] = (),
) -> list[str]:
    """Compares a checkpoint's config with the current one, as nested JSON dicts.

    Returns the differences as `"dotted.key: old -> new"` lines. Raises ValueError listing
    them unless `allow_change`. Keys matching a pattern in `ignore` (fnmatch on the dotted
    key, or a dotted prefix: "train.steps", "*.total_steps", "logging") may change on resume.
    """
    ignore = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in ignore)

    old, new = _flatten(saved), _flatten(current)
    diffs = [
        f"{k}: {json.dumps(old.get(k, _ABSENT))} -> {json.dumps(new.get(k, _ABSENT))}"
        for k in sorted(old.keys() | new.keys())
        if not ignored(k) and old.get(k, _ABSENT) != new.get(k, _ABSENT)
    ]
    if diffs and not allow_change:
        raise ValueError(
            "the config differs from the one this checkpoint directory was started with:\n  "
            + "\n  ".join(diffs)
            + "\nuse the same config, a new directory, or allow the change explicitly"
        )
    return diffs


class PreemptionGuard:
    """Turns SIGTERM (TPU maintenance, spot preemption) into a flag the training loop polls.

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                guard.progressed()
                if guard.should_stop(step):
                    ckpt.save(step, state, meta, force=True); ckpt.wait()
                    sys.exit(PREEMPTED_EXIT_CODE)

    Until `progressed()` there is nothing new to save (loading, compiling, the first rollout):
    a signal then exits at once with PREEMPTED_EXIT_CODE, after `on_idle_exit` (say, releasing
    the run directory). A thread woken through `signal.set_wakeup_fd` does it, so the exit is
    prompt even while the main thread waits minutes inside one XLA call, where Python signal
    handlers do not run. A second signal also exits at once.

    Single process: a Python handler sets `.requested`; the previous handlers come back on exit.
    Multi-process (a pod): JAX's preemption service already owns SIGTERM and `should_stop(step)`
    asks it, so every host stops at the same step
    (`jax.experimental.multihost_utils.reached_preemption_sync_point`; all hosts must call it
    at every step). Must be entered on the main thread.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), on_idle_exit=None):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._event = threading.Event()
        self._multi_host = False
        self._idle = True
        self._on_idle_exit = on_idle_exit
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._watcher: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def progressed(self) -> None:
        """A step finished: from now on a signal stops the loop at a step's end, checkpointed."""
        self._idle = False

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self._event.set()
        if not self._idle:
            log.warning("received %s; will checkpoint and stop", signal.Signals(signum).name)

    def _watch(self, fd: int) -> None:
        seen = 0
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            signums = [b for b in data if b in self._signals]
            if not data or (not signums and self._wakeup is None):
                return  # closed by __exit__
            seen += len(signums)
            if signums and (self._idle or seen > 1):
                self._exit_now(signums[-1], second=not self._idle)

    def _exit_now(self, signum: int, second: bool) -> None:
        name = signal.Signals(signum).name
        why = "a second signal" if second else "nothing new to save yet"
        log.warning("received %s (%s): stopping now with exit code %d; rerun the same command "
                    "to resume", name, why, PREEMPTED_EXIT_CODE)
        try:
            if self._on_idle_exit is not None:
                self._on_idle_exit()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(PREEMPTED_EXIT_CODE)

    def should_stop(self, step: int) -> bool:
        """True when the loop should checkpoint `step` and exit with PREEMPTED_EXIT_CODE."""
        if self._multi_host:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self._event.set()
            except RuntimeError as e:
                raise RuntimeError(
                    "multi-process run without JAX's preemption service; keep "
                    "jax_enable_preemption_service on (the default) when calling "
                    f"jax.distributed.initialize: {e}"
                ) from e
        return self.requested

    def __enter__(self) -> PreemptionGuard:
        self._multi_host = jax.process_count() > 1
        if self._multi_host:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered on the main thread (signals)")
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        self._previous_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(r,), daemon=True,
                                         name="preemption-guard")
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            r, w = self._wakeup
            self._wakeup = None
            os.write(w, b"\0")  # wakes the watcher, which sees the guard closed
            self._watcher.join(timeout=5)
            os.close(r)
            os.close(w)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
