"""Multi-host through two local processes x 4 CPU devices, against one process x 8 devices.

This file is also the worker script: `python tests/test_multihost.py worker PORT PID OUT WAYS`,
and `python tests/test_multihost.py train RECORD ARGS...` runs `r1zero-jax train ARGS` recording
what the process tokenized and sampled.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r1zero_jax import distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "data=2,fsdp=2,tensor=2"
WORKER_TIMEOUT_S = 240


def _tiny_config():
    from r1zero_jax.models import QwenConfig

    return QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, size=(8, 12), dtype=np.int32)
    mask = np.ones((8, 12), bool)
    mask[::2, :3] = False  # left padding on half the rows
    return tokens, mask


def _tiny_model():
    from r1zero_jax.models.decoder import init_model
    from r1zero_jax.sharding import make_mesh

    mesh = make_mesh(MESH)
    return init_model(_tiny_config(), mesh, seed=3), mesh


# Six prompts of 3 to 13 tokens, 2 samples each: a process's 3 prompts fill its 2 batch shards
# only with a padding prompt, and its prompt width (8 or 16) is not the other's.
PROMPTS = [[(7 * i + j) % 100 + 1 for j in range(3 + 2 * i)] for i in range(6)]


# Ways to sample a rollout: static calls, continuous batching on the dense and the paged cache.
WAYS = {"static": dict(prompts_per_call=4), "continuous": dict(decode_slots=4),
        "paged": dict(decode_slots=4, page_size=4)}


def _generate(model, mesh, local: bool, ways, **kw):
    """{way: (tokens, logprobs, generated tokens)} of `PROMPTS`' rows for each of `ways`;
    local: this process's prompts in, its rows out."""
    from r1zero_jax.sampling.generation import generate
    from r1zero_jax.sampling.sampler import SamplingParams
    from r1zero_jax.sharding import data_slice

    index, count = data_slice(mesh) if local else (0, 1)
    share = len(PROMPTS) // count
    mine = PROMPTS[index * share:(index + 1) * share]
    out = {}
    for way in ways:
        r = generate(model, mine, SamplingParams(max_new_tokens=6, n=2), tokenizer=None,
                     mesh=mesh, seed=5, local=local, **{**WAYS[way], **kw})
        out[way] = (r.tokens, r.logprobs, r.report["generated_tokens"])
    return out


def _sharded_forward(model, mesh):
    """Logits [8,12,128] of a tiny Qwen2 sharded over data x fsdp x tensor = 2 x 2 x 2,
    plus the global sum of squared params (a cross-process reduction), gathered to host."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import multihost_utils

    from r1zero_jax.models.decoder import positions_from_mask
    from r1zero_jax.sharding import shard_batch

    tokens, mask = _batch()
    tokens, mask = shard_batch(mesh, tokens), shard_batch(mesh, mask)

    @nnx.jit
    def forward(model, tokens, mask):
        logits, _ = model(tokens, positions_from_mask(mask), mask)
        sq = sum(jnp.sum(p.astype(jnp.float32) ** 2)
                 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        return logits, sq

    logits, sq = forward(model, tokens, mask)
    logits = multihost_utils.process_allgather(logits, tiled=True)
    return np.asarray(logits), float(sq)


def _worker(port: str, pid: str, out: str, ways: str) -> None:
    spec = dist.initialize(f"127.0.0.1:{port}", 2, int(pid), cpu_devices=8, timeout_s=60)
    import jax

    assert spec is not None and jax.process_count() == 2, jax.process_count()
    assert jax.local_device_count() == 4 and jax.device_count() == 8, jax.devices()
    model, mesh = _tiny_model()
    logits, sq = _sharded_forward(model, mesh)
    np.save(f"{out}.{pid}.npy", logits)
    rows = _generate(model, mesh, local=True, ways=ways.split(","))
    np.savez(f"{out}.{pid}.rows.npz", **{f"{k}_{i}": np.asarray(v[i]) for k, v in rows.items()
                                         for i in range(3)})
    with open(f"{out}.{pid}.json", "w") as f:
        json.dump({"sq": sq, "process_index": jax.process_index(),
                   "main": dist.is_main_process()}, f)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs, timeout):
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"


def _two_workers(tmp_path, ways) -> str:
    port, out = _free_port(), str(tmp_path / "res")
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1ZERO_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(port), str(i), out,
                               ",".join(ways)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    _wait_all(procs, WORKER_TIMEOUT_S)
    return out


def _check_local_rows(out, model, mesh, ways) -> None:
    """Process-local sampling: each process got back its own prompts' rows (3 prompts x 2), and
    together they are one process's rollout of all six."""
    tokens, logprobs, generated = _generate(model, mesh, local=False, ways=("static",),
                                            prompts_per_call=0)["static"]
    parts = [np.load(f"{out}.{i}.rows.npz") for i in range(2)]
    for way in ways:
        assert all(p[f"{way}_0"].shape == (6, 6) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[f"{way}_0"] for p in parts]), tokens)
        np.testing.assert_allclose(np.concatenate([p[f"{way}_1"] for p in parts]), logprobs,
                                   rtol=1e-5, atol=1e-5)
        assert [int(p[f"{way}_2"]) for p in parts] == [generated] * 2  # every slice's tokens


def test_two_processes_match_one_process(tmp_path):
    """A sharded forward, and process-local sampling by static calls and continuous batching."""
    out = _two_workers(tmp_path, ("static", "continuous"))

    import jax

    assert jax.device_count() == 8 and jax.process_count() == 1
    model, mesh = _tiny_model()
    want_logits, want_sq = _sharded_forward(model, mesh)
    for i in range(2):
        got = np.load(f"{out}.{i}.npy")
        meta = json.loads(Path(f"{out}.{i}.json").read_text())
        assert meta["process_index"] == i and meta["main"] == (i == 0)
        np.testing.assert_allclose(got, want_logits, rtol=1e-5, atol=1e-5)
        assert meta["sq"] == pytest.approx(want_sq, rel=1e-6)
    assert np.abs(want_logits).max() > 0  # a real forward, not zeros

    _check_local_rows(out, model, mesh, ("static", "continuous"))


@pytest.mark.slow
def test_process_local_rows_through_the_paged_cache(tmp_path):
    out = _two_workers(tmp_path, ("paged",))
    _check_local_rows(out, *_tiny_model(), ("paged",))


SMOKE_ARGS = ["train", "cpu_smoke", "--steps", "2", "--set", "train.warmup_sft_steps=20",
              "--set", "eval.source=", "--set", "checkpoint.every=1", "--set",
              "log.tensorboard=false", "--set", "log.plot=false"]
NOT_COMPARED = ("time_", "gen_tokens_per_s")  # wall-clock figures


def _train(workdir, *extra, env):
    """`r1zero-jax train` of SMOKE_ARGS, recording to workdir/record.PID.json what the process
    tokenized and sampled."""
    return subprocess.Popen([sys.executable, __file__, "train", str(workdir / "record"),
                             *SMOKE_ARGS, "--workdir", str(workdir), *extra], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_recording(record: str, args: list[str]) -> None:
    from r1zero_jax import cli
    from r1zero_jax.data import pipeline
    from r1zero_jax.rl import trainer

    seen = {"encoded": [], "sampled": []}
    make_encoder, generate = pipeline.make_encoder, trainer.generate

    def recording_encoder(tokenizer):
        encode = make_encoder(tokenizer)
        return lambda texts: seen["encoded"].append(len(texts)) or encode(texts)

    def recording_generate(model, prompt_tokens, *a, **k):
        rollout = generate(model, prompt_tokens, *a, **k)
        seen["sampled"].append({"prompts": [list(map(int, p)) for p in prompt_tokens],
                                "rows": rollout.size})
        return rollout

    pipeline.make_encoder, trainer.generate = recording_encoder, recording_generate
    code = cli.main(args)
    import jax

    Path(f"{record}.{jax.process_index()}.json").write_text(json.dumps(seen))
    sys.exit(code)


def _metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)} for r in rows]


def test_cpu_smoke_two_processes_match_one_process(tmp_path):
    """`r1zero-jax train cpu_smoke` as 2 processes x 4 CPU devices and as 1 x 8: the same
    metrics (1e-5) and the same checkpoint; only process 0 writes metrics; each process
    tokenized and sampled only its half of every step's prompts. About 90 s."""
    from r1zero_jax.checkpoint import restore_params

    env = {k: v for k, v in os.environ.items() if not k.startswith("R1ZERO_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    one, two = tmp_path / "one", tmp_path / "two"
    _wait_all([_train(one, env=env)], timeout=900)
    port = _free_port()
    _wait_all([_train(two, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                      "--process-id", str(i), env=env) for i in range(2)], timeout=900)

    # Each process held its half of each step's 32 prompts, 16 x 8 rows came back to it, and it
    # tokenized its half of the rows' length check and its own prompts only.
    (alone,), pair = ([json.loads((d / f"record.{i}.json").read_text()) for i in range(n)]
                      for d, n in ((one, 1), (two, 2)))
    assert [len(s["prompts"]) for s in alone["sampled"]] == [32, 32]
    for step, whole in enumerate(alone["sampled"]):
        halves = [p["sampled"][step] for p in pair]
        assert [h["prompts"] for h in halves] == [whole["prompts"][:16], whole["prompts"][16:]]
        assert [h["rows"] for h in halves] == [16 * 8, 16 * 8] and whole["rows"] == 32 * 8
    rows = alone["encoded"][0]  # the length check: every row once, split over the processes
    assert alone["encoded"] == [rows, 32, 32]
    assert [p["encoded"] for p in pair] == [[-(-rows // 2), 16, 16], [rows // 2, 16, 16]]

    want, got = _metrics(one), _metrics(two)
    assert [r["step"] for r in got] == [1, 2] and want[0]["entropy"] > 0
    for w, g in zip(want, got, strict=False):
        assert w.keys() == g.keys()
        for k in w:
            if isinstance(w[k], float) and np.isnan(w[k]):
                assert np.isnan(g[k]), k
            elif k not in ("num_processes",):
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-5), k
    p1 = restore_params(str(one / "checkpoints"))
    p2 = restore_params(str(two / "checkpoints"))
    import jax

    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_rollout_that_does_not_split_over_the_processes_is_refused():
    """Checked in Trainer.__init__ right after the mesh, before any model work."""
    import dataclasses

    from r1zero_jax.config import load_config
    from r1zero_jax.rl.trainer import _check_slices

    cfg = load_config("cpu_smoke")
    _check_slices(cfg, 2)  # 32 prompts, whole rollout per call
    odd = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, rollout_batch_size=24))
    with pytest.raises(ValueError, match=r"rollout prompts .*=3 is not divisible by the 2 data "
                                         "slices"):
        _check_slices(odd, 2)
    _check_slices(odd, 1)
    calls = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling,
                                                                  prompts_per_call=3))
    with pytest.raises(ValueError, match="sampling.prompts_per_call=3 is not divisible"):
        _check_slices(calls, 2)


def test_data_slices_from_the_batch_shards_each_process_holds():
    from r1zero_jax.sharding import slices_of

    assert slices_of({0: {0, 1}, 1: {2, 3}}, 4, 2) == (0, 1)
    assert slices_of({0: {2, 3}, 1: {0, 1}}, 4, 2) == (1, 0)  # by the rows, not the process
    assert slices_of({0: {0, 1}, 1: {2, 3}, 2: {0, 1}, 3: {2, 3}}, 4, 4) == (0, 1, 0, 1)
    assert slices_of({0: {0}, 1: {0}}, 1, 2) == (0, 0)  # batch not split: one slice
    # no regular blocks: one slice, every process the whole batch
    assert slices_of({0: {0, 2}, 1: {1, 3}}, 4, 2) == (0, 0)
    assert slices_of({0: {0, 1, 2}, 1: {3}}, 4, 2) == (0, 0)
    assert slices_of({0: {0, 1}, 1: {1, 2}}, 3, 2) == (0, 0)
    assert slices_of({0: {0, 1}}, 2, 2) == (0, 0)  # process 1 holds no rows


def test_split_virtual_devices():
    assert dist.split_virtual_devices(8, 2) == 4
    assert dist.split_virtual_devices(8, 1) == 8
    with pytest.raises(ValueError, match="cannot be split evenly over 3"):
        dist.split_virtual_devices(8, 3)
    with pytest.raises(ValueError):
        dist.split_virtual_devices(0, 2)


def test_process_spec_from_args_and_env():
    assert dist.resolve_process_spec(environ={}) is None
    env = {dist.ENV_COORDINATOR: "10.0.0.2:1234", dist.ENV_NUM_PROCESSES: "4",
           dist.ENV_PROCESS_ID: "3"}
    assert dist.resolve_process_spec(environ=env) == dist.ProcessSpec("10.0.0.2:1234", 4, 3)
    # arguments win field by field
    assert dist.resolve_process_spec(process_id=1, environ=env) == dist.ProcessSpec(
        "10.0.0.2:1234", 4, 1)
    with pytest.raises(ValueError, match="missing --num-processes, --process-id"):
        dist.resolve_process_spec("h:1", environ={})
    with pytest.raises(ValueError, match="HOST:PORT"):
        dist.resolve_process_spec("nohost", 2, 0, environ={})
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        dist.resolve_process_spec("h:1", 2, 2, environ={})
    with pytest.raises(ValueError, match=dist.ENV_NUM_PROCESSES):
        dist.resolve_process_spec(environ={**env, dist.ENV_NUM_PROCESSES: "four"})


def test_set_cpu_device_count_rewrites_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=8")
    with pytest.raises(RuntimeError, match="backend already started"):
        import jax

        jax.devices()  # the test session's backend is up: too late to change the count
        dist.set_cpu_device_count(4)
    timeouts = [f"{k}={v}" for k, v in dist.CPU_COLLECTIVE_TIMEOUT_FLAGS.items()]
    assert os.environ["XLA_FLAGS"].split() == ["--xla_foo=1", *timeouts,
                                               "--xla_force_host_platform_device_count=4"]


# Two virtual CPU devices; device 1 reaches an all-reduce SLOW seconds after device 0.
_LATE_DEVICE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from r1zero_jax import distributed
distributed.set_cpu_device_count(2)
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh, PartitionSpec as P

def late(i):
    if int(i) == 1:
        time.sleep(float(sys.argv[2]))
    return np.float32(0)

def f(x):
    z = io_callback(late, jax.ShapeDtypeStruct((), jnp.float32), jax.lax.axis_index("d"))
    return jax.lax.psum(x + z, "d")

mesh = Mesh(np.array(jax.devices()), ("d",))
out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P()))(jnp.ones(2))
print("sum", float(jax.block_until_ready(out)[0]))
"""


def test_cpu_collective_timeout_is_raised_and_honoured(tmp_path):
    """XLA:CPU aborts a collective `terminate` seconds after its stuck warning; with the warning
    at 1 s, a device 4 s late kills the process at XLA's setting of 2 s (the flag is read) and
    not at the project's (set_cpu_device_count)."""
    script = tmp_path / "late.py"
    script.write_text(_LATE_DEVICE)
    warn = "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
    envs = [{"XLA_FLAGS": warn},
            {"XLA_FLAGS": warn + " --xla_cpu_collective_call_terminate_timeout_seconds=2"}]
    procs = [subprocess.Popen([sys.executable, str(script), ROOT, "4"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", **env}) for env in envs]
    (ours, _), (xla, _) = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 0 and "sum 2.0" in ours, ours
    assert procs[1].returncode != 0 and "Termination timeout" in xla, xla[-2000:]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, ROOT)
    _worker(*sys.argv[2:6])
elif __name__ == "__main__" and sys.argv[1:2] == ["train"]:
    sys.path.insert(0, ROOT)
    _train_recording(sys.argv[2], sys.argv[3:])
