"""Group advantages and policy-gradient losses (Dr. GRPO and GRPO), pure and registered by name.

Shapes: B responses (G consecutive rows per prompt), T generated positions. A loss is an
advantage estimator plus a way to aggregate per-token losses:

- `dr_grpo` (Liu et al. 2025): A_i = r_i - mean(group); token losses summed per response and
  divided by a constant (max new tokens), then averaged over responses. No length or std bias.
- `grpo`: A_i = (r_i - mean) / (std + 1e-8) with the unbiased std; token losses averaged over each
  response's own length, then over responses.
- aggregation "token_mean" (DAPO): one mean over every token of the batch.

Normalisers (`num_seqs`, `num_tokens`) default to this batch's; the learner passes the whole
minibatch's so that summing microbatch losses gives the minibatch loss exactly.
"""

from dataclasses import dataclass
from collections.abc import Callable

import jax
import jax.numpy as jnp

from r1zero_jax.config import AGGREGATIONS, LOSS_NAMES

ADVANTAGES: dict[str, Callable] = {}
AGGREGATORS: dict[str, Callable] = {}


def _register(table: dict, name: str):
    def deco(fn):
        table[name] = fn
        return fn

    return deco


@_register(ADVANTAGES, "group_centered")
def group_centered(rewards: jax.Array, group_size: int) -> jax.Array:
    """[B] -> [B]: reward minus its group's mean."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


@_register(ADVANTAGES, "group_normalized")
def group_normalized(rewards: jax.Array, group_size: int) -> jax.Array:
    """[B] -> [B]: (r - mean) / (unbiased std + 1e-8) within each group."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    centered = r - r.mean(axis=1, keepdims=True)
    return (centered / (r.std(axis=1, ddof=1, keepdims=True) + 1e-8)).reshape(-1)


@_register(AGGREGATORS, "constant")
def constant_normalized(tok, mask, *, max_len, num_seqs, num_tokens):
    """Sum over tokens / max_len, mean over responses (Dr. GRPO)."""
    del num_tokens
    return (tok * mask).sum() / (max_len * num_seqs)


@_register(AGGREGATORS, "sequence_mean")
def sequence_mean(tok, mask, *, max_len, num_seqs, num_tokens):
    """Mean over each response's own tokens, then over responses (GRPO)."""
    del max_len, num_tokens
    lengths = jnp.maximum(mask.sum(axis=1), 1)
    return ((tok * mask).sum(axis=1) / lengths).sum() / num_seqs


@_register(AGGREGATORS, "token_mean")
def token_mean(tok, mask, *, max_len, num_seqs, num_tokens):
    """One mean over all tokens of the batch (DAPO)."""
    del max_len, num_seqs
    return (tok * mask).sum() / jnp.maximum(num_tokens, 1)


@dataclass(frozen=True)
class LossSpec:
    advantage: str
    aggregation: str


LOSSES = {
    "dr_grpo": LossSpec(advantage="group_centered", aggregation="constant"),
    "grpo": LossSpec(advantage="group_normalized", aggregation="sequence_mean"),
}
assert set(LOSSES) == set(LOSS_NAMES) and set(AGGREGATIONS) - {""} <= set(AGGREGATORS)


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def compute_advantages(loss: str, rewards: jax.Array, group_size: int) -> jax.Array:
    """Advantages [B] of `rewards` [B] (B a multiple of group_size) under loss `loss`."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards are not a whole number of groups of "
                         f"{group_size}")
    return ADVANTAGES[get_loss(loss).advantage](rewards, group_size)


def k3_kl(logp: jax.Array, other_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(p || q) from samples of p: e^d - d - 1, d = log q - log p."""
    d = other_logp - logp
    return jnp.exp(d) - d - 1.0


def policy_loss(
    loss: str,
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    max_len: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "",
    ref_logp: jax.Array | None = None,
    kl_beta: float = 0.0,
    num_seqs: jax.Array | int | None = None,
    num_tokens: jax.Array | int | None = None,
) -> tuple[jax.Array, dict]:
    """PPO-clip loss of log-probs `logp` [B,T] vs `old_logp` [B,T] with advantages [B].

    Token loss max(-A*rho, -A*clip(rho, 1-clip_low, 1+clip_high)), rho = exp(logp - old_logp),
    plus kl_beta * k3 KL to `ref_logp` when kl_beta > 0. Returns (scalar loss, metrics), metrics
    being token means over `mask`: clip_frac, approx_kl (KL(old || new), k3), kl_ref.
    """
    spec = get_loss(loss)
    agg = AGGREGATORS[aggregation or spec.aggregation]
    mask = mask.astype(jnp.float32)
    num_seqs = logp.shape[0] if num_seqs is None else num_seqs
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None].astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    tok = jnp.maximum(unclipped, clipped)
    count = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "clip_frac": ((clipped > unclipped) * mask).sum() / count,
        "approx_kl": (k3_kl(old_logp, logp) * mask).sum() / count,  # samples are from old
    }
    if kl_beta > 0:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs ref_logp from the reference model")
        kl = k3_kl(logp, ref_logp)
        tok = tok + kl_beta * kl
        metrics["kl_ref"] = (kl * mask).sum() / count
    value = agg(tok, mask, max_len=max_len, num_seqs=num_seqs, num_tokens=num_tokens)
    return value, metrics
