"""Prompt pipeline: template, tokenize, drop over-long prompts, shuffle per epoch, and hand each
process its share of every global batch, from a position that a checkpoint saves and restores.

All processes see the same stream: epoch e is a permutation of the kept prompts seeded by
(seed, e), epochs are concatenated forever, and the stream is cut into global batches of
`batch_size * process_count` prompts; process p takes the p-th `batch_size` slice of each. So the
processes' slices are disjoint, together cover every epoch, and stay in lockstep (the same number
of batches, whatever the dataset size). The position counts prompts, so one small state serves
every process and survives a change of process count.

A process tokenizes only its own prompts of each batch. Dropping over-long prompts needs every
prompt's length, the same on every process: `count_tokens` may split that count over the
processes (the trainer's gathers each process's share), else this process counts them all.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from r1zero_jax.rewards.templates import apply_template, check_template

log = logging.getLogger(__name__)

Encoder = Callable[[list[str]], list[list[int]]]
TokenCounter = Callable[[Encoder, list[str]], list[int]]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    template: str = "qwen_math"
    max_prompt_tokens: int = 1024
    batch_size: int = 8  # prompts per process per batch
    seed: int = 0
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        check_template(self.template)
        if self.max_prompt_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_prompt_tokens and batch_size must be >= 1: {self}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"process_index {self.process_index} not in [0, {self.process_count})"
            )


def make_encoder(tokenizer: Any) -> Encoder:
    """Batch encoder for a Hugging Face tokenizer (called on a list of texts) or any object with
    `encode(text) -> list[int]`. The tokenizer adds its own special tokens, as transformers and
    vLLM do: Llama 3's prepends <|begin_of_text|>, Qwen's adds none."""
    if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):
        return lambda texts: [list(ids) for ids in tokenizer(texts)["input_ids"]]
    if hasattr(tokenizer, "encode"):
        return lambda texts: [list(tokenizer.encode(t)) for t in texts]
    raise TypeError(f"{type(tokenizer).__name__} is not a tokenizer: it has no encode(text)")


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded tokens int32 [B, T] and mask bool [B, T] (True on real tokens); T is `length`,
    or the longest sequence."""
    longest = max((len(s) for s in seqs), default=0)
    width = longest if length is None else length
    if longest > width:
        raise ValueError(f"a sequence of {longest} tokens does not fit length {width}")
    tokens = np.full((len(seqs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=bool)
    for b, s in enumerate(seqs):
        if len(s):
            tokens[b, width - len(s):] = s
            mask[b, width - len(s):] = True
    return tokens, mask


def _count_tokens(encode: Encoder, prompts: list[str]) -> list[int]:
    return [len(t) for t in encode(prompts)]


class PromptPipeline:
    """Endless iterator of this process's batches: dicts with `prompt_tokens` (list of B token
    lists), `prompts`, `problems`, `answers` (as given) and `indices` (positions in `rows`)."""

    def __init__(self, rows: Sequence[dict], tokenizer: Any, config: PipelineConfig,
                 prompt: Callable[[dict], str] | None = None,
                 count_tokens: TokenCounter | None = None):
        """`prompt`: a row's prompt text (a task's); by default `config.template` applied to the
        row's problem. `count_tokens(encode, prompts)`: every prompt's token count, the same on
        every process; by default encoded here."""
        self.config = config
        prompt = prompt or (lambda r: apply_template(config.template, r["problem"]))
        prompts = [prompt(r) for r in rows]
        self._encode = make_encoder(tokenizer)
        lengths = (count_tokens or _count_tokens)(self._encode, prompts)
        keep = [i for i, n in enumerate(lengths) if n <= config.max_prompt_tokens]
        self.num_skipped = len(rows) - len(keep)
        if self.num_skipped:
            log.warning(
                "skipped %d of %d prompts longer than %d tokens (longest %d)",
                self.num_skipped, len(rows), config.max_prompt_tokens, max(lengths),
            )
        if not keep:
            raise ValueError(f"no prompt fits max_prompt_tokens={config.max_prompt_tokens} "
                             f"({len(rows)} rows)")
        self._rows = [rows[i] for i in keep]
        self._prompts = [prompts[i] for i in keep]
        self._indices = keep
        self._epoch, self._position = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def num_prompts(self) -> int:
        return len(self._rows)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state(self) -> dict:
        """The position of the next batch, JSON-able; the same on every process."""
        return {"epoch": self._epoch, "position": self._position,
                "seed": self.config.seed, "num_prompts": self.num_prompts}

    def restore(self, state: dict) -> None:
        if (state["seed"], state["num_prompts"]) != (self.config.seed, self.num_prompts):
            raise ValueError(
                f"pipeline state was saved for seed {state['seed']} and {state['num_prompts']} "
                f"prompts; this pipeline has seed {self.config.seed} and {self.num_prompts}"
            )
        if not 0 <= state["position"] < self.num_prompts or state["epoch"] < 0:
            raise ValueError(f"pipeline state out of range: {state}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        b, p = self.config.batch_size, self.config.process_index
        mine = self._advance(b * self.config.process_count)[p * b:(p + 1) * b]
        return {
            "prompt_tokens": self._encode([self._prompts[i] for i in mine]),
            "prompts": [self._prompts[i] for i in mine],
            "problems": [self._rows[i]["problem"] for i in mine],
            "answers": [self._rows[i]["answer"] for i in mine],
            "indices": [self._indices[i] for i in mine],
        }

    def _advance(self, count: int) -> list[int]:
        """The next `count` prompts of the global stream (crossing epochs), consumed."""
        out: list[int] = []
        while len(out) < count:
            if self._perm_epoch != self._epoch:
                rng = np.random.default_rng([self.config.seed, self._epoch])
                self._perm, self._perm_epoch = rng.permutation(self.num_prompts), self._epoch
            take = self._perm[self._position:self._position + count - len(out)]
            out.extend(take.tolist())
            self._position += len(take)
            if self._position == self.num_prompts:
                self._epoch, self._position = self._epoch + 1, 0
        return out
