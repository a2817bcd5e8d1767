"""One trainer per run directory: a lease file (`WORKDIR/run.lock`, local or gs://).

The holder writes its host, pid and a heartbeat, renewed in a background thread. A second
trainer on the same directory is refused at once with the holder named. A lease whose heartbeat
is older than its term (the holder died or lost its storage), or whose holder is a dead process
on this host (kill -9, then resume), is taken over with a message.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid

from r1zero_jax import paths

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
LEASE_S = 60.0  # a holder that has not renewed for this long is presumed dead
RELEASE_S = 5.0  # the most that releasing may take; a lease left behind expires by itself


class RunLockedError(RuntimeError):
    """The run directory is held by another live trainer (named in the message)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    age = time.time() - holder.get("heartbeat", 0)
    return (f"host {holder.get('host')!r} pid {holder.get('pid')} (since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}, "
            f"lease renewed {age:.0f} s ago)")


class RunLock:
    """`acquire()` the lease on `workdir`, `check()` it at each step, `release()` at the end
    (also done at process exit)."""

    def __init__(self, workdir: str, lease_s: float = LEASE_S, printer=print):
        self.path = paths.join(workdir, LOCK_NAME)
        self.workdir = workdir
        self.lease_s = lease_s
        self.print = printer
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._lost: dict | None = None
        self._thread: threading.Thread | None = None
        self._started = time.time()

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "started": self._started, "heartbeat": time.time(),
                           "lease_s": self.lease_s}).encode()

    def _read(self) -> dict | None:
        try:
            holder = json.loads(paths.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: nobody can prove a live holder
            return {}
        return holder if isinstance(holder, dict) else {}

    def _stale_reason(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the lease, or None while it does."""
        if not holder:
            return "the lock file is unreadable"
        if holder.get("host") == socket.gethostname() \
                and not _pid_alive(int(holder.get("pid", -1))):
            return "that process is no longer running"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > float(holder.get("lease_s", LEASE_S)):
            return f"its lease expired {age:.0f} s after the last renewal"
        return None

    def acquire(self) -> RunLock:
        """Takes the lease or raises RunLockedError naming the live holder."""
        try:
            paths.write_bytes(self.path, self._record(), create_only=True)
        except FileExistsError:
            holder = self._read()
            if holder is not None:
                reason = self._stale_reason(holder)
                if reason is None:
                    raise RunLockedError(
                        f"run directory {self.workdir} is in use by {_describe(holder)}; stop that "
                        f"run or choose another --workdir (a dead holder's lock is taken over "
                        f"{holder.get('lease_s', LEASE_S):.0f} s after its last renewal)") from None
                self.print(f"taking over the lock on {self.workdir} from {_describe(holder)}: "
                           f"{reason}", flush=True)
            paths.write_bytes(self.path, self._record())
            # Two takers racing: the later write wins, and the earlier one sees it here.
            time.sleep(0.2)
            holder = self._read()
            if not holder or holder.get("token") != self.token:
                raise RunLockedError(f"run directory {self.workdir} was just taken by "
                                     f"{_describe(holder or {})}") from None
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run-lock")
        self._thread.start()
        atexit.register(self.release)
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                holder = self._read()
                if holder is None or holder.get("token") != self.token:
                    self._lost = holder or {}
                    return
                paths.write_bytes(self.path, self._record())
            except Exception as e:  # noqa: BLE001 - the training loop meets storage faults itself
                log.warning("could not renew the lock on %s: %s", self.workdir, e)

    def check(self) -> None:
        """Raises RunLockedError if another trainer took the lease over (ours had lapsed)."""
        if self._lost is not None:
            raise RunLockedError(f"lost the lock on {self.workdir} to {_describe(self._lost)}; "
                                 "stopping so two trainers never write one run directory")

    def release(self) -> None:
        """Stops renewing and deletes the lock file if it is still ours. Idempotent."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=RELEASE_S)
        self._thread = None
        atexit.unregister(self.release)

        def remove() -> None:
            try:
                holder = self._read()
                if holder and holder.get("token") == self.token:
                    paths.remove(self.path)
            except Exception as e:  # noqa: BLE001 - a lease left behind expires by itself
                log.warning("could not remove the lock on %s: %s", self.workdir, e)

        # Bounded: releasing on the way out of a storage fault must not add the fault's own
        # deadline to the time until the error is reported.
        worker = threading.Thread(target=remove, daemon=True, name="run-lock-release")
        worker.start()
        worker.join(timeout=RELEASE_S)
