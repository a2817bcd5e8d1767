"""Tasks: what RL and evaluation need to know about a problem set.

A task gives the prompt for a row, the stop strings, and the rewards of responses. Rewards come
from a reward function that grader worker processes run (untrusted text is read only there,
under a CPU budget; see rewards/pool.py): `fn(response: str, answer, **kwargs)` returning the
reward, or (reward, extracted answer[, reason]). A reward of 1.0 is a solved problem (accuracy
counts those); anything less, such as a format bonus, only shapes the advantage.

The math task (`data.task="math"`) is the paper's. A task of your own is a `Task` subclass in your
own file, named in the config by import path, `data.task="configs/tasks/countdown.py:Countdown"`
(see configs/countdown_cpu.py); it may bring its rows, its tokenizer and warm-up data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from r1zero_jax import plugins
from r1zero_jax.rewards.math_grader import MATH_REWARD
from r1zero_jax.rewards.pool import GraderPool, GradeResult
from r1zero_jax.rewards.templates import STOP_STRINGS, apply_template, check_template


class Task:
    """The interface; subclasses set `reward_fn` and `prompt`, and may override the rest."""

    name = "task"
    reward_fn = ""  # import spec of the reward function (see module docstring)
    stop_strings: tuple[str, ...] = ()  # a response ends after one (kept in its text)

    def prompt(self, row: dict) -> str:
        """The prompt text for a row."""
        raise NotImplementedError

    def rows(self, split: str, size: int, seed: int) -> list[dict] | None:
        """The task's own rows ({problem, answer} or any JSON-able answer) for "train" or "eval",
        `size` of them (0: all); None: the config's data source."""
        return None

    def tokenizer(self):
        """The task's own tokenizer; None: the model's."""
        return None

    def warmup_data(self):
        """Data for the supervised warm-up stage that makes a weak base model of a random one
        (rl/warmup.py says what it must offer); None: the task has none."""
        return None

    def pool(self, workers: int | None = None, timeout_s: float = 2.0) -> GraderPool:
        """A grader pool running this task's reward function."""
        return GraderPool(workers, timeout_s=timeout_s, reward_fn=self.reward_fn)

    def grade(self, pool: GraderPool, responses: Sequence[str], answers: Sequence
              ) -> list[GradeResult]:
        return pool.grade(responses, answers, template=None)


class MathTask(Task):
    """Problems with a reference answer, graded by mathematical equivalence of the final
    answer (rewards/math_grader.py); prompts and answer extraction follow the template."""

    name = "math"
    reward_fn = MATH_REWARD

    def __init__(self, template: str = "qwen_math"):
        self.template = check_template(template)
        self.stop_strings = STOP_STRINGS[template]

    def prompt(self, row: dict) -> str:
        return apply_template(self.template, row["problem"])

    def warmup_data(self):
        from r1zero_jax.data.synthetic import SyntheticTask

        return SyntheticTask()  # for data.source="synthetic" (config.validate checks)

    def grade(self, pool, responses, answers):
        return pool.grade(responses, answers, self.template)


@dataclasses.dataclass
class Scores:
    """Rewards of R responses as the task's reward function gave them."""

    rewards: np.ndarray  # float32 [R]
    timed_out: np.ndarray  # bool [R]: scored 0 because grading used up its CPU budget
    extracted: list  # [R] the answer found, or None
    worker_deaths: int  # grader workers lost while grading

    @property
    def correct(self) -> np.ndarray:
        """bool [R]: solved (a reward of 1.0)."""
        return self.rewards >= 1.0


def score(task: Task, pool: GraderPool, responses: Sequence[str], answers: Sequence, *,
          peers: Sequence[int] | None = None) -> Scores:
    """The task's verdicts on `responses`. In a multi-process run the processes holding these
    same rows (`peers`, process indices; default every process) each grade a contiguous share and
    the verdicts are gathered: the grading CPU time spreads over the hosts instead of being spent
    on each. A process alone with its rows (a training data slice) grades them all itself."""
    from r1zero_jax.sharding import allgather_json

    count, rank = _processes()
    peers = list(range(count)) if peers is None else list(peers)
    share = -(-len(responses) // len(peers))
    at = peers.index(rank)
    lo, hi = min(at * share, len(responses)), min((at + 1) * share, len(responses))
    deaths = pool.worker_deaths
    results = task.grade(pool, responses[lo:hi], answers[lo:hi]) if hi > lo else []
    mine = {"reward": [r.reward for r in results], "timed_out": [r.timed_out for r in results],
            "extracted": [r.extracted for r in results], "deaths": pool.worker_deaths - deaths}
    parts = [mine]
    if len(peers) > 1:  # every process gathers or none does: the slices are all alike
        everyone = allgather_json(mine)
        parts = [everyone[p] for p in peers]
    cat = lambda k: [x for p in parts for x in p[k]]  # noqa: E731
    return Scores(rewards=np.asarray(cat("reward"), np.float32),
                  timed_out=np.asarray(cat("timed_out"), bool), extracted=cat("extracted"),
                  worker_deaths=sum(p["deaths"] for p in parts))


def _processes() -> tuple[int, int]:
    import jax

    return jax.process_count(), jax.process_index()


def from_config(spec: str, template: str) -> Task:
    """The task `data.task` names: "math" (with `data.template`) or an import spec of a Task
    subclass (constructed without arguments)."""
    if spec == "math":
        return MathTask(template)
    cls = plugins.load(spec, "data.task")
    task = cls() if isinstance(cls, type) else cls
    if not isinstance(task, Task):
        raise ValueError(f"data.task={spec!r} is a {type(task).__name__}, "
                         "not a r1zero_jax.tasks.Task")
    plugins.check_spec(task.reward_fn, f"{spec}.reward_fn")
    return task
