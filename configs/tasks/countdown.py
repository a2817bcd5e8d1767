"""Countdown as a task of your own (outside the package): reach a target from a few numbers
with + - * and parentheses, each number used once. Named in a config by its path,
`data.task="configs/tasks/countdown.py:Countdown"` (see configs/countdown_cpu.py).

The reward is an exact checker, as in TinyZero's countdown: 1.0 for an expression that uses
exactly the given numbers and equals the target, 0.1 for a well-formed expression of the given
numbers that misses it, else 0. The response is parsed by `ast` into a tree of numbers, + - *
and parentheses and evaluated exactly: nothing else is accepted and nothing is `eval`ed.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import os

import numpy as np

from r1zero_jax.data.synthetic import SyntheticTokenizer
from r1zero_jax.tasks import Task

PIECES = ("make", "from", "+", "-", "*", "(", ")", " ", *"0123456789")
MAX_CHARS = 64  # longer responses are not read
FORMAT_REWARD = 0.1
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def _value(node, used: list[int]) -> int:
    """The exact value of an expression tree of non-negative integers and + - *."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left, used), _value(node.right, used))
    raise ValueError("not an expression of numbers and + - *")


def reward(response: str, answer: str) -> tuple[float, str | None]:
    """`answer` is "NUMBERS=TARGET", e.g. "3 5 7=22"; returns (reward, the expression)."""
    numbers, target = answer.split("=")
    if len(response) > MAX_CHARS:
        return 0.0, None
    expr = response.strip()
    if not expr or set(expr) - set("0123456789+-*() "):
        return 0.0, None
    try:
        used: list[int] = []
        value = _value(ast.parse(expr, mode="eval").body, used)
    except (SyntaxError, ValueError, RecursionError):
        return 0.0, None
    if sorted(used) != sorted(map(int, numbers.split())):
        return 0.0, expr
    return (1.0 if value == int(target) else FORMAT_REWARD), expr


class Countdown(Task):
    name = "countdown"
    reward_fn = f"{os.path.abspath(__file__)}:reward"

    def prompt(self, row: dict) -> str:
        return row["problem"]

    def tokenizer(self):
        return SyntheticTokenizer(PIECES)

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        return countdown_rows(split, size, seed)

    def warmup_data(self):
        return CountdownWarmup(countdown_rows("train", 0, 0))


def countdown_rows(split: str, size: int, seed: int) -> list[dict]:
    """Three digits 1-9 and a target that one way of combining them gives (its `solution`);
    10% held out."""
    out = []
    for i, nums in enumerate(itertools.product(range(1, 10), repeat=3)):
        if ((i * 2654435761 % 2**32) / 2**32 < 0.1) != (split == "eval"):
            continue
        a, b, c = nums
        solution = (f"{a}*{b}+{c}", f"{a}+{b}*{c}", f"{a}*{b}-{c}")[i % 3]
        target = _value(ast.parse(solution, mode="eval").body, [])
        if target <= 0 or target == a + b + c:
            continue  # the warm-up's guess (the sum) would be right
        text = " ".join(map(str, nums))
        out.append({"problem": f"make {target} from {text} ", "answer": f"{text}={target}",
                    "solution": solution})
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order[:size or len(out)]]


@dataclasses.dataclass(frozen=True)
class CountdownWarmup:
    """Supervised data for a weak base model: the solution, or (with `guess_share`) the numbers
    simply added up, well formed but wrong. The base model can solve but mostly guesses."""

    rows: list
    guess_share: float = 0.75

    def skill_only(self) -> CountdownWarmup:
        return dataclasses.replace(self, guess_share=0.0)

    def warmup_length(self, tokenizer) -> int:
        return max(len(tokenizer.encode(r["problem"] + r["solution"])) for r in self.rows) + 1

    def warmup_batch(self, tokenizer, batch: int, rng: np.random.Generator, length: int):
        """tokens int32 [B, length], loss mask bool [B, length] on the response and its EOS."""
        tokens = np.zeros((batch, length), np.int32)
        loss_mask = np.zeros((batch, length), bool)
        for i in range(batch):
            row = self.rows[rng.integers(len(self.rows))]
            guess = "+".join(row["answer"].split("=")[0].split())
            response = guess if rng.random() < self.guess_share else row["solution"]
            p = tokenizer.encode(row["problem"])
            seq = p + tokenizer.encode(response) + [tokenizer.eos_token_id]
            tokens[i, :len(seq)] = seq
            loss_mask[i, len(p):len(seq)] = True
        return tokens, loss_mask
