"""Choosing a token from vocab-sharded logits without gathering them.

A step's logits [R, V] leave the LM head sharded over the vocabulary (rows over `decode_batch`,
vocab over `vocab` in sharding.LOGICAL_RULES). Gathering whole rows, or adding the partial sums of
a head sharded on its embed dimension, moves float32 [rows, V] on every decode step: a third of
the step's collective bytes for Qwen's 152k vocabulary. Here each device works on its own slice
of V and only per-row scalars cross devices: the max, the softmax normaliser, each shard's total
weight, the chosen token and its logit.

The sample is categorical.py's inverse-CDF draw over the whole vocabulary: shard totals are
summed in shard order, and the shard holding the target draws within its slice. Sums are grouped
by shard, so two meshes can disagree on a draw only when the target falls within float rounding
of a boundary of the cumulative distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from r1zero_jax import sharding as shd
from r1zero_jax.sampling import categorical

LOGIT_AXES = ("decode_batch", "vocab")


def choose(logits, u, temperature, *, greedy: bool, mesh: Mesh):
    """logits float32 [R, V] (vocab-sharded), u [R] in (0, 1] (unused when greedy), temperature
    a scalar > 0 -> (token [R] int32, log-prob [R] float32).

    Greedy: the first index of the largest logit, and log_softmax(logits) there. Sampled: a draw
    from softmax(logits / temperature), and log_softmax(logits / temperature) there.
    """
    spec = shd.logical_to_spec(LOGIT_AXES)
    rows_spec, vocab_axes = jax.sharding.PartitionSpec(spec[0]), spec[1]
    v = logits.shape[-1]

    def local(lg, u, temperature):
        vs = lg.shape[-1]
        shard = jax.lax.axis_index(vocab_axes)
        ids = shard * vs + jax.lax.broadcasted_iota(jnp.int32, lg.shape, 1)
        allmax = lambda x: jax.lax.pmax(x, vocab_axes)  # noqa: E731
        allsum = lambda x: jax.lax.psum(x, vocab_axes)  # noqa: E731
        scaled = lg if greedy else lg / temperature
        top = allmax(jnp.max(scaled, axis=-1))
        e = jnp.exp(scaled - top[:, None])
        lse = top + jnp.log(allsum(jnp.sum(e, axis=-1)))
        if greedy:
            first = jnp.min(jnp.where(scaled == top[:, None], ids, v), axis=-1)
            token = -allmax(-first)  # the global first maximum, as argmax picks it
        else:
            totals = jax.lax.all_gather(categorical.total(e), vocab_axes, axis=1)  # [r, shards]
            cum = jnp.cumsum(totals, axis=-1)
            target = u * cum[:, -1]
            owner = categorical.first_reaching(cum, totals, target)
            before = jnp.take_along_axis(cum - totals, owner[:, None], axis=1)[:, 0]
            mine = categorical.draw_at(e, jnp.maximum(target - before, 0.0)) + shard * vs
            token = allsum(jnp.where(owner == shard, mine, 0))
        logit = allsum(jnp.sum(jnp.where(ids == token[:, None], scaled, 0.0), axis=-1))
        return token.astype(jnp.int32), logit - lse

    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, rows_spec, jax.sharding.PartitionSpec()),
                       out_specs=(rows_spec, rows_spec))
    logits = jax.lax.with_sharding_constraint(logits, jax.sharding.NamedSharding(mesh, spec))
    return fn(logits, u, jnp.asarray(temperature, jnp.float32))
