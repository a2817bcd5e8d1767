"""Pure logit filters for sampling: temperature, top-k, top-p. logits [..., V] float32.

A filter returns logits with the removed tokens set to -inf; sampling from the result draws from
the kept tokens' renormalised distribution. Ties at the cut-off are all kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """logits / temperature (temperature > 0; greedy decoding never calls this)."""
    return logits / jnp.asarray(temperature, logits.dtype)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits of each row (k is static; k <= 0 or k >= V keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """Nucleus filter: keep the smallest set of most probable tokens whose mass reaches p.

    A token is kept when the mass of the tokens strictly more probable than it is below p, so the
    most probable token is always kept and the token that crosses p is kept too.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)
