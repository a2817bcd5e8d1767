"""Supervised warm-up that turns a random model into a weak "base model" for the synthetic task.

A random model never produces a `\\boxed{}` answer, so RL would see zero reward forever. A few
hundred next-token steps on the task's mixed-style responses (see data/synthetic.py) give a model
that mostly guesses and sometimes works the sum out: the starting point R1-Zero-style RL needs.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from r1zero_jax import sharding as shd
from r1zero_jax.data.synthetic import SyntheticTask, SyntheticTokenizer
from r1zero_jax.models.qwen2 import positions_from_mask
from r1zero_jax.rl.learner import place_replicated_scalars


def warmup(params: dict, bind, task: SyntheticTask, tokenizer: SyntheticTokenizer, mesh: Mesh, *,
           steps: int, lr: float, batch: int, length: int, seed: int = 0, printer=print) -> dict:
    """`steps` AdamW steps of next-token loss on response tokens; returns the new params."""
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.1), b1=0.9, b2=0.98,
                     weight_decay=0.0)

    def loss_fn(p, tokens, loss_mask):
        mask = jnp.ones_like(tokens, bool)  # right padding sits after EOS; it is never a target
        logits, _ = bind(p)(tokens, positions_from_mask(mask), mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        m = loss_mask[:, 1:].astype(jnp.float32)
        return (nll * m).sum() / m.sum()

    @jax.jit
    def step(p, opt_state, tokens, loss_mask):
        loss, g = jax.value_and_grad(loss_fn)(p, tokens, loss_mask)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = place_replicated_scalars(jax.jit(tx.init)(params), mesh)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    every = max(1, steps // 5)
    for i in range(steps):
        tokens, loss_mask = task.warmup_batch(tokenizer, batch, rng, length)
        params, opt_state, loss = step(params, opt_state, shd.shard_batch(mesh, tokens),
                                       shd.shard_batch(mesh, loss_mask))
        if (i + 1) % every == 0 or i + 1 == steps:
            el = time.perf_counter() - t0
            printer(f"warm-up {i + 1}/{steps} | loss {float(loss):.3f} | "
                    f"{(i + 1) / el:.1f} steps/s ETA {el / (i + 1) * (steps - i - 1):.0f}s", flush=True)
    return params
