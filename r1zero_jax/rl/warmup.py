"""Supervised warm-up that turns a random model into a weak "base model" for a toy task.

A random model never produces a `\\boxed{}` answer, so RL would see zero reward forever. A few
hundred next-token steps (see data/synthetic.py for the response styles) give a model that can
work a sum out but mostly guesses instead: the starting point R1-Zero-style RL needs. Any task
can bring such data (`Task.warmup_data`): an object with `warmup_length(tokenizer)`,
`warmup_batch(tokenizer, batch, rng, length)` and `skill_only()` (the data of the skill phase).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from r1zero_jax import sharding as shd
from r1zero_jax.models.decoder import positions_from_mask
from r1zero_jax.rl.learner import init_state


def warmup(params: dict, bind, task, tokenizer, mesh: Mesh, *,
           skill_steps: int, habit_steps: int, lr: float, batch: int, seed: int = 0,
           printer=print) -> dict:
    """Next-token training on response tokens; returns the new params, placed as `params` were.

    Two phases: `skill_steps` on worked answers only (the model learns to add), then
    `habit_steps` at a third of the rate on the task's mix of styles, where guessing dominates
    (the model keeps the skill but mostly does not use it). Runs on one device: the model is
    tiny, and on a CPU host a many-device mesh's collectives would cost more than the maths.
    """
    shardings = jax.tree.map(lambda x: x.sharding, params)
    # Every process warms up the same copy on its own first device (deterministic), so a
    # multi-host run needs no cross-host transfer.
    mesh = shd.make_mesh("data=1", devices=jax.local_devices()[:1])
    params = jax.device_put(shd.to_host(params), shd.replicated(mesh))

    def loss_fn(p, tokens, loss_mask):
        mask = jnp.ones_like(tokens, bool)  # right padding sits after EOS; it is never a target
        logits, _ = bind(p)(tokens, positions_from_mask(mask), mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        m = loss_mask[:, 1:].astype(jnp.float32)
        return (nll * m).sum() / m.sum()

    skill = task.skill_only()
    rng = np.random.default_rng(seed)
    length = task.warmup_length(tokenizer)
    t0, total, done = time.perf_counter(), skill_steps + habit_steps, 0
    for name, phase_task, steps, peak in (("skill", skill, skill_steps, lr),
                                          ("habit", task, habit_steps, lr / 3)):
        if not steps:
            continue
        tx = optax.adamw(optax.warmup_cosine_decay_schedule(
            0.0, peak, min(20, steps // 10), steps, peak * 0.1), b1=0.9, b2=0.98, weight_decay=0.0)

        @jax.jit
        def step(p, opt_state, tokens, loss_mask, tx=tx):  # this phase's optimizer
            loss, g = jax.value_and_grad(loss_fn)(p, tokens, loss_mask)
            updates, opt_state = tx.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        opt_state = init_state(params, tx, mesh).opt_state
        every = max(1, steps // 4)
        for i in range(steps):
            tokens, loss_mask = phase_task.warmup_batch(tokenizer, batch, rng, length)
            params, opt_state, loss = step(params, opt_state, shd.shard_batch(mesh, tokens),
                                           shd.shard_batch(mesh, loss_mask))
            done += 1
            if (i + 1) % every == 0 or i + 1 == steps:
                el = time.perf_counter() - t0
                printer(f"warm-up {name} {i + 1}/{steps} | loss {float(loss):.3f} | "
                        f"{done / el:.1f} steps/s ETA {el / done * (total - done):.0f}s",
                        flush=True)
    return shd.from_host(shd.to_host(params), shardings)
