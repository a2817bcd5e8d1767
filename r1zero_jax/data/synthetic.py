"""A synthetic math task with a tokenizer built in code: the offline CPU main job's world.

Problems are sums of single digits, `"3+5+4="`, answered in `\\boxed{}` and graded by the real
grader. The tokenizer has the encode/decode interface of a Hugging Face tokenizer.

A randomly initialised model earns no reward, so the main job first makes a weak "base model"
by a short supervised warm-up (rl/warmup.py): worked answers only, then responses of several
styles (weights configurable):

- `guess`:   `\\boxed{17}` straight away, a number drawn without looking at the problem (wrong);
- `worked`:  a running sum, `3+5=8 8+4=12 \\boxed{12}` (right);
- `recheck`: worked, then ` recheck ` and the same work again (right, twice as long, and
  using one of the paper's self-reflection keywords);
- `ramble`:  `hmm ` repeated 1-6 times, then a guess (wrong, variable length).

The base model can add but guesses most of the time, so its greedy accuracy is low (about 16%),
while sampling finds worked answers often enough for RL to learn that working pays. Response
length is free to vary (guesses are short, rambles and rechecks long), which the length-bias
study needs. 1,000 problems: 900 train, 100 held out.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

SPECIALS = ("<pad>", "<eos>")
PIECES = ("\\boxed{", "recheck", "hmm", "}", "+", "=", " ", *"0123456789")


class SyntheticTokenizer:
    """Greedy longest-match tokenizer over a fixed list of pieces (HF-like interface); ids 0
    and 1 are <pad> and <eos>, then `pieces` in order."""

    def __init__(self, pieces: tuple[str, ...] = PIECES):
        self.vocab = list(SPECIALS) + list(pieces)
        self._ids = {p: i for i, p in enumerate(self.vocab)}
        self._by_len = sorted(pieces, key=len, reverse=True)
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
    """Sums of `num_terms` digits from 0 to `max_digit`; `eval_fraction` of all problems is
    held out (a fixed pseudo-random split, disjoint from training)."""

    num_terms: int = 3
    max_digit: int = 9
    eval_fraction: float = 0.1
    styles: tuple[tuple[str, float], ...] = (("guess", 0.5), ("worked", 0.3),
                                             ("recheck", 0.1), ("ramble", 0.1))

    def problems(self, split: str) -> list[tuple[int, ...]]:
        """All digit tuples of a split ("train" or "eval"), in a fixed order."""
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
        out = []
        for i, terms in enumerate(itertools.product(range(self.max_digit + 1),
                                                    repeat=self.num_terms)):
            held = (i * 2654435761 % 2**32) / 2**32 < self.eval_fraction  # Knuth's hash
            if held == (split == "eval"):
                out.append(terms)
        return out

    def rows(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """Rows {"problem", "answer"} like the real datasets; shuffled by `seed`, first n."""
        probs = self.problems(split)
        order = np.random.default_rng(seed).permutation(len(probs))
        probs = [probs[i] for i in order[: n or len(probs)]]
        return [{"problem": question(t), "answer": str(sum(t))} for t in probs]

    def skill_only(self) -> SyntheticTask:
        """The task with worked answers only: the warm-up's skill phase."""
        return dataclasses.replace(self, styles=(("worked", 0.8), ("recheck", 0.2)))

    def warmup_response(self, terms: tuple[int, ...], rng: np.random.Generator) -> str:
        names, weights = zip(*self.styles, strict=False)
        style = names[rng.choice(len(names), p=np.asarray(weights) / sum(weights))]
        if style == "guess":
            return self.guess(terms, rng)
        if style == "worked":
            return worked(terms)
        if style == "recheck":
            return worked(terms, boxed=False) + " recheck " + worked(terms)
        if style == "ramble":
            return "hmm " * int(rng.integers(1, 7)) + self.guess(terms, rng)
        raise ValueError(f"unknown style {style!r}; styles are guess, worked, recheck, ramble")

    def guess(self, terms: tuple[int, ...], rng: np.random.Generator) -> str:
        """A number drawn without looking at the problem, never the right one."""
        wrong = [v for v in range(self.max_digit * self.num_terms + 1) if v != sum(terms)]
        return f"\\boxed{{{wrong[rng.integers(len(wrong))]}}}"

    def warmup_length(self, tokenizer: SyntheticTokenizer) -> int:
        """Tokens in the longest warm-up sequence (prompt + response + EOS)."""
        terms = (self.max_digit,) * self.num_terms
        longest = max(
            len(tokenizer.encode(worked(terms, boxed=False) + " recheck " + worked(terms))),
            len(tokenizer.encode("hmm " * 6 + f"\\boxed{{{self.max_digit * self.num_terms}}}")))
        return len(tokenizer.encode(question(terms))) + longest + 1

    def warmup_batch(self, tokenizer: SyntheticTokenizer, batch: int, rng: np.random.Generator,
                     length: int):
        """Supervised warm-up batch: tokens int32[B, length], loss mask bool[B, length] over the
        response and its EOS (the targets; the model predicts them from the previous position),
        right-padded."""
        probs = self.problems("train")
        tokens = np.zeros((batch, length), np.int32)
        loss_mask = np.zeros((batch, length), bool)
        for i in range(batch):
            terms = probs[rng.integers(len(probs))]
            p = tokenizer.encode(question(terms))
            r = tokenizer.encode(self.warmup_response(terms, rng)) + [tokenizer.eos_token_id]
            seq = (p + r)[:length]
            tokens[i, : len(seq)] = seq
            loss_mask[i, len(p): len(seq)] = True
        return tokens, loss_mask


def question(terms: tuple[int, ...]) -> str:
    return "+".join(map(str, terms)) + "="


def worked(terms: tuple[int, ...], boxed: bool = True) -> str:
    """A running sum, one addition per step: `3+5=8 8+4=12 \\boxed{12}`."""
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return " ".join(steps) + (f" \\boxed{{{total}}}" if boxed else "")
