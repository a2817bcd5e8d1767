"""The one generation path: token prompts -> sampler calls -> one `Rollout`.

RL rollouts, the trainer's held-out eval, `r1zero-jax eval` and `r1zero-jax generate` all call
`generate`. It owns what every caller used to do its own way:

- chunking: `prompts_per_call` prompts per sampler call, the last call topped up with copies of
  its last prompt (dropped on return), so one prompt count compiles;
- padding: one width rule (`sampler.prompt_width`) per call; the returned prompt arrays are
  left-padded to the widest call (the learner's input width);
- randomness: call c samples under fold_in(key, c); the sampler derives each row's stream from
  that key, the row and the step, so results do not depend on the mesh or the padding;
- `SamplingParams` from a run config (`sampling_params`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from r1zero_jax.data.pipeline import left_pad
from r1zero_jax.sampling.sampler import Rollout, SamplingParams, prompt_width, sample


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
             mesh, seed: Any, prompts_per_call: int = 0,
             on_call: Callable[[int, Rollout], None] | None = None) -> Rollout:
    """`params.n` samples of each prompt (token lists, no padding), row p*n + j being sample j
    of prompt p; `prompts_per_call` 0 samples all prompts in one call. `seed`: an int or a JAX
    key. `on_call(first_prompt, rollout)` sees each call's rollout as it finishes (progress,
    grading while the next call samples)."""
    if not len(prompt_tokens):
        raise ValueError("generate needs at least one prompt")
    empty = [i for i, p in enumerate(prompt_tokens) if not len(p)]
    if empty:
        raise ValueError(f"prompts {empty[:10]} have no tokens")
    # A raw uint32 key: a typed key made from an int cannot be placed on a multi-process mesh.
    key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
    count = len(prompt_tokens)
    per_call = min(prompts_per_call or count, count)
    parts = []
    for c, start in enumerate(range(0, count, per_call)):
        batch = [prompt_tokens[i]
                 for i in np.minimum(np.arange(start, start + per_call), count - 1)]
        ptok, pmask = left_pad(batch, pad_id(tokenizer), prompt_width(max(map(len, batch))))
        out = sample(model, ptok, pmask, params, seed=jax.random.fold_in(key, c), mesh=mesh,
                     tokenizer=tokenizer)
        real = min(per_call, count - start) * params.n
        out = out.take(slice(0, real)) if real < out.size else out
        if on_call is not None:
            on_call(start, out)
        parts.append(out)
    return parts[0] if len(parts) == 1 else Rollout.concat(parts)
