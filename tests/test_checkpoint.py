"""Checkpoints: bit-exact round trips (local and a real GCS emulator), resharding on restore,
retention, kill -9 mid-save, config checks, bounded GCS errors, SIGTERM handling."""

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from r1zero_jax import paths
from r1zero_jax.checkpoint import (
    PREEMPTED_EXIT_CODE,
    Checkpointer,
    PreemptionGuard,
    check_config_compatible,
    restore_params,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = ("data", "fsdp", "tensor")


def mesh_of(data: int, fsdp: int, tensor: int) -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(data, fsdp, tensor), AXES)


def spec_for(x) -> P:
    """Matrices split rows over data*fsdp and columns over tensor; the rest replicated."""
    return P(("data", "fsdp"), "tensor") if np.ndim(x) == 2 else P()


def place(tree, mesh: Mesh):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_for(x))), tree)


def abstract(tree, mesh: Mesh):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_for(x))),
        tree,
    )


def make_state(seed: int, mesh: Mesh, rows: int = 64) -> dict:
    """A trainer-like state: params of mixed dtypes, AdamW state after one update, RNG key."""
    rng = np.random.default_rng(seed)
    params = {
        "embed": rng.standard_normal((rows, 16), dtype=np.float32),
        "layers": {i: {"w": rng.standard_normal((rows, 8)).astype(jnp.bfloat16),
                       "b": rng.standard_normal(8, dtype=np.float32)} for i in range(2)},
    }
    params = place(params, mesh)
    opt = optax.adamw(1e-2)
    opt_state = place(opt.init(params), mesh)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "rng": jax.random.key(seed),
            "step": jnp.asarray(seed, jnp.int32)}


def make_meta(step: int) -> dict:
    return {"config": {"model": "tiny", "optim": {"lr": 1e-2, "betas": [0.9, 0.999]}},
            "data": {"epoch": 0, "index": 8 * step}, "rng": [0, step]}


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                      np.asarray(y).reshape(-1).view(np.uint8))


@pytest.fixture(params=["local", "gcs"])
def ckpt_dir(request, tmp_path):
    """A fresh checkpoint directory, on local disk or in the GCS emulator."""
    if request.param == "local":
        return str(tmp_path / "ckpt")
    emulator = request.getfixturevalue("gcs_emulator")
    return emulator.gs(f"ckpt-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def mesh8():
    return mesh_of(8, 1, 1)


def test_round_trip_bit_exact_async(ckpt_dir, mesh8):
    state, meta = make_state(1, mesh8), make_meta(1)
    with Checkpointer(ckpt_dir, save_every=1, async_save=True) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(1, state, meta)
        ckpt.wait()
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.read_meta() == meta
        restored, restored_meta = ckpt.restore(abstract_state=abstract(state, mesh8))
    assert_bit_equal(restored, state)
    assert restored_meta == meta
    w = restored["params"]["embed"]
    assert w.sharding == NamedSharding(mesh8, spec_for(w))
    assert len(w.addressable_shards) == 8


def test_restore_onto_other_mesh_reshards(ckpt_dir, mesh8):
    state = make_state(2, mesh8)
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        ckpt.save(5, state, make_meta(5))
    mesh42 = mesh_of(1, 4, 2)
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        restored, _ = ckpt.restore(5, abstract_state=abstract(state, mesh42))
    assert_bit_equal(restored, state)
    w = restored["opt_state"][0].mu["embed"]
    assert w.sharding == NamedSharding(mesh42, P(("data", "fsdp"), "tensor"))
    # 64 rows over fsdp=4 and 16 columns over tensor=2: each device holds a (16, 8) block.
    assert {s.data.shape for s in w.addressable_shards} == {(16, 8)}


def test_restore_params_only(ckpt_dir, mesh8):
    state = make_state(3, mesh8)
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        ckpt.save(2, make_state(4, mesh8), make_meta(2))
        ckpt.save(3, state, make_meta(3))
    host = restore_params(ckpt_dir)  # the latest step, as numpy
    assert isinstance(host["embed"], np.ndarray)
    assert_bit_equal(host, jax.device_get(state["params"]))
    mesh42 = mesh_of(1, 4, 2)
    older = restore_params(paths.join(ckpt_dir, "2"), abstract(state["params"], mesh42))
    assert_bit_equal(older, make_state(4, mesh8)["params"])
    assert older["embed"].sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_interval_force_and_retention(tmp_path, mesh8):
    state = make_state(0, mesh8)
    with Checkpointer(str(tmp_path), save_every=2, keep_last=2, keep_every=4) as ckpt:
        started = [s for s in range(1, 12) if ckpt.save(s, state, make_meta(s))]
        assert started == [2, 4, 6, 8, 10]
        assert ckpt.save(11, state, make_meta(11), force=True)  # end of run / preemption
        assert not ckpt.save(11, state, make_meta(11), force=True)  # never overwritten
        ckpt.wait()
        # last two (10, 11) plus multiples of 4 (4, 8)
        assert ckpt.all_steps() == [4, 8, 10, 11]
    assert sorted(os.listdir(tmp_path)) == ["10", "11", "4", "8"]


def test_bad_input_errors(tmp_path, mesh8):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(str(tmp_path), save_every=0)
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
        with pytest.raises(ValueError, match="plain JSON"):
            ckpt.save(1, {"x": jnp.ones(2)}, {"rng": np.uint32(3)})
        ckpt.save(1, {"x": jnp.ones(2)}, {})
        with pytest.raises(FileNotFoundError, match="steps: \\[1\\]"):
            ckpt.restore(7, abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(KeyError, match="no 'params'"):
        restore_params(str(tmp_path))


# A process that saves step 1, then is SIGKILLed after writing step 2 but before committing it.
_KILLED_SAVER = r"""
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path[:0] = [{repo!r}, {tests!r}]
from r1zero_jax.checkpoint import Checkpointer
from orbax.checkpoint._src.path import atomicity
from test_checkpoint import make_state, make_meta, mesh_of

ckpt = Checkpointer(sys.argv[1], save_every=1)
mesh = mesh_of(8, 1, 1)
ckpt.save(1, make_state(1, mesh), make_meta(1))
ckpt.wait()

async def stall(self):
    print("FINALIZING", flush=True)
    time.sleep(600)

atomicity.AtomicRenameTemporaryPath.finalize = stall
atomicity.CommitFileTemporaryPath.finalize = stall
ckpt.save(2, make_state(2, mesh), make_meta(2))
time.sleep(600)
"""


def _child_env() -> dict:
    """Only STORAGE_EMULATOR_HOST: the child must derive the rest at import of paths.py."""
    env = dict(os.environ)
    for k in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "EPATH_USE_TF", "XLA_FLAGS"):
        env.pop(k, None)
    return env


def test_kill9_mid_save_keeps_previous_step(ckpt_dir, mesh8):
    code = _KILLED_SAVER.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    proc = subprocess.Popen([sys.executable, "-c", code, ckpt_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=_child_env(), text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "FINALIZING" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"saver exited early with {proc.returncode}"
        assert "FINALIZING" in line
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The uncommitted step 2 is on storage, written but not finalized.
    partial = [n for n in paths.listdir(ckpt_dir) if n != "1"]
    assert partial and all(n.startswith("2") for n in partial), paths.listdir(ckpt_dir)

    state1 = make_state(1, mesh8)
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(abstract_state=abstract(state1, mesh8))
        assert_bit_equal(restored, state1)
        assert meta == make_meta(1)
        assert [n for n in paths.listdir(ckpt_dir) if n.startswith("2")] == []  # cleaned up
        # The resumed run reaches step 2 again and can save it.
        assert ckpt.save(2, make_state(2, mesh8), make_meta(2))
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]


def test_config_check_lists_dotted_differences():
    saved = {"model": {"name": "qwen2.5-0.5b", "dtype": "bf16"},
             "train": {"steps": 100, "lr": 1e-6}, "seed": 1}
    current = {"model": {"name": "qwen2.5-0.5b", "dtype": "fp32"},
               "train": {"steps": 200, "lr": 1e-6}, "seed": 1, "new_field": True}
    with pytest.raises(ValueError) as err:
        check_config_compatible(saved, current, ignore=["train.steps"])
    msg = str(err.value)
    assert 'model.dtype: "bf16" -> "fp32"' in msg
    assert "new_field: \"<absent>\" -> true" in msg
    assert "train.steps" not in msg and "seed" not in msg
    assert check_config_compatible(saved, current, allow_change=True, ignore=["*.steps"]) == [
        'model.dtype: "bf16" -> "fp32"', 'new_field: "<absent>" -> true']
    assert check_config_compatible(saved, saved) == []
    assert check_config_compatible(saved, current, ignore=["model", "train.steps", "new_*"]) == []


def test_gcs_errors_are_clear_and_fast(gcs_emulator, monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="bucket 'no-such-bucket' does not exist"):
        Checkpointer("gs://no-such-bucket/run", save_every=1)
    with pytest.raises(ValueError, match="does not exist"):
        restore_params("gs://no-such-bucket/run")
    with socket_bound() as dead_port:  # bound but never accepting: nothing answers there
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{dead_port}")
        with pytest.raises(paths.GcsError, match="bucket .r1zero-test.* failed .*refused"):
            Checkpointer(gcs_emulator.gs("run"), save_every=1)
    with forbidding_server() as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        with pytest.raises(ValueError, match="permission denied on GCS bucket"):
            Checkpointer(gcs_emulator.gs("run"), save_every=1)
    assert time.monotonic() - t0 < 30


class socket_bound:
    """A loopback port that is bound and never listened on (connections are refused)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return self._sock.getsockname()[1]

    def __exit__(self, *exc):
        self._sock.close()


class forbidding_server:
    """An HTTP endpoint answering 403, as GCS does for a bucket the credentials cannot read."""

    class _Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (b'{"error": {"code": 403, '
                    b'"message": "caller does not have storage.objects.list"}}')
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    def __enter__(self) -> str:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def test_preemption_guard_sets_flag_and_restores_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("outer"))
    try:
        with PreemptionGuard() as guard:
            assert not guard.should_stop(0)
            guard.progressed()  # a step is done: a signal now waits for the step's checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not guard.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            assert guard.requested and guard.should_stop(1)
            assert seen == []  # the guard, not the outer handler, got it
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == ["outer"]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2, 128 + signal.SIGTERM, 128 + signal.SIGKILL)


def test_paths_local_and_gcs(gcs_emulator, tmp_path):
    for root in (str(tmp_path / "p"), gcs_emulator.gs(f"p-{uuid.uuid4().hex[:8]}")):
        f = paths.join(root, "sub", "config.json")
        assert not paths.exists(f) and paths.listdir(root) == []
        paths.write_text(f, '{"a": 1}')
        assert paths.exists(f) and paths.read_text(f) == '{"a": 1}'
        assert (paths.listdir(root) == ["sub"]
                and paths.listdir(paths.join(root, "sub")) == ["config.json"])
        assert paths.isdir(paths.join(root, "sub"))
        log = paths.join(root, "log.jsonl")
        paths.append_text(log, "x\n")
        paths.append_text(log, "y\n")
        assert paths.read_text(log) == "x\ny\n"
        if paths.is_gcs(root):
            with pytest.raises(ValueError, match="append mode is not supported on GCS"):
                paths.open_file(log, "a")
        paths.remove(f)
        assert not paths.exists(f)


# One of two JAX processes (4 CPU devices each) running a step loop under PreemptionGuard.
_POD_HOST = r"""
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, {repo!r})
import jax
jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
from r1zero_jax.checkpoint import PREEMPTED_EXIT_CODE, PreemptionGuard
with PreemptionGuard() as guard:
    print("READY", flush=True)
    for step in range(100_000):
        time.sleep(0.01 * (1 + int(sys.argv[1])))  # hosts run at different speeds
        if guard.should_stop(step):
            print("STOP", step, flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
"""


def test_preemption_on_two_hosts_stops_both_at_one_step():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = _child_env()
    hosts = [subprocess.Popen([sys.executable, "-c", _POD_HOST.format(repo=REPO), str(i), address],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
             for i in range(2)]
    try:
        for h in hosts:
            assert "READY" in h.stdout.readline()
        time.sleep(0.5)
        hosts[1].send_signal(signal.SIGTERM)  # only one host is told
        outs = [h.communicate(timeout=60)[0] for h in hosts]
    finally:
        for h in hosts:
            h.kill()
    assert [h.returncode for h in hosts] == [PREEMPTED_EXIT_CODE] * 2, outs
    stops = [[ln for ln in out.splitlines() if ln.startswith("STOP")] for out in outs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops


def _data_files(step_dir: str) -> list[str]:
    """The array data files (OCDBT `d/` blobs) of one saved step, local or gs://."""
    found = []
    for sub in ("state/d", "state/ocdbt.process_0/d"):
        base = paths.join(step_dir, *sub.split("/"))
        found += [paths.join(base, n) for n in paths.listdir(base)]
    assert found, step_dir
    return found


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_restore_falls_back_past_a_damaged_latest_step(ckpt_dir, mesh8, damage, capsys):
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        ckpt.save(1, make_state(1, mesh8), make_meta(1))
        ckpt.save(2, make_state(2, mesh8), make_meta(2))
        ckpt.wait()
    for f in _data_files(paths.join(ckpt_dir, "2")):
        if damage == "truncated":
            paths.write_bytes(f, paths.read_bytes(f)[:10])
        else:
            paths.remove(f)
    state1 = make_state(1, mesh8)
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        assert ckpt.latest_step() == 2  # committed, so only reading it shows the damage
        with pytest.raises(ValueError):  # an explicit step never falls back
            ckpt.restore(2, abstract_state=abstract(state1, mesh8))
        restored, meta = ckpt.restore(abstract_state=abstract(state1, mesh8))
        assert_bit_equal(restored, state1)
        assert meta == make_meta(1)
        out = capsys.readouterr().out
        assert f"checkpoint step 2 in {ckpt.directory} is unreadable" in out, out
        assert "deleted unreadable checkpoint step 2; continuing from step 1" in out, out
        # The resumed run can save step 2 again.
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, make_state(2, mesh8), make_meta(2))
        ckpt.wait()
    with Checkpointer(ckpt_dir, save_every=1) as ckpt:
        restored, _ = ckpt.restore(abstract_state=abstract(make_state(2, mesh8), mesh8))
    assert_bit_equal(restored, make_state(2, mesh8))


def test_restore_with_every_step_damaged_names_them(tmp_path, mesh8):
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.save(1, make_state(1, mesh8), make_meta(1))
        ckpt.wait()
    for f in _data_files(str(tmp_path / "1")):
        os.remove(f)
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        with pytest.raises(ValueError,
                           match=r"no readable checkpoint in .* \(steps \[1\] all failed"):
            ckpt.restore(abstract_state=abstract(make_state(1, mesh8), mesh8))
        assert ckpt.all_steps() == [1]  # nothing deleted when nothing could be restored
