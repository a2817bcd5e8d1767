"""Learner step throughput: tokens/s and model FLOPs utilisation of one Dr. GRPO optimizer step.

    python benchmarks/train_step.py                       # tiny model on the 8-device CPU mesh
    python benchmarks/train_step.py --preset qwen2.5-math-1.5b --seq 4096 --batch 1 \\
        --dtype bfloat16 --remat --logits-chunk 1024 --mesh data=-1   # one GPU / TPU chip

The step is the trainer's: forward, Dr. GRPO loss, backward (with gradient accumulation over
--accum microbatches), global-norm clip and AdamW on fp32 master weights. Model FLOPs per token
= 6 * (non-embedding params + LM head) + 12 * layers * heads * head_dim * seq (PaLM's count,
rematerialisation not counted). MFU divides by the chip's peak dense bf16 FLOP/s (table below,
or --peak-tflops); on CPU only tokens/s is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from r1zero_jax import dtypes

PEAK_BF16_TFLOPS = {  # dense, per device as JAX counts devices
    "H100": 989.0, "H200": 989.0, "A100": 312.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="a model preset of any family, or 'tiny'")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (prompt + response)")
    p.add_argument("--response", type=int, default=0, help="response tokens (default 3/4 of seq)")
    p.add_argument("--batch", type=int, default=8, help="sequences per microbatch per data shard")
    p.add_argument("--accum", type=int, default=1, help="microbatches per optimizer step")
    p.add_argument("--dtype", choices=dtypes.NAMES, default="float32")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--logits-chunk", type=int, default=0)
    p.add_argument("--mesh", default="data=4,tensor=2")
    p.add_argument("--cpu-devices", type=int, default=8, help="virtual CPU devices (CPU only)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def model_flops_per_token(qc, seq: int) -> float:
    d, layers = qc.hidden_size, qc.num_layers
    attn = d * (qc.num_heads + 2 * qc.num_kv_heads) * qc.head_dim + qc.num_heads * qc.head_dim * d
    mlp = 3 * d * qc.intermediate_size
    # the LM head counts, the embedding lookup not
    dense = layers * (attn + mlp) + d * qc.vocab_size
    return 6.0 * dense + 12.0 * layers * qc.num_heads * qc.head_dim * seq


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cpu_devices and "jax" not in sys.modules \
            and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" \
            and not any(os.path.exists(f"/dev/{d}") for d in ("nvidia0", "accel0")):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={a.cpu_devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from r1zero_jax import models
    from r1zero_jax import sharding as shd
    from r1zero_jax.config import OptimConfig, RLConfig
    from r1zero_jax.models.decoder import init_model, params_of
    from r1zero_jax.rl.learner import (LearnBatch, Learner, init_state, jit_learner, lr_schedule,
                                       make_binder, make_optimizer)

    dtype = dtypes.numpy_dtype(a.dtype)
    if a.preset == "tiny":
        qc = models.QwenConfig(vocab_size=32, hidden_size=64, intermediate_size=256, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16,
                               tie_word_embeddings=True)
    else:
        qc = models.preset(a.preset)
    mesh = shd.make_mesh(a.mesh)
    shards = shd.axis_size(mesh, "batch")
    micro = a.batch * shards
    resp = a.response or a.seq * 3 // 4
    model = init_model(qc, mesh, dtype=dtype, param_dtype=jnp.float32, remat=a.remat)
    params = params_of(model)
    del model
    optim = OptimConfig(learning_rate=1e-6)
    tx = make_optimizer(optim)
    state = init_state(params, tx, mesh)
    learner = Learner(bind=make_binder(qc, dtype=dtype, remat=a.remat), rl=RLConfig(), tx=tx,
                      schedule=lr_schedule(optim), max_new_tokens=resp, logits_chunk=a.logits_chunk)
    _, step = jit_learner(learner, state, mesh)
    rng = np.random.default_rng(0)
    shape = (a.accum, micro)
    put = lambda x: shd.shard_batch(mesh, x, (None, "batch") + (None,) * (x.ndim - 2))  # noqa: E731
    batch = jax.tree.map(put, LearnBatch(
        tokens=rng.integers(0, qc.vocab_size, shape + (a.seq,), dtype=np.int32),
        input_mask=np.ones(shape + (a.seq,), bool),
        loss_mask=np.ones(shape + (resp,), bool),
        old_logp=np.full(shape + (resp,), -2.0, np.float32),
        advantages=rng.normal(size=shape).astype(np.float32)))
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = a.accum * micro * a.seq
    tok_s = tokens / step_s
    flops = model_flops_per_token(qc, a.seq) * tokens / step_s
    kind = jax.devices()[0].device_kind
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), 0.0)
    out = {
        "device": kind, "num_devices": jax.device_count(), "mesh": shd.mesh_shape(mesh),
        "preset": a.preset, "dtype": a.dtype, "remat": a.remat, "seq": a.seq, "response": resp,
        "sequences_per_step": a.accum * micro, "tokens_per_step": tokens,
        "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
        "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_per_device": round(tok_s / jax.device_count(), 1),
        "model_tflops_per_s_per_device": round(flops / jax.device_count() / 1e12, 4),
        "mfu": round(flops / jax.device_count() / (peak * 1e12), 4) if peak else None,
    }
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
