"""The one generation path: token prompts -> sampler calls -> one `Rollout`.

RL rollouts, the trainer's held-out eval, `r1zero-jax eval` and `r1zero-jax generate` all call
`generate`. It owns what every caller used to do its own way:

- chunking: `prompts_per_call` prompts per sampler call, the last call topped up with copies of
  its last prompt (dropped on return), so one prompt count compiles; or continuous batching
  over `decode_slots` slots;
- padding: one width rule (`sampler.prompt_width`) per call; the returned prompt arrays are
  left-padded to the widest call (the learner's input width);
- randomness: one key for the whole rollout; the sampler derives each row's stream from it,
  the row's index in the rollout and the step, so results depend neither on the calls, the
  slots (continuous batching), the mesh, the padding nor the processes;
- process-local prompts (`local=True`, training): each process passes only its data slice's
  prompts (`sharding.data_slice`: slice i holds prompts [i*B, (i+1)*B) of the rollout) and gets
  back only their rows; `prompts_per_call` stays the global count per call;
- `SamplingParams` from a run config (`sampling_params`).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import jax
import numpy as np

from r1zero_jax import sharding as shd
from r1zero_jax.data.pipeline import left_pad
from r1zero_jax.sampling.sampler import (Rollout, SamplingParams, prompt_width, rollout_report,
                                         sample)


def sampling_params(s, *, n: int, stop_strings: Sequence[str] = (), greedy: bool = False,
                    max_new_tokens: int = 0) -> SamplingParams:
    """SamplingParams of a `SamplingConfig` (greedy: temperature 0, no top-k/top-p); the stop
    strings are the task's; the tokenizer's end tokens are added by the sampler."""
    return SamplingParams(
        max_new_tokens=max_new_tokens or s.max_new_tokens,
        temperature=0.0 if greedy else s.temperature,
        top_p=1.0 if greedy else s.top_p, top_k=0 if greedy else s.top_k, n=n,
        stop_strings=tuple(stop_strings))


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr))
    return 0


def generate(model, prompt_tokens: Sequence[Sequence[int]], params: SamplingParams, *, tokenizer,
             mesh, seed: Any, prompts_per_call: int = 0, decode_slots: int = 0,
             page_size: int = 0, cache_pages: int = 0, local: bool = False,
             on_call: Callable[[int, Rollout], None] | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> Rollout:
    """`params.n` samples of each prompt (token lists, no padding), row p*n + j being sample j
    of prompt p. `decode_slots` > 0: one continuous batch over all rows on that many slots
    (sampling/continuous.py; `page_size` > 0 pages its cache, `cache_pages` pages); else
    static calls of `prompts_per_call` prompts (0: all in one). Both give every row the same
    tokens: one key, each row's stream keyed by its index in the rollout. `seed`: an int or a
    JAX key. `on_call(first_prompt, rollout)` sees each call's rollout as it finishes (grading
    while the next call samples); `on_progress(rows, tokens)` gets the finished rows and
    generated tokens of the rollout so far from inside long calls (progress lines). The
    returned Rollout's `report` is `sampler.rollout_report` over the calls (generated tokens of
    every slice). local: `prompt_tokens` are this process's data slice, every slice the same
    count, and the Rollout holds their rows only (progress counts them too)."""
    from r1zero_jax.sampling.continuous import sample_continuous

    if not len(prompt_tokens):
        raise ValueError("generate needs at least one prompt")
    empty = [i for i, p in enumerate(prompt_tokens) if not len(p)]
    if empty:
        raise ValueError(f"prompts {empty[:10]} have no tokens")
    # A raw uint32 key: a typed key made from an int cannot be placed on a multi-process mesh.
    key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
    # fold_in(key, 0) is what a one-call rollout always drew under: its samples stay as they were.
    key = jax.random.fold_in(key, 0)
    count, pad = len(prompt_tokens), pad_id(tokenizer)
    index, slices = shd.data_slice(mesh) if local else (0, 1)
    if slices > 1:  # a different count would mean different calls: a hang, not an error
        counts = shd.allgather_json(count)
        if len(set(counts)) > 1:
            raise ValueError(f"process-local prompts must be as many on every process, got "
                             f"{counts}")
        if prompts_per_call % slices:
            raise ValueError(f"prompts_per_call={prompts_per_call} does not split over "
                             f"{slices} data slices (processes)")
    first = index * count  # this slice's first prompt in the rollout
    parts = []
    if decode_slots:
        ptok, pmask = left_pad(prompt_tokens, pad, prompt_width(max(map(len, prompt_tokens))))
        parts.append(sample_continuous(model, ptok, pmask, params, seed=key, mesh=mesh,
                                       slots=decode_slots, tokenizer=tokenizer,
                                       page_size=page_size, pages=cache_pages, local=local,
                                       on_progress=on_progress))
        if on_call is not None:
            on_call(0, parts[0])
    else:
        per_call = min(prompts_per_call // slices or count, count)
        rows_before = tokens_before = 0
        for start in range(0, count, per_call):
            batch = [prompt_tokens[i]
                     for i in np.minimum(np.arange(start, start + per_call), count - 1)]
            ptok, pmask = left_pad(batch, pad, prompt_width(max(map(len, batch))))
            real = min(per_call, count - start) * params.n

            def report(rows, tokens, r0=rows_before, t0=tokens_before, n=real):
                on_progress(r0 + min(rows, n), t0 + tokens)  # this call's counts, rollout-wide

            out = sample(model, ptok, pmask, params, seed=key, mesh=mesh, tokenizer=tokenizer,
                         prompt_ids=first + start + np.arange(per_call), local=local,
                         on_progress=report if on_progress is not None else None)
            out = out.take(slice(0, real)) if real < out.size else out
            rows_before += real
            tokens_before += int(out.lengths.sum())
            if on_call is not None:
                on_call(start, out)
            parts.append(out)
    rollout = parts[0] if len(parts) == 1 else Rollout.concat(parts)
    # Slot utilization counts the copies that top up a last static call as idle slots.
    generated = rollout.lengths.sum(keepdims=True)
    if local:  # every slice's tokens
        generated = shd.gather_slices(mesh, generated)
    rollout.report = rollout_report([p.timings for p in parts], int(generated.sum()))
    return rollout
