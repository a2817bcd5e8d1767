"""One trainer per run directory: the lease lock (local and on the GCS emulator), and two real
trainers started on one workdir."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from r1zero_jax import paths
from r1zero_jax.run_lock import LOCK_NAME, RunLock, RunLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_emulator").gs(f"lock-{uuid.uuid4().hex[:8]}")


def _plant(workdir, **fields):
    """A lock file as another trainer would have left it."""
    holder = {"host": "other-host", "pid": 4242, "token": "theirs", "started": time.time() - 100,
              "heartbeat": time.time(), "lease_s": 60.0, **fields}
    paths.write_text(paths.join(workdir, LOCK_NAME), json.dumps(holder))


def test_second_holder_refused_naming_the_first_then_free_after_release(workdir):
    first = RunLock(workdir).acquire()
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match=rf"in use by host '{socket.gethostname()}' "
                                                 rf"pid {os.getpid()}"):
            RunLock(workdir).acquire()
        assert time.monotonic() - t0 < 10
        first.check()  # still ours
    finally:
        first.release()
    assert not paths.exists(paths.join(workdir, LOCK_NAME))
    RunLock(workdir).acquire().release()


def test_live_holder_elsewhere_refused(workdir):
    _plant(workdir)
    with pytest.raises(RunLockedError, match="host 'other-host' pid 4242"):
        RunLock(workdir).acquire()


@pytest.mark.parametrize("holder,reason", [
    ({"heartbeat": time.time() - 600}, "its lease expired"),
    ({"host": socket.gethostname(), "pid": 2**22 + 7}, "no longer running"),
])
def test_stale_lock_taken_over_with_a_message(workdir, holder, reason):
    _plant(workdir, **holder)
    said = []
    lock = RunLock(workdir, printer=lambda *a, **k: said.append(" ".join(map(str, a)))).acquire()
    try:
        assert len(said) == 1 and "taking over the lock" in said[0] and reason in said[0], said
        stored = json.loads(paths.read_text(paths.join(workdir, LOCK_NAME)))
        assert stored["token"] == lock.token and stored["pid"] == os.getpid()
    finally:
        lock.release()


def test_heartbeat_renews_and_a_holder_whose_lease_was_taken_stops(tmp_path):
    wd = str(tmp_path / "run")
    lock = RunLock(wd, lease_s=0.4).acquire()
    try:
        path = paths.join(wd, LOCK_NAME)
        first = json.loads(paths.read_text(path))["heartbeat"]
        time.sleep(0.5)
        assert json.loads(paths.read_text(path))["heartbeat"] > first  # renewed
        _plant(wd)  # another trainer took it over (as after our lease lapsed)
        deadline = time.monotonic() + 5
        while lock._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RunLockedError, match="lost the lock .* host 'other-host' pid 4242"):
            lock.check()
    finally:
        lock.release()
    # Not ours any more: release leaves the new holder's lock alone.
    assert json.loads(paths.read_text(paths.join(wd, LOCK_NAME)))["token"] == "theirs"


def _train_cmd(workdir, *extra):
    from test_trainer import TINY

    sets = [a for s in TINY for a in ("--set", s)]
    return [sys.executable, "-m", "r1zero_jax.cli", "train", "cpu_smoke", "--workdir", workdir,
            *sets, *extra]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def test_two_trainers_on_one_workdir(tmp_path):
    wd = str(tmp_path / "run")
    first = subprocess.Popen(_train_cmd(wd, "--steps", "3"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(wd, LOCK_NAME)) and time.monotonic() < deadline:
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.1)
        t0 = time.monotonic()
        second = subprocess.run(_train_cmd(wd, "--steps", "3"), capture_output=True, text=True,
                                env=_env(), timeout=60)
        refused_after = time.monotonic() - t0
        out, _ = first.communicate(timeout=400)
    finally:
        first.kill()
    print(f"second trainer refused after {refused_after:.1f} s")
    assert second.returncode == 2, second.stderr
    assert f"in use by host '{socket.gethostname()}' pid {first.pid}" in second.stderr
    assert refused_after < 10, refused_after
    assert first.returncode == 0, out
    rows = [json.loads(line) for line in Path(wd, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not os.path.exists(os.path.join(wd, LOCK_NAME))  # released at the end
