"""A synthetic math task with a tokenizer built in code: the offline CPU main job's world.

Problems are two-digit additions, `"37+45="`, answered in `\\boxed{}` and graded by the real
grader. The tokenizer has the encode/decode interface of a Hugging Face tokenizer.

A randomly initialised model earns no reward, so the main job first makes a weak "base model"
by a short supervised warm-up on responses of several styles (weights configurable):

- `guess`:   `\\boxed{81}` straight away, with an answer that is always off by 1-3 (wrong);
- `worked`:  digit by digit with carries, `7+5=12 3+4+1=8 \\boxed{82}` (right);
- `recheck`: worked, then ` recheck ` and the same work again (right, twice as long, and
  using one of the paper's self-reflection keywords);
- `ramble`:  `hmm ` repeated 1-6 times, then a guess (wrong, variable length).

The base model guesses most of the time, so its greedy accuracy is near zero, while sampling
finds worked answers often enough for RL to learn that working pays. Response length is free to
vary (guesses are short, rambles and rechecks long), which the length-bias study needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SPECIALS = ("<pad>", "<eos>")
PIECES = ("\\boxed{", "recheck", "hmm", "}", "+", "=", " ", *"0123456789")


class SyntheticTokenizer:
    """Greedy longest-match tokenizer over a fixed list of pieces (HF-like interface)."""

    def __init__(self):
        self.vocab = list(SPECIALS) + list(PIECES)
        self._ids = {p: i for i, p in enumerate(self.vocab)}
        self._by_len = sorted(PIECES, key=len, reverse=True)
        self.pad_token, self.eos_token = SPECIALS
        self.pad_token_id, self.eos_token_id = 0, 1
        self.bos_token_id = None
        self.all_special_ids = [0, 1]

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        del add_special_tokens  # no BOS in this vocabulary
        ids, i = [], 0
        while i < len(text):
            for p in self._by_len:
                if text.startswith(p, i):
                    ids.append(self._ids[p])
                    i += len(p)
                    break
            else:
                raise ValueError(f"synthetic tokenizer cannot encode {text[i]!r} in {text!r}")
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.all_special_ids:
                continue
            out.append(self.vocab[i] if 0 <= i < len(self.vocab) else "")
        return "".join(out)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._ids[token]

    def __call__(self, texts, add_special_tokens: bool = False):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(t) for t in texts]}


@dataclass(frozen=True)
class SyntheticTask:
    """Two-digit additions; `eval_fraction` of all problems is held out (disjoint by hash)."""

    low: int = 10
    high: int = 99
    eval_fraction: float = 0.1
    styles: tuple[tuple[str, float], ...] = (("guess", 0.55), ("worked", 0.25),
                                             ("recheck", 0.1), ("ramble", 0.1))

    def problems(self, split: str) -> list[tuple[int, int]]:
        """All (a, b) of a split ("train" or "eval"), in a fixed order."""
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
        pairs = [(a, b) for a in range(self.low, self.high + 1) for b in range(self.low, self.high + 1)]
        # A fixed pseudo-random split (Knuth multiplicative hash), the same on every machine.
        held = [((a * 131 + b) * 2654435761 % 2**32) / 2**32 < self.eval_fraction for a, b in pairs]
        return [p for p, h in zip(pairs, held) if h == (split == "eval")]

    def rows(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """Rows {"problem", "answer"} like the real datasets; shuffled by `seed`, first n."""
        probs = self.problems(split)
        order = np.random.default_rng(seed).permutation(len(probs))
        probs = [probs[i] for i in order[: n or len(probs)]]
        return [{"problem": question(a, b), "answer": str(a + b)} for a, b in probs]

    def warmup_response(self, a: int, b: int, rng: np.random.Generator) -> str:
        names, weights = zip(*self.styles)
        style = names[rng.choice(len(names), p=np.asarray(weights) / sum(weights))]
        if style == "guess":
            return guess(a, b, rng)
        if style == "worked":
            return worked(a, b)
        if style == "recheck":
            return worked(a, b, boxed=False) + " recheck " + worked(a, b)
        if style == "ramble":
            return "hmm " * int(rng.integers(1, 7)) + guess(a, b, rng)
        raise ValueError(f"unknown style {style!r}; styles are guess, worked, recheck, ramble")

    def warmup_batch(self, tokenizer: SyntheticTokenizer, batch: int, rng: np.random.Generator,
                     length: int):
        """Supervised warm-up batch: tokens int32[B, length], loss mask bool[B, length] over the
        response and its EOS (targets are tokens shifted by one), right-padded."""
        probs = self.problems("train")
        tokens = np.zeros((batch, length), np.int32)
        loss_mask = np.zeros((batch, length), bool)
        for i in range(batch):
            a, b = probs[rng.integers(len(probs))]
            p = tokenizer.encode(question(a, b))
            r = tokenizer.encode(self.warmup_response(a, b, rng)) + [tokenizer.eos_token_id]
            seq = (p + r)[:length]
            tokens[i, : len(seq)] = seq
            loss_mask[i, len(p): len(seq)] = True
        return tokens, loss_mask

    def replace(self, **kw) -> "SyntheticTask":
        return dataclasses.replace(self, **kw)


def question(a: int, b: int) -> str:
    return f"{a}+{b}="


def guess(a: int, b: int, rng: np.random.Generator) -> str:
    off = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
    return f"\\boxed{{{a + b + off}}}"


def worked(a: int, b: int, boxed: bool = True) -> str:
    """Column addition, units first: `7+5=12 3+4+1=8 \\boxed{82}`."""
    steps, carry = [], 0
    for da, db in zip(reversed(str(a)), reversed(str(b))):
        s = int(da) + int(db) + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    text = " ".join(steps)
    return text + (f" \\boxed{{{a + b}}}" if boxed else "")
