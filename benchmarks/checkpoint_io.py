"""Checkpoint save/restore throughput (MB/s) for a Qwen2.5-0.5B-shaped set of random params.

    python benchmarks/checkpoint_io.py --target local --dtype float32
    python benchmarks/checkpoint_io.py --target emulator --dtype bfloat16
    python benchmarks/checkpoint_io.py --target gs://bucket/scratch

Arrays are sharded over an 8-device CPU mesh (fsdp=8), as in the smoke-test setup. Baseline,
measured in the same run: the same bytes written and read as one plain file per array through
the same storage (local files, or gcsfs objects), with no Orbax/tensorstore.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1zero_jax import dtypes, paths  # noqa: E402
from r1zero_jax.checkpoint import Checkpointer  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

QWEN25_05B_PARAMS = 494_032_768


def qwen25_05b_shapes() -> dict[str, tuple[int, ...]]:
    """Qwen2.5-0.5B: V=151936 D=896 F=4864 N=14 K=2 H=64, 24 layers, tied embeddings."""
    V, D, F, N, K, H, L = 151_936, 896, 4864, 14, 2, 64, 24
    shapes = {"embed": (V, D), "final_norm": (D,)}
    for i in range(L):
        p = f"layer{i:02d}."
        shapes |= {p + "q": (D, N * H), p + "q_bias": (N * H,), p + "k": (D, K * H),
                   p + "k_bias": (K * H,), p + "v": (D, K * H), p + "v_bias": (K * H,),
                   p + "o": (N * H, D), p + "gate": (D, F), p + "up": (D, F), p + "down": (F, D),
                   p + "attn_norm": (D,), p + "mlp_norm": (D,)}
    return shapes


def spec(shape: tuple[int, ...]) -> P:
    return P("fsdp", None) if len(shape) == 2 else P()


def make_params(mesh: Mesh, dtype, seed: int = 0) -> dict:
    """Random normal arrays (numpy: jax.random is slow for 0.5B values on 2 CPU cores)."""
    shapes = qwen25_05b_shapes()
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == QWEN25_05B_PARAMS, n
    rng = np.random.default_rng(seed)
    return {name: jax.device_put(rng.standard_normal(shape, dtype=np.float32).astype(dtype),
                                 NamedSharding(mesh, spec(shape)))
            for name, shape in sorted(shapes.items())}


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def baseline(root: str, params: dict) -> tuple[float, float]:
    """Seconds to write then read every array as one plain file/object (host bytes)."""
    t0 = time.perf_counter()
    for name, x in params.items():
        with paths.open_file(paths.join(root, name), "wb") as f:
            f.write(np.asarray(x).tobytes())
            if not paths.is_gcs(root):
                f.flush()
                os.fsync(f.fileno())
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in params:
        with paths.open_file(paths.join(root, name), "rb") as f:
            f.read()
    t_read = time.perf_counter() - t0
    paths.remove(root, recursive=True)
    return t_write, t_read


def orbax_round(root: str, params: dict, mesh: Mesh, step: int) -> dict[str, float]:
    abstract = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)}
    with Checkpointer(root, save_every=1, keep_last=1) as ckpt:
        t0 = time.perf_counter()
        ckpt.save(step, {"params": params}, {"step": step}, force=True)
        t_blocking = time.perf_counter() - t0
        ckpt.wait()
        t_save = time.perf_counter() - t0
    with Checkpointer(root, save_every=1, keep_last=1) as ckpt:
        t0 = time.perf_counter()
        restored, _ = ckpt.restore(step, abstract_state=abstract)
        jax.block_until_ready(restored)
        t_restore = time.perf_counter() - t0
    for name in ("embed", "layer23.down", "final_norm"):  # spot check: bits survive
        np.testing.assert_array_equal(np.asarray(restored["params"][name]),
                                      np.asarray(params[name]))
    return {"save_blocking_s": t_blocking, "save_s": t_save, "restore_s": t_restore}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="local", help="local, emulator, or a gs:// prefix")
    ap.add_argument("--dtype", default="float32", choices=dtypes.NAMES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="local directory (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()

    mesh = Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    t0 = time.perf_counter()
    params = make_params(mesh, jnp.dtype(args.dtype))
    mb = nbytes(params) / 1e6
    print(f"{QWEN25_05B_PARAMS:,} params, {args.dtype}, {mb:,.0f} MB, {len(params)} arrays "
          f"on {mesh.shape} (made in {time.perf_counter() - t0:.1f} s)", flush=True)

    emulator = None
    if args.target == "emulator":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
        from gcs_emulator import fake_gcs_server

        emulator = fake_gcs_server(bucket="bench")
        base = emulator.__enter__().gs(f"ckpt-io-{uuid.uuid4().hex[:8]}")
    elif args.target == "local":
        base = args.workdir or tempfile.mkdtemp(prefix="ckpt-io-")
    else:
        base = paths.join(args.target, f"ckpt-io-{uuid.uuid4().hex[:8]}")
    try:
        rows, started = [], time.perf_counter()
        for r in range(args.repeats):
            t_w, t_r = baseline(paths.join(base, f"raw{r}"), params)
            row = orbax_round(paths.join(base, f"orbax{r}"), params, mesh, step=r + 1)
            row |= {"raw_write_s": t_w, "raw_read_s": t_r}
            rows.append(row)
            done = time.perf_counter() - started
            print(f"[{r + 1}/{args.repeats}] save {mb / row['save_s']:,.0f} MB/s "
                  f"(blocking {row['save_blocking_s']:.2f} s), "
                  f"restore {mb / row['restore_s']:,.0f} MB/s; "
                  f"raw write {mb / t_w:,.0f} MB/s, raw read {mb / t_r:,.0f} MB/s; "
                  f"ETA {done / (r + 1) * (args.repeats - r - 1):.0f} s", flush=True)
            paths.remove(paths.join(base, f"orbax{r}"), recursive=True)
    finally:
        if emulator is not None:
            emulator.__exit__(None, None, None)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result = {"target": args.target, "dtype": args.dtype, "MB": round(mb), "repeats": args.repeats,
              "save_MBps": round(mb / med["save_s"]),
              "save_blocking_s": round(med["save_blocking_s"], 2),
              "restore_MBps": round(mb / med["restore_s"]),
              "raw_write_MBps": round(mb / med["raw_write_s"]),
              "raw_read_MBps": round(mb / med["raw_read_s"])}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
