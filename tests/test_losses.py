"""Dr. GRPO / GRPO advantages and losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1zero_jax.config import AGGREGATIONS, LOSS_NAMES
from r1zero_jax.rl import losses


def test_registry_matches_config_vocabulary():
    assert set(losses.LOSSES) == set(LOSS_NAMES)
    assert set(AGGREGATIONS) - {""} <= set(losses.AGGREGATORS)
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        losses.get_loss("ppo")


def test_advantages_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(losses.compute_advantages("dr_grpo", r, 4),
                               [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=1e-7)
    # unbiased std of (1, 0, 0, 1) = sqrt(4 * 0.25 / 3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-8)
    np.testing.assert_allclose(losses.compute_advantages("grpo", r, 4),
                               [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        losses.compute_advantages("dr_grpo", r, 3)


# Two responses, three positions; ratios chosen to hit both clip edges. Hand-computed token losses
# (eps = 0.2): row 0, A = +0.5: rho 1.1 -> -0.55; rho 1.5 -> max(-0.75, -0.6) = -0.6 (clipped);
# third token masked. Row 1, A = -0.5: rho 0.5 -> max(0.25, 0.4) = 0.4 (clipped); rho 1.0 -> 0.5;
# rho 1.3 -> max(0.65, 0.6) = 0.65. Row sums -1.15 and 1.55, lengths 2 and 3.
RATIOS = np.array([[1.1, 1.5, 2.0], [0.5, 1.0, 1.3]])
MASK = np.array([[1, 1, 0], [1, 1, 1]], bool)
ADV = np.array([0.5, -0.5])


def _loss(name, aggregation="", **kw):
    old = jnp.full((2, 3), -1.0)
    return losses.policy_loss(name, old + jnp.log(RATIOS), old, jnp.asarray(ADV), jnp.asarray(MASK),
                              max_len=4, aggregation=aggregation, **kw)


def test_loss_values_by_hand():
    dr, m = _loss("dr_grpo")
    assert float(dr) == pytest.approx((-1.15 / 4 + 1.55 / 4) / 2, abs=1e-6)
    gr, _ = _loss("grpo")
    assert float(gr) == pytest.approx((-1.15 / 2 + 1.55 / 3) / 2, abs=1e-6)
    tm, _ = _loss("dr_grpo", "token_mean")
    assert float(tm) == pytest.approx((-1.15 + 1.55) / 5, abs=1e-6)
    assert float(m["clip_frac"]) == pytest.approx(2 / 5)
    # KL(old || new) from old samples: rho - 1 - log rho
    k3 = [r - 1 - math.log(r) for r in (1.1, 1.5, 0.5, 1.0, 1.3)]
    assert float(m["approx_kl"]) == pytest.approx(sum(k3) / 5, rel=1e-5)


def test_masked_tokens_do_not_matter():
    old = jnp.zeros((2, 3))
    new = jnp.log(jnp.asarray(RATIOS))
    poisoned = new.at[0, 2].set(50.0)  # a huge ratio on the masked slot
    for name in LOSS_NAMES:
        a, _ = losses.policy_loss(name, new, old, jnp.asarray(ADV), jnp.asarray(MASK), max_len=4)
        b, _ = losses.policy_loss(name, poisoned, old, jnp.asarray(ADV), jnp.asarray(MASK),
                                  max_len=4)
        assert float(a) == float(b)


def _grad(name, logp, old, adv, mask, max_len=8, **kw):
    fn = lambda lp, old, adv, mask: losses.policy_loss(  # noqa: E731
        name, lp, old, adv, mask, max_len=max_len, **kw)[0]
    return jax.jit(jax.grad(fn))(logp, old, adv, mask)


def test_dr_grpo_gradient_is_minus_a_over_lmax_b_inside_clip_and_zero_outside():
    B, T, L = 4, 5, 8
    adv = jnp.array([1.0, -0.5, 0.25, -2.0])
    mask = jnp.arange(T)[None, :] < jnp.array([5, 3, 1, 4])[:, None]
    old = jnp.full((B, T), -2.0)
    g = _grad("dr_grpo", old, old, adv, mask, max_len=L)
    expected = np.where(mask, -np.asarray(adv)[:, None] / (L * B), 0.0)
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-9)
    # Outside the trust region on the side PPO clips: A > 0 with rho > 1.2, A < 0 with rho < 0.8.
    rho = jnp.where(adv[:, None] > 0, 1.5, 0.5) * jnp.ones((B, T))
    g = _grad("dr_grpo", old + jnp.log(rho), old, adv, mask, max_len=L)
    np.testing.assert_array_equal(g, 0.0)


def test_zero_advantage_groups_give_zero_gradient():
    rewards = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    key = jax.random.PRNGKey(0)
    logp = -jax.random.uniform(key, (8, 6))
    old = logp + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (8, 6))
    mask = jnp.ones((8, 6), bool)
    for name in LOSS_NAMES:
        adv = losses.compute_advantages(name, rewards, 4)
        np.testing.assert_array_equal(adv, 0.0)
        np.testing.assert_array_equal(_grad(name, logp, old, adv, mask), 0.0)


def test_dr_grpo_and_grpo_weigh_lengths_differently():
    """Same advantage, lengths 2 and 6: GRPO gives each token of the short response 3x the
    push (1/(L_i B)); Dr. GRPO gives every token the same (1/(L_max B))."""
    adv = jnp.array([1.0, 1.0])
    mask = jnp.arange(6)[None, :] < jnp.array([2, 6])[:, None]
    lp = jnp.zeros((2, 6))
    g_grpo = _grad("grpo", lp, lp, adv, mask)
    np.testing.assert_allclose(g_grpo[0, :2], -1 / (2 * 2), rtol=1e-6)
    np.testing.assert_allclose(g_grpo[1], -1 / (6 * 2), rtol=1e-6)
    g_dr = _grad("dr_grpo", lp, lp, adv, mask, max_len=8)
    np.testing.assert_allclose(g_dr[0, :2], -1 / (8 * 2), rtol=1e-6)
    np.testing.assert_allclose(g_dr[1], -1 / (8 * 2), rtol=1e-6)
    # Per-response total push: GRPO equal per response, Dr. GRPO proportional to length.
    assert float(g_grpo[0].sum()) == pytest.approx(float(g_grpo[1].sum()))
    assert float(g_dr[1].sum()) == pytest.approx(3 * float(g_dr[0].sum()))


def test_k3_kl_penalty():
    lp = jnp.zeros((2, 3))
    ref = jnp.full((2, 3), math.log(2.0))
    mask = jnp.asarray(MASK)
    value, m = losses.policy_loss("dr_grpo", lp, lp, jnp.zeros(2), mask, max_len=4,
                                  ref_logp=ref, kl_beta=0.1)
    k3 = 2.0 - math.log(2.0) - 1.0
    assert float(m["kl_ref"]) == pytest.approx(k3, rel=1e-6)
    assert float(value) == pytest.approx(0.1 * k3 * 5 / (4 * 2), rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        losses.policy_loss("dr_grpo", lp, lp, jnp.zeros(2), mask, max_len=4, kl_beta=0.1)


@pytest.mark.parametrize("name,aggregation",
                         [("dr_grpo", ""), ("grpo", ""), ("dr_grpo", "token_mean")])
def test_microbatches_sum_to_the_minibatch_loss(name, aggregation):
    key = jax.random.split(jax.random.PRNGKey(2), 4)
    lp = -jax.random.uniform(key[0], (8, 5))
    old = lp + 0.3 * jax.random.normal(key[1], (8, 5))
    adv = jax.random.normal(key[2], (8,))
    mask = jax.random.uniform(key[3], (8, 5)) > 0.3
    kw = dict(max_len=5, aggregation=aggregation)
    full, _ = losses.policy_loss(name, lp, old, adv, mask, **kw)
    parts = sum(losses.policy_loss(name, lp[s], old[s], adv[s], mask[s], num_seqs=8,
                                   num_tokens=mask.sum(), **kw)[0]
                for s in (slice(0, 4), slice(4, 8)))
    assert float(parts) == pytest.approx(float(full), rel=1e-6)
