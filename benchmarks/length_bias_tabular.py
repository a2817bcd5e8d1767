"""The length bias with nothing else in the way: a tabular policy trained with the project's losses.

A response is WORK_LEN forced "work" tokens, which come out right with probability P_RIGHT (the
task's noise, not the policy's choice), then any number of `hmm` tokens, then the answer. The
policy decides only how long to go on: one logit row per state, "my work came out right" and
"my work came out wrong" (a model can notice its own slip, as in `6+9=12`), columns answer /
`hmm`. Whether the answer is right is settled before the first `hmm`, so length never changes
the reward, and the unbiased policy gradient (Dr. GRPO's) has no reason to move it.

GRPO weights each token by A_i / |o_i|. After wrong work every sample has A < 0 (in a group
with some right answers), and a longer response spreads the same total penalty over more tokens,
so the expected update makes `hmm` more likely: wrong responses grow. After right work A > 0
and the same weighting favours answering early: right responses shrink. Advantages and losses
come straight from `r1zero_jax.rl.losses` (`compute_advantages`, `policy_loss`), one on-policy
Adam step per rollout of `prompts` x `group_size` responses.

    python benchmarks/length_bias_tabular.py --seeds 0 1 2 3 4 --steps 200
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

WORK_LEN = 8  # forced work tokens at the start of every response
P_RIGHT = 0.5  # the work comes out right this often (the task's noise, not the policy's choice)
MAX_LEN = 40  # tokens per response (Dr. GRPO's constant normaliser); the answer is forced there
P_CONTINUE = 0.5  # initial probability of one more `hmm` (mean 1 per response)


def init_table() -> np.ndarray:
    """Logits [2, 2]: row 0 after right work, row 1 after wrong work; columns answer, `hmm`."""
    return np.log(np.full((2, 2), [1 - P_CONTINUE, P_CONTINUE], np.float32))


def sample(table: np.ndarray, n: int, rng: np.random.Generator):
    """n responses: states int32 [n, T] (-1: forced token, log-prob 0 under every policy, it
    counts only in the length), actions int32 [n, T], mask bool [n, T], rewards [n], lengths [n]."""
    probs = np.exp(table - table.max(1, keepdims=True))
    p_cont = (probs / probs.sum(1, keepdims=True))[:, 1]
    right = rng.random(n) < P_RIGHT
    state = np.where(right, 0, 1)
    room = MAX_LEN - WORK_LEN - 1  # decisions that fit before the forced answer
    hmm = np.minimum(rng.geometric(1 - p_cont[state]) - 1, room)
    t = np.arange(MAX_LEN)[None, :]
    end = WORK_LEN + hmm[:, None]  # position of the answer
    # Each `hmm` is a decision, and so is the answer unless the length cap forced it.
    decision = ((t >= WORK_LEN) & (t < end)) | ((t == end) & (hmm[:, None] < room))
    states = np.where(decision, state[:, None], -1).astype(np.int32)
    actions = (t < end).astype(np.int32)  # `hmm` until the answer
    lengths = (WORK_LEN + hmm + 1).astype(np.int32)
    mask = t < lengths[:, None]
    return states, actions, mask, right.astype(np.float32), lengths


def make_step(loss: str, group_size: int, lr: float):
    import jax
    import jax.numpy as jnp
    import optax

    from r1zero_jax.rl.losses import compute_advantages, policy_loss

    tx = optax.adam(lr)

    def logp_of(table, states, actions):
        lp = jax.nn.log_softmax(table, axis=-1)[jnp.maximum(states, 0), actions]
        return jnp.where(states >= 0, lp, 0.0)  # forced tokens: probability 1

    @jax.jit
    def step(table, opt_state, states, actions, mask, rewards):
        adv = compute_advantages(loss, rewards, group_size)

        def objective(t):
            lp = logp_of(t, states, actions)
            return policy_loss(loss, lp, jax.lax.stop_gradient(lp), adv, mask, max_len=MAX_LEN)[0]

        grad = jax.grad(objective)(table)
        updates, opt_state = tx.update(grad, opt_state, table)
        return optax.apply_updates(table, updates), opt_state

    return step, tx


def run(loss: str, seed: int, *, steps: int = 200, prompts: int = 16, group_size: int = 8,
        lr: float = 0.05) -> list[dict]:
    """Per step: accuracy and mean lengths of correct / incorrect responses."""
    import jax.numpy as jnp

    step, tx = make_step(loss, group_size, lr)
    table = jnp.asarray(init_table())
    opt_state = tx.init(table)
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        states, actions, mask, rewards, lengths = sample(np.asarray(table),
                                                         prompts * group_size, rng)
        ok = rewards > 0
        out.append({"step": s + 1, "accuracy": float(ok.mean()),
                    "response_length_correct": float(lengths[ok].mean()) if ok.any() else None,
                    "response_length_incorrect": (float(lengths[~ok].mean()) if (~ok).any()
                                                  else None),
                    "response_length": float(lengths.mean())})
        table, opt_state = step(table, opt_state, jnp.asarray(states), jnp.asarray(actions),
                                jnp.asarray(mask), jnp.asarray(rewards))
    return out


def run_all(seeds=(0, 1, 2, 3, 4), steps: int = 200, printer=print) -> dict:
    """Results in the shape benchmarks/length_bias.py plots and tabulates."""
    results = {"seeds": list(seeds), "steps": steps, "runs": {"grpo": {}, "dr_grpo": {}}}
    for seed in seeds:
        for loss in ("grpo", "dr_grpo"):
            rows = run(loss, seed, steps=steps)
            results["runs"][loss][str(seed)] = rows
            printer(f"{loss:8s} seed {seed}: incorrect length "
                    f"{rows[0]['response_length_incorrect']:.1f}"
                    f" -> {rows[-1]['response_length_incorrect'] or float('nan'):.1f}, accuracy "
                    f"{rows[0]['accuracy']:.2f} -> {rows[-1]['accuracy']:.2f}", flush=True)
    return results


def main(argv=None) -> int:
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import length_bias as lb

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default="", help="also save the per-step results here")
    p.add_argument("--png", default="docs/length_bias_tabular.png")
    a = p.parse_args(argv)
    results = run_all(a.seeds, a.steps)
    results["command"] = ("python benchmarks/length_bias_tabular.py "
                          + " ".join(argv or sys.argv[1:]))
    if a.json:
        lb.save(results, a.json)
    lb.plot(results, a.png, title="a tabular policy")
    print(lb.table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
