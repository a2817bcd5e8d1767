"""Tasks behind an interface: a task of the user's own (countdown, outside the package) is
graded by its own reward function in the grader workers and trained by the RL loop."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from r1zero_jax import plugins, tasks

COUNTDOWN = Path(__file__).resolve().parent.parent / "configs" / "tasks" / "countdown.py"


@pytest.fixture(scope="module")
def countdown():
    return plugins.load(f"{COUNTDOWN}:reward", "reward function")


@pytest.mark.parametrize("response, want", [
    ("3*5+7", 1.0), (" (7+3*5) ", 1.0), ("7+5*3", 1.0),
    ("3+5+7", 0.1),  # well formed, misses the target
    ("3*5", 0.0), ("3*5+7+7", 0.0), ("3*5+8", 0.0),  # numbers missing, reused, foreign
    ("", 0.0), ("3 5 7", 0.0), ("-3+5*7", 0.0), ("3*5+7)", 0.0), ("37", 0.0),
    ("__import__('os')", 0.0), ("3**5", 0.0), ("3*5+7" + " " * 80, 0.0),
])
def test_countdown_reward_is_exact(countdown, response, want):
    assert countdown(response, "3 5 7=22")[0] == want


def test_user_task_is_graded_by_its_own_function_in_the_workers(countdown):
    task = tasks.from_config(f"{COUNTDOWN}:Countdown", "no")
    rows = task.rows("train", 6, seed=0)
    held = {r["problem"] for r in task.rows("eval", 0, seed=0)}
    assert rows and not held & {r["problem"] for r in rows}
    responses = ["3*5+7", "1+2+3", "x", "9*9*9", "(((1)))", "2*3+4"]
    answers = ["3 5 7=22", "1 2 3=6", "1 2 3=6", "9 9 9=729", "1=1", "2 3 4=10"]
    with task.pool(workers=1) as pool:
        s = tasks.score(task, pool, responses, answers)
    assert s.rewards.tolist() == pytest.approx([countdown(r, a)[0] for r, a in
                                                zip(responses, answers, strict=False)])
    assert s.rewards.tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert s.correct.tolist() == [True, True, False, True, True, True]
    assert s.extracted[2] is None and s.extracted[0] == "3*5+7"


def test_bad_task_specs_are_named():
    with pytest.raises(ValueError, match="data.task='nope'"):
        tasks.from_config("nope", "no")
    with pytest.raises(FileNotFoundError, match="no file"):
        tasks.from_config("missing.py:Task", "no")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        tasks.from_config(f"{COUNTDOWN}:Nope", "no")
    with pytest.raises(ValueError, match="not a r1zero_jax.tasks.Task"):
        tasks.from_config(f"{COUNTDOWN}:reward", "no")


def test_trains_a_task_defined_outside_the_package(tmp_path):
    """The config names a Task subclass in a file of the user's; its warm-up data makes the
    base model, and its reward function (which logs each verdict) runs in the grader workers
    for the held-out eval and every rollout."""
    from r1zero_jax.config import load_config
    from r1zero_jax.rl.trainer import Trainer

    log = tmp_path / "verdicts.jsonl"
    user_file = tmp_path / "my_task.py"
    user_file.write_text(textwrap.dedent(f"""
        import json
        from r1zero_jax import plugins

        base = plugins.load("{COUNTDOWN}:Countdown", "task")
        check = plugins.load("{COUNTDOWN}:reward", "reward")

        def logged_reward(response, answer):
            r = check(response, answer)
            with open("{log}", "a") as f:
                f.write(json.dumps(r[0]) + "\\n")
            return r

        class MyCountdown(base):
            reward_fn = __file__ + ":logged_reward"
    """))
    steps, rollout, held_out = 2, 32, 16
    cfg = load_config("countdown_cpu", [
        f"data.task={user_file}:MyCountdown", f"train.steps={steps}",
        f"rl.rollout_batch_size={rollout}", f"train.minibatch_size={rollout}",
        f"eval.size={held_out}", f"eval.batch_size={held_out}", "eval.every=0",
        "train.warmup_sft_steps=200", "train.warmup_sft_habit_steps=20"])
    summary = Trainer(cfg, str(tmp_path / "run")).run()
    assert summary["steps"] == steps and summary["eval_accuracy_after"] is not None
    verdicts = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(verdicts) == held_out + steps * rollout + held_out
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for k, m in enumerate(metrics):
        step = verdicts[held_out + k * rollout:held_out + (k + 1) * rollout]
        # The learner's reward is the function's, with 0 for a response cut at the length limit.
        assert m["reward_mean"] <= np.mean(step) + 1e-6  # float32 rewards
        assert m["accuracy"] == pytest.approx(np.mean([v >= 1 for v in step]))
    # The warmed-up model writes well-formed expressions: the format reward at least.
    assert np.mean(verdicts[held_out:-held_out]) > 0.05


def test_bad_reward_function_output_scores_zero_with_its_reason(tmp_path):
    """A user's reward function that returns NaN, too many values or a non-number, or raises,
    gives that row 0 with the reason; the other rows are graded as usual."""
    (tmp_path / "bad.py").write_text(textwrap.dedent("""
        def reward(response, answer):
            return {"nan": float("nan"), "four": (1.0, "x", "r", 0), "text": "one",
                    "raise": 1 / 0 if response == "raise" else 1.0}.get(response, 1.0)
    """))

    class Bad(tasks.Task):
        reward_fn = f"{tmp_path / 'bad.py'}:reward"

    responses = ["nan", "four", "text", "raise", "fine"]
    with Bad().pool(workers=1) as pool:
        results = Bad().grade(pool, responses, ["a"] * len(responses))
    assert [r.reward for r in results] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert [r.reason for r in results[:4]] == ["error: ValueError", "error: TypeError",
                                               "error: ValueError", "error: ZeroDivisionError"]
