"""The CPU kernels a decode step is made of, XLA:CPU against their limits, in one run.

What bounds `benchmarks/sampling.py` on a CPU: the dense matmuls of a batch-32 decode step
(JAX against torch's, 1 and all threads), and decode attention's read of the KV cache (the
model's own attention einsums at batch 8, 2,096 slots, against a plain sum over the same bytes).

  python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import os
import time

import numpy as np

MATMULS = [(32, 512, 512), (32, 512, 1024), (32, 1024, 512), (32, 512, 3072)]  # the 15M model
B, K, G, H, S, LAYERS = 8, 2, 4, 64, 2096, 6


def _best(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def jax_matmul(m, k, n, iters=100):
    import jax
    import jax.numpy as jnp

    x = jnp.ones((m, k), jnp.float32)
    w = jnp.asarray(np.random.RandomState(0).randn(k, n).astype(np.float32) * 0.01)

    @jax.jit
    def loop(x, w):  # a chain of dependent matmuls: no call overhead, no hoisting
        return jax.lax.fori_loop(0, iters, lambda i, x: x + (x @ w)[:, :k] * 1e-3 if n >= k
                                 else x + jnp.pad(x @ w, ((0, 0), (0, k - n))) * 1e-3, x)

    return _best(lambda: loop(x, w).block_until_ready()) / iters


def torch_matmul(m, k, n, threads, iters=200):
    import torch

    torch.set_num_threads(threads)
    x, w = torch.ones(m, k), torch.randn(k, n) * 0.01

    def run():
        for _ in range(iters):
            x @ w

    return _best(run) / iters


def attention_read():
    """(model attention s/step over LAYERS layers, plain-sum s over the same bytes)."""
    import jax
    import jax.numpy as jnp

    rs = np.random.RandomState(0)
    ks = [jnp.asarray(rs.randn(B, K, H, S).astype(np.float32)) for _ in range(LAYERS)]
    vs = [jnp.asarray(rs.randn(B, K, S, H).astype(np.float32)) for _ in range(LAYERS)]
    q0 = jnp.asarray(rs.randn(B, K, G, H).astype(np.float32))
    valid = jnp.ones((B, 1, 1, S), bool)

    @jax.jit
    def attend(q, ks, vs):  # the decode einsums of models/decoder.py, on its cache layouts
        def step(i, q):
            for k, v in zip(ks, vs, strict=False):
                s = jnp.einsum("BKGH,BKHS->BKGS", q, k, preferred_element_type=jnp.float32)
                p = jax.nn.softmax(jnp.where(valid, s / 8.0, -1e30), axis=-1)
                q = q + 1e-3 * jnp.einsum("BKGS,BKSH->BKGH", p, v)
            return q
        return jax.lax.fori_loop(0, 10, step, q)

    total = jax.jit(lambda ks, vs: sum(jnp.sum(k) + jnp.sum(v)
                                       for k, v in zip(ks, vs, strict=False)))
    return (_best(lambda: attend(q0, ks, vs).block_until_ready()) / 10,
            _best(lambda: total(ks, vs).block_until_ready()))


def main() -> None:
    import jax

    cpus = os.cpu_count() or 1
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {cpus} CPUs")
    print("matmul [M,K]x[K,N] float32, GFLOP/s:")
    for m, k, n in MATMULS:
        flop = 2 * m * k * n
        j = flop / jax_matmul(m, k, n) / 1e9
        t1 = flop / torch_matmul(m, k, n, 1) / 1e9
        tn = flop / torch_matmul(m, k, n, cpus) / 1e9
        print(f"  {m}x{k}x{n}: jax {j:6.1f} | torch 1 thread {t1:6.1f} | torch {cpus} threads "
              f"{tn:6.1f} | jax / torch {cpus} threads {j / tn:.2f}")
    attend, plain = attention_read()
    gb = 2 * LAYERS * B * K * S * H * 4 / 1e9
    print(f"decode attention, batch {B}, {S} slots, {LAYERS} layers ({gb * 1e3:.0f} MB of cache): "
          f"{attend * 1e3:.2f} ms = {gb / attend:.1f} GB/s | plain sum of the same arrays "
          f"{plain * 1e3:.2f} ms = {gb / plain:.1f} GB/s | ratio {plain / attend:.2f}")


if __name__ == "__main__":
    main()
