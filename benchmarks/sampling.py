"""Sampling throughput: r1zero-jax `sample()` against transformers' `generate`, same weights.

Each (framework, case) runs in its own subprocess so its peak memory is its own. Decode speed is
marginal, without prefill and compilation: r1zero-jax times its jitted decode loop alone
(`Rollout.timings`); transformers by difference, (time of a long run - time of a short run) /
(extra tokens). Both generate exactly the requested number of tokens (EOS ignored), sampling at
temperature 1, transformers with its KV cache on. Best of --repeats timed runs after a warm-up.

  python benchmarks/sampling.py                    # CPU: 15M-param Qwen2, float32, both targets
  python benchmarks/sampling.py --preset qwen2.5-0.5b --dtype bfloat16 --batch 64,256 \
      --prompt-len 256 --new-tokens 1000,3000 --no-hf          # GPU / TPU shapes, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from r1zero_jax import dtypes

SMALL = dict(vocab_size=3072, hidden_size=512, intermediate_size=1024, num_layers=6, num_heads=8,
             num_kv_heads=2, tie_word_embeddings=True, rope_theta=10000.0)


def _config(args):
    from r1zero_jax.models import QwenConfig

    return QwenConfig.preset(args.preset) if args.preset else QwenConfig(**SMALL)


def make_weights(args, out_dir: str) -> None:
    """A random HF Qwen2 directory (non-zero biases) both frameworks load."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = _config(args)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**cfg.to_hf_dict())).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    hf.save_pretrained(out_dir)


def _prompts(batch: int, prompt_len: int, vocab: int):
    import numpy as np

    rs = np.random.RandomState(0)
    return rs.randint(0, vocab, (batch, prompt_len)).astype(np.int32), np.ones(
        (batch, prompt_len), bool)


def run_jax(args, weights: str, batch: int, prompt_len: int, lengths: list[int]) -> dict:
    import jax
    import jax.numpy as jnp

    from r1zero_jax.convert.hf import load_model
    from r1zero_jax.sampling.sampler import SamplingParams, sample
    from r1zero_jax.sharding import make_mesh

    dtype = jnp.dtype(args.dtype)
    mesh = make_mesh(args.mesh)
    model, cfg, _ = load_model(weights, mesh, dtype=dtype, param_dtype=dtype)
    tokens, mask = _prompts(batch, prompt_len, cfg.vocab_size)
    times, steps = {}, {}
    for n in lengths[-1:]:  # the decode loop is timed alone: one length is enough
        sp = SamplingParams(max_new_tokens=n, temperature=1.0, ignore_eos=True)
        ro = sample(model, tokens, mask, sp, seed=0, mesh=mesh)  # compile
        assert int(ro.lengths.min()) == n
        best, best_step = float("inf"), float("inf")
        for rep in range(args.repeats):
            t = time.perf_counter()
            ro = sample(model, tokens, mask, sp, seed=rep + 1, mesh=mesh)
            best = min(best, time.perf_counter() - t)
            best_step = min(best_step, ro.timings["decode_s"] / ro.timings["decode_steps"])
        times[n], steps[n] = best, best_step
    stats = jax.devices()[0].memory_stats() or {}
    return {"times": times, "decode_step_s": steps, "peak_bytes": stats.get("peak_bytes_in_use"),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count()}


def run_hf(args, weights: str, batch: int, prompt_len: int, lengths: list[int]) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(args.hf_threads or os.cpu_count() or 1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = Qwen2ForCausalLM.from_pretrained(weights, dtype=dtype).eval()
    tokens, mask = _prompts(batch, prompt_len, model.config.vocab_size)
    ids, att = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    times = {}
    for n in lengths:
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                  top_p=1.0, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=att, **kw)  # warm-up
            assert out.shape[1] == prompt_len + n
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=att, **kw)
                best = min(best, time.perf_counter() - t)
        times[n] = best
    return {"times": times, "peak_bytes": None, "device": "cpu (torch)", "num_devices": 1}


def _child(args) -> None:
    fn = run_jax if args.child == "jax" else run_hf
    out = fn(args, args.weights, args.child_batch, args.child_prompt, args.child_lengths)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def _spawn(args, framework: str, batch: int, prompt_len: int, lengths: list[int]) -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--weights", args.weights,
           "--child-batch", str(batch), "--child-prompt", str(prompt_len),
           "--child-lengths", ",".join(map(str, lengths)), "--dtype", args.dtype,
           "--mesh", args.mesh, "--repeats", str(args.repeats), "--hf-threads",
           str(args.hf_threads)]
    if args.preset:
        cmd += ["--preset", args.preset]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{framework} child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    for k in ("times", "decode_step_s"):
        if k in out:
            out[k] = {int(n): v for n, v in out[k].items()}
    print(f"  {framework:4s} B={batch:<4d} prompt={prompt_len:<5d} "
          + " ".join(f"{n} tok: {s:.3f}s" for n, s in out["times"].items())
          + f"  (run {time.perf_counter() - t:.0f}s)", flush=True)
    return out


def marginal(res: dict, batch: int) -> tuple[float, float]:
    """(generated tokens/s, seconds per decode step): r1zero-jax times its decode loop alone
    (longest run); transformers by difference between the shortest and longest run."""
    if "decode_step_s" in res:
        step = res["decode_step_s"][max(res["decode_step_s"])]
    else:
        (n1, t1), (n2, t2) = min(res["times"].items()), max(res["times"].items())
        step = (t2 - t1) / (n2 - n1)
    return batch / step, step


def _mem(res: dict) -> str:
    b = res.get("peak_bytes") or res["peak_rss"]
    kind = "device peak" if res.get("peak_bytes") else "process peak RSS"
    return f"{b / 2**20:.0f} MiB {kind}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default=None, help="QwenConfig preset (default: the 15M model)")
    p.add_argument("--dtype", default="float32", choices=dtypes.NAMES)
    p.add_argument("--mesh", default="data=-1")
    p.add_argument("--batch", default="8,32", help="batch sizes of the throughput table")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", default="32,96", help="short,long run for marginal speed")
    p.add_argument("--scaling-batch", type=int, default=8)
    p.add_argument("--scaling-prompts", default="256,2048",
                   help="cached-token counts of the per-token-time scaling check ('' to skip)")
    p.add_argument("--scaling-new-tokens", default="16,48")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per length (best kept)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (large models)")
    p.add_argument("--hf-threads", type=int, default=0, help="torch threads (0: all CPUs)")
    p.add_argument("--weights", default=None, help="HF dir to reuse (default: fresh random)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-prompt", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-lengths", type=lambda s: [int(x) for x in s.split(",")],
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    from r1zero_jax.models.decoder import num_params

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    tmp = tempfile.TemporaryDirectory()
    if args.weights is None:
        args.weights = tmp.name
        make_weights(args, args.weights)
    cfg = _config(args)
    print(f"model: {num_params(cfg) / 1e6:.1f}M params {cfg}\n{args.dtype}, machine: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}", flush=True)
    lengths = ints(args.new_tokens)
    rows = []
    for b in ints(args.batch):
        ours = _spawn(args, "jax", b, args.prompt_len, lengths)
        tok_s, _ = marginal(ours, b)
        row = f"B={b:<4d} r1zero-jax {tok_s:9.0f} tok/s ({_mem(ours)})"
        if not args.no_hf:
            hf = _spawn(args, "hf", b, args.prompt_len, lengths)
            hf_tok_s, _ = marginal(hf, b)
            row += (f" | transformers {hf_tok_s:9.0f} tok/s ({_mem(hf)}) | "
                    f"ratio {tok_s / hf_tok_s:.2f}x")
        rows.append(row)
    print(f"\nmarginal decode throughput, prompt {args.prompt_len}, tokens {lengths}:")
    print("\n".join(rows))

    prompts = ints(args.scaling_prompts)
    if prompts:
        b, lengths = args.scaling_batch, ints(args.scaling_new_tokens)
        steps = {}
        for pl in prompts:
            steps[pl] = {"jax": marginal(_spawn(args, "jax", b, pl, lengths), b)[1]}
            if not args.no_hf:
                steps[pl]["hf"] = marginal(_spawn(args, "hf", b, pl, lengths), b)[1]
        print(f"\nper-token decode time at batch {b} (ms/step) by cached tokens:")
        for pl in prompts:
            print(f"  {pl:5d} cached: "
                  + "  ".join(f"{k} {v * 1e3:.2f}" for k, v in steps[pl].items()))
        lo, hi = min(prompts), max(prompts)
        for k in steps[lo]:
            print(f"  {k}: growth {hi} vs {lo} cached tokens = {steps[hi][k] / steps[lo][k]:.2f}x")


if __name__ == "__main__":
    main()
