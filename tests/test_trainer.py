"""The learner step on the 8-device mesh vs one device, and the trainer end to end (CLI, files,
resume, learning)."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1zero_jax import sharding as shd
from r1zero_jax.config import OptimConfig, RLConfig
from r1zero_jax.models import QwenConfig
from r1zero_jax.models.decoder import abstract_model, init_model, param_shardings, params_of
from r1zero_jax.rl.learner import (LearnBatch, Learner, init_state, jit_learner, lr_schedule,
                                   make_binder, make_optimizer, response_logprobs)

QC = QwenConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False)
A, M, T, TN = 2, 8, 12, 6  # accumulation steps, microbatch, sequence, response


@pytest.fixture(scope="module")
def host_params():
    mesh1 = shd.make_mesh("data=1", devices=jax.devices()[:1])
    params = params_of(init_model(QC, mesh1, seed=3))
    # Non-zero biases and norms so a dropped term would show.
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)


def _batch():
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, QC.vocab_size, (A, M, T)).astype(np.int32)
    prompt_len = rng.integers(1, T - TN + 1, (A, M))
    resp_len = rng.integers(1, TN + 1, (A, M))
    pos = np.arange(T)
    input_mask = ((pos >= T - TN - prompt_len[..., None]) & (pos < T - TN)) | \
                 ((pos >= T - TN) & (pos < T - TN + resp_len[..., None]))
    loss_mask = np.arange(TN) < resp_len[..., None]
    return tokens, input_mask, loss_mask, rng.normal(size=(A, M)).astype(np.float32)


def _one_step(mesh, host_params, loss="dr_grpo", aggregation=""):
    shardings = param_shardings(abstract_model(QC), mesh).to_pure_dict()
    params = jax.device_put(host_params, shardings)
    optim = OptimConfig(learning_rate=1e-2, weight_decay=0.01, clip_norm=0.5)
    tx = make_optimizer(optim)
    state = init_state(params, tx, mesh)
    learner = Learner(bind=make_binder(QC, dtype=jnp.float32),
                      rl=RLConfig(loss=loss, aggregation=aggregation),
                      tx=tx, schedule=lr_schedule(optim), max_new_tokens=TN)
    logprobs, step = jit_learner(learner, state, mesh)
    tokens, input_mask, loss_mask, adv = _batch()
    put = lambda x: shd.shard_batch(mesh, x, (None, "batch") + (None,) * (x.ndim - 2))  # noqa: E731
    old = np.stack([np.asarray(logprobs(state.params, shd.shard_batch(mesh, tokens[a]),
                                        shd.shard_batch(mesh, input_mask[a]))) for a in range(A)])
    # Perturb the old log-probs so ratios differ from 1 and clipping is exercised.
    old = old + np.random.default_rng(2).normal(0, 0.3, old.shape).astype(np.float32)
    batch = LearnBatch(tokens=put(tokens), input_mask=put(input_mask), loss_mask=put(loss_mask),
                       old_logp=put(old), advantages=put(adv))
    new_state, metrics = step(state, batch)
    return (old, jax.tree.map(np.asarray, new_state.params),
            {k: float(v) for k, v in metrics.items()})


@pytest.mark.parametrize("loss,aggregation", [
    ("dr_grpo", ""), pytest.param("grpo", "token_mean", marks=pytest.mark.slow)])
def test_train_step_on_8_devices_equals_one_device(host_params, loss, aggregation):
    mesh8 = shd.make_mesh("data=4,tensor=2")
    mesh1 = shd.make_mesh("data=1", devices=jax.devices()[:1])
    assert mesh8.devices.size == 8
    old8, p8, m8 = _one_step(mesh8, host_params, loss, aggregation)
    old1, p1, m1 = _one_step(mesh1, host_params, loss, aggregation)
    np.testing.assert_allclose(old8, old1, atol=1e-5)
    moved = max(float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(host_params), strict=False))
    assert moved > 1e-3  # the step did something
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=False):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert m8.keys() == m1.keys() and 0 < m1["clip_frac"] < 1
    for k in m1:
        assert m8[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-5), k


def test_chunked_lm_head_gives_the_same_logprobs_and_gradients(host_params):
    bind = make_binder(QC, dtype=jnp.float32)
    tokens, input_mask, _, _ = _batch()
    tokens, input_mask = jnp.asarray(tokens[0]), jnp.asarray(input_mask[0])

    def total(p, chunk):
        lp, ent = response_logprobs(bind(p), tokens, input_mask, TN, temperature=0.7, chunk=chunk)
        return lp.sum(), (lp, ent)

    vg = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
    (_, (lp0, e0)), g0 = vg(host_params, 0)
    (_, (lp4, e4)), g4 = vg(host_params, 4)
    np.testing.assert_allclose(lp4, lp0, atol=1e-5)
    np.testing.assert_allclose(e4, e0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g0), strict=False):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Entropy is a metric only: no gradient flows through it.
    ge = jax.jit(jax.grad(
        lambda p: response_logprobs(bind(p), tokens, input_mask, TN)[1].sum()))(host_params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(ge))


TINY = ["train.warmup_sft_steps=20", "train.warmup_sft_habit_steps=5", "rl.rollout_batch_size=32",
        "train.minibatch_size=16", "train.microbatch_size=8", "eval.size=8", "eval.batch_size=8",
        "eval.every=2", "checkpoint.every=1", "sampling.max_new_tokens=24"]


def test_cli_run_files_and_resume(tmp_path, capsys):
    from r1zero_jax.cli import main

    wd = str(tmp_path / "run")
    args = ["train", "cpu_smoke", "--workdir", wd] + [a for s in TINY for a in ("--set", s)]
    assert main(args + ["--steps", "2"]) == 0
    rows = [json.loads(line) for line in Path(wd, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "loss", "accuracy", "response_length_correct",
                "response_length_incorrect", "truncation_rate", "entropy", "clip_frac", "approx_kl",
                "grad_norm", "lr", "gen_tokens_per_s", "time_sample_s", "time_grade_s",
                "time_learn_s", "reflection_rate", "logprob_gap_mean"):
        assert key in rows[0], key
    assert rows[0]["optimizer_steps"] == 2 and rows[0]["logprob_gap_mean"] < 1e-4
    summary = json.loads(Path(os.path.join(wd, "summary.json")).read_text())
    assert summary["num_devices"] == 8 and summary["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
    assert summary["steps"] == 2
    assert 0 <= summary["eval_accuracy_before"] <= 1 and 0 <= summary["eval_accuracy_after"] <= 1
    assert os.path.getsize(os.path.join(wd, "curves.png")) > 1000
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(wd, "tensorboard")))
    out = capsys.readouterr().out
    assert "step 2/2" in out and "ETA" in out and "held-out greedy accuracy" in out

    # A changed config is refused on resume, naming the change...
    assert main(args + ["--steps", "3", "--set", "optim.learning_rate=0.5"]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err
    # ...and the same config resumes at step 2 and runs only step 3.
    assert main(args + ["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "step 3/3" in out and "step 1/3" not in out
    rows = [json.loads(line) for line in Path(wd, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = json.loads(Path(os.path.join(wd, "summary.json")).read_text())
    assert summary["steps"] == 3


def test_main_job_learns(tmp_path):
    """The README's main job as configured: held-out accuracy rises by at least 30 points."""
    from r1zero_jax.rl.launch import train_cli

    wd = str(tmp_path / "main")
    assert train_cli("cpu_smoke", [], workdir=wd) == 0
    s = json.loads(Path(os.path.join(wd, "summary.json")).read_text())
    assert s["eval_accuracy_after"] - s["eval_accuracy_before"] >= 0.30, s


def test_synthetic_task_split_tokenizer_and_grading():
    from r1zero_jax.data.synthetic import SyntheticTask, SyntheticTokenizer, worked
    from r1zero_jax.rewards.pool import GraderPool, compute_rewards

    task, tok = SyntheticTask(), SyntheticTokenizer()
    train, held = set(task.problems("train")), set(task.problems("eval"))
    assert not train & held and len(train | held) == 1000 and 80 <= len(held) <= 120
    assert worked((3, 5, 4)) == "3+5=8 8+4=12 \\boxed{12}"
    rng = np.random.default_rng(0)
    rows = task.rows("eval", 20)
    responses, answers, styles = [], [], []
    for r in rows:
        terms = tuple(int(x) for x in r["problem"][:-1].split("+"))
        for _ in range(5):
            text = task.warmup_response(terms, rng)
            assert tok.decode(tok.encode(text)) == text
            responses.append(text)
            answers.append(r["answer"])
            styles.append(text[0].isdigit())  # worked / recheck start with a digit
    with GraderPool(workers=1) as pool:
        rewards = compute_rewards(responses, answers, "no", pool=pool)
    # The real grader: worked answers are right, guesses and rambles wrong.
    assert [r == 1.0 for r in rewards] == styles and any(styles) and not all(styles)
    tokens, loss_mask = task.warmup_batch(tok, 4, rng, task.warmup_length(tok))
    assert tokens.shape == loss_mask.shape and (tokens[loss_mask] != tok.pad_token_id).all()
    with pytest.raises(ValueError, match="cannot encode"):
        tok.encode("3*4")
