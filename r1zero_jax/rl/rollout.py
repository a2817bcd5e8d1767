"""Rollouts: prompts -> sampler (same mesh, same weights) -> decoded text -> rewards -> advantages.

Host-side glue around the sampler and the grader. R = P prompts x G samples; row p*G + j is
sample j of prompt p, so groups are consecutive rows. Arrays are numpy on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from r1zero_jax.data.pipeline import left_pad


@dataclasses.dataclass
class RolloutBatch:
    prompt_tokens: np.ndarray  # int32 [R, Tp] left-padded
    prompt_mask: np.ndarray  # bool [R, Tp]
    tokens: np.ndarray  # int32 [R, Tn] response, right-padded to max_new_tokens
    mask: np.ndarray  # bool [R, Tn] generated tokens
    sampler_logp: np.ndarray  # float32 [R, Tn]
    lengths: np.ndarray  # int32 [R]
    truncated: np.ndarray  # bool [R] cut at max_new_tokens
    texts: list[str]
    answers: list[Any]
    correct: np.ndarray | None = None  # bool [R], set by `grade`
    rewards: np.ndarray | None = None  # float32 [R], truncated responses get 0
    grader_timed_out: np.ndarray | None = None  # bool [R] scored 0: grading CPU budget used up
    grader_worker_deaths: int = 0  # grader workers lost while grading this batch, set by `grade`
    report: dict = dataclasses.field(default_factory=dict)  # sampler.rollout_report

    @property
    def size(self) -> int:
        return len(self.texts)

    def learner_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """tokens int32 [R, Tp + Tn] (prompt ++ response) and their mask."""
        return (np.concatenate([self.prompt_tokens, self.tokens], axis=1),
                np.concatenate([self.prompt_mask, self.mask], axis=1))


def prompt_length_bucket(longest: int, limit: int) -> int:
    """Prompt width: the next power of two >= longest (>= 8), capped at `limit`, so only a few
    shapes compile."""
    width = 8
    while width < longest:
        width *= 2
    return min(width, max(limit, longest))


def prompt_arrays(prompt_tokens: Sequence[Sequence[int]], pad_id: int, limit: int):
    width = prompt_length_bucket(max(len(p) for p in prompt_tokens), limit)
    return left_pad(prompt_tokens, pad_id, width)


def _pad_to(x: np.ndarray, width: int, value) -> np.ndarray:
    if x.shape[1] > width:
        raise ValueError(f"sampler returned {x.shape[1]} new tokens, more than max_new_tokens={width}")
    return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def generate(model, prompt_tokens: Sequence[Sequence[int]], answers: Sequence[Any], *, params,
             tokenizer, mesh, seed, prompts_per_call: int = 0, decode_slots: int = 0,
             max_prompt_tokens: int) -> RolloutBatch:
    """Sample `params.n` responses per prompt (`params` is the sampler's SamplingParams), reading
    the model's arrays in place; answers repeat per sample. decode_slots > 0: one continuous
    batch over the whole rollout (sampling/continuous.py), else static calls of
    `prompts_per_call` prompts; both give each row the same tokens (one seed, keyed by row)."""
    from r1zero_jax.sampling.continuous import sample_continuous
    from r1zero_jax.sampling.sampler import rollout_report, sample

    n, width = params.n, params.max_new_tokens
    per_call = prompts_per_call or len(prompt_tokens)
    ptok, pmask = prompt_arrays(prompt_tokens, tokenizer.pad_token_id, max_prompt_tokens)
    if decode_slots:
        parts = [sample_continuous(model, ptok, pmask, params, seed=seed, mesh=mesh,
                                   slots=decode_slots, tokenizer=tokenizer)]
    else:
        parts = [sample(model, ptok[start:start + per_call], pmask[start:start + per_call],
                        params, seed=seed, mesh=mesh, tokenizer=tokenizer, row_offset=start * n)
                 for start in range(0, len(prompt_tokens), per_call)]
    # Rollout fields are host arrays already (the sampler gathers them on every process).
    tokens = np.concatenate([_pad_to(p.tokens, width, tokenizer.pad_token_id) for p in parts])
    mask = np.concatenate([_pad_to(p.mask, width, False) for p in parts])
    logp = np.concatenate([_pad_to(p.logprobs.astype(np.float32), width, 0.0) for p in parts])
    lengths = np.concatenate([p.lengths for p in parts]).astype(np.int32)
    finish = np.concatenate([np.asarray(p.finish_reason) for p in parts])
    # The sampler's texts are cut right after a stop string (the r1 template's </answer>).
    texts = [t for p in parts for t in p.texts]
    return RolloutBatch(
        prompt_tokens=np.repeat(ptok, n, axis=0), prompt_mask=np.repeat(pmask, n, axis=0),
        tokens=tokens, mask=mask, sampler_logp=logp, lengths=lengths,
        truncated=finish == "length", texts=texts,
        answers=[a for a in answers for _ in range(n)],
        report=rollout_report([p.timings for p in parts], int(lengths.sum())))


def grade(batch: RolloutBatch, template: str, pool) -> RolloutBatch:
    """Rewards from the real grader; a response cut at the length limit gets 0."""
    from r1zero_jax.rewards.pool import grade_responses

    deaths = pool.worker_deaths if pool is not None else 0
    results = grade_responses(batch.texts, batch.answers, template, pool=pool)
    rewards = np.asarray([r.reward for r in results], np.float32)
    batch.grader_timed_out = np.asarray([r.timed_out for r in results], bool)
    batch.grader_worker_deaths = pool.worker_deaths - deaths if pool is not None else 0
    batch.correct = rewards > 0
    batch.rewards = np.where(batch.truncated, 0.0, rewards).astype(np.float32)
    return batch
