"""`r1zero-jax generate`: prompts in, sampled completions out (JSONL or printed)."""

from __future__ import annotations

import contextlib
import json
import sys

from r1zero_jax import dtypes, jsonl
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


def generate_cli(*, model: str, prompt: list[str] | None = None, prompts_file: str | None = None,
                 template: str = "qwen_math", max_new_tokens: int = 512, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, n: int = 1, seed: int = 0,
                 ignore_eos: bool = False, mesh: str = "data=-1", dtype: str = "bfloat16",
                 output: str | None = None) -> None:
    from r1zero_jax.convert.hf import load_model
    from r1zero_jax.data.pipeline import make_encoder
    from r1zero_jax.sampling.generation import generate
    from r1zero_jax.sampling.sampler import SamplingParams
    from r1zero_jax.sharding import make_mesh

    texts = read_prompts(prompt, prompts_file, template)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, n=n, stop_strings=STOP_STRINGS[template],
                            ignore_eos=ignore_eos)
    dtypes.check(dtype, "--dtype")
    the_mesh = make_mesh(mesh)
    net, config, tokenizer = load_model(model, the_mesh, dtype=dtypes.numpy_dtype(dtype),
                                        param_dtype=dtypes.numpy_dtype(dtype))
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files (tokenizer.json or vocab.json)")
    prompt_ids = make_encoder(tokenizer)(texts)
    empty = [i for i, x in enumerate(prompt_ids) if not x]
    if empty:
        raise ValueError(f"prompts {empty[:10]} tokenize to nothing")
    longest = max(map(len, prompt_ids))
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's {config.max_position_embeddings}"
                         " positions")

    progress = Progress("generate", len(texts), "prompts")
    done_tokens = 0

    def emit(first: int, ro) -> None:
        nonlocal done_tokens
        count = ro.size // n
        for b in range(count):
            for j in range(n):
                r = b * n + j
                length = int(ro.lengths[r])
                _emit(out, first + b, j, texts[first + b], ro.texts[r], ro.tokens[r, :length],
                      ro.logprobs[r, :length], str(ro.finish_reason[r]))
        done_tokens += int(ro.lengths.sum())
        progress.update(first + count, tokens=done_tokens)

    with open(output, "w") if output else contextlib.nullcontext() as out:
        ro = generate(net, prompt_ids, params, tokenizer=tokenizer, mesh=the_mesh, seed=seed,
                      prompts_per_call=CHUNK_PROMPTS, on_call=emit,
                      on_progress=lambda rows, tokens: progress.update(rows // n, tokens=tokens))
    r = ro.report
    print(f"generate: {r['decode_steps']} decode steps, {r['generated_tokens']} tokens, slot "
          f"utilization {r['slot_utilization']:.3f}, {r['tokens_per_s']:.0f} tokens/s (sampler)",
          file=sys.stderr)
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
