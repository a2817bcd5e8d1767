"""`r1zero-jax generate`: prompts in, sampled completions out (JSONL or printed)."""

from __future__ import annotations

import json
import sys

import numpy as np

from r1zero_jax import jsonl
from r1zero_jax.progress import Progress
from r1zero_jax.rewards.templates import STOP_STRINGS, apply_template, check_template

CHUNK_PROMPTS = 64  # prompts per sample() call: one compiled shape, bounded memory


def read_prompts(prompts: list[str] | None, prompts_file: str | None, template: str) -> list[str]:
    """--prompt texts and `problem` rows are wrapped by the template; `prompt` rows are kept."""
    check_template(template)
    if prompts:
        return [apply_template(template, p) for p in prompts]
    if not prompts_file:
        raise ValueError("give --prompt TEXT or --prompts-file JSONL")
    out = []
    for i, row in jsonl.read_objects(prompts_file):
        if isinstance(row.get("prompt"), str):
            out.append(row["prompt"])
        elif isinstance(row.get("problem"), str):
            out.append(apply_template(template, row["problem"]))
        else:
            raise ValueError(f"{prompts_file}:{i}: a row needs a string `prompt` or `problem`")
    if not out:
        raise ValueError(f"{prompts_file} holds no prompts")
    return out


def tokenize_left_padded(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (int32 [B, T] left-padded with 0, bool mask [B, T]); no special tokens added."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"prompts {empty[:10]} tokenize to nothing")
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int32)
    mask = np.zeros((len(ids), width), bool)
    for row, x in enumerate(ids):
        tokens[row, width - len(x):], mask[row, width - len(x):] = x, True
    return tokens, mask


def generate_cli(*, model: str, prompt: list[str] | None = None, prompts_file: str | None = None,
                 template: str = "qwen_math", max_new_tokens: int = 512, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, n: int = 1, seed: int = 0,
                 ignore_eos: bool = False, mesh: str = "data=-1", dtype: str = "bfloat16",
                 output: str | None = None) -> None:
    import jax
    import jax.numpy as jnp

    from r1zero_jax.convert.hf import load_model
    from r1zero_jax.sampling.sampler import SamplingParams, sample
    from r1zero_jax.sharding import make_mesh

    texts = read_prompts(prompt, prompts_file, template)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, n=n, stop_strings=STOP_STRINGS[template],
                            ignore_eos=ignore_eos)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    the_mesh = make_mesh(mesh)
    net, config, tokenizer = load_model(model, the_mesh, dtype=jnp.dtype(dtype),
                                        param_dtype=jnp.dtype(dtype))
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files (tokenizer.json or vocab.json)")
    tokens, mask = tokenize_left_padded(tokenizer, texts)
    longest = int(mask.sum(1).max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's {config.max_position_embeddings}"
                         " positions")

    out = open(output, "w") if output else None
    progress = Progress("generate", len(texts), "prompts")
    chunk = min(CHUNK_PROMPTS, len(texts))
    try:
        for lo in range(0, len(texts), chunk):
            hi = min(lo + chunk, len(texts))
            # the last chunk is topped up with copies so every call has the same batch shape
            rows = np.minimum(np.arange(lo, lo + chunk), hi - 1)
            tokens0 = progress.tokens
            ro = sample(net, tokens[rows], mask[rows], params, mesh=the_mesh, tokenizer=tokenizer,
                        seed=jax.random.fold_in(jax.random.key(seed), lo),
                        on_progress=lambda done, toks: progress.update(
                            lo + min(done // n, hi - lo), tokens=tokens0 + toks))
            for b in range(hi - lo):
                for j in range(n):
                    r = b * n + j
                    length = int(ro.lengths[r])
                    _emit(out, lo + b, j, texts[lo + b], ro.texts[r], ro.tokens[r, :length],
                          ro.logprobs[r, :length], str(ro.finish_reason[r]))
            progress.update(hi, tokens=tokens0 + int(ro.lengths[:(hi - lo) * n].sum()))
    finally:
        if out:
            out.close()
    if output:
        print(f"wrote {len(texts) * n} samples to {output}", file=sys.stderr)


def _emit(out, index, sample_index, prompt, text, token_ids, logprobs, finish_reason):
    if out is None:
        print(f"=== prompt {index} sample {sample_index} ({finish_reason}, {len(token_ids)} "
              f"tokens) ===\n{text}")
        return
    out.write(json.dumps({"prompt": prompt, "text": text, "token_ids": token_ids.tolist(),
                          "logprobs": [round(float(x), 6) for x in logprobs],
                          "finish_reason": finish_reason}) + "\n")
