"""Rollout wall time: static sampler calls against continuous batching, same model, rows, slots.

Static: the rollout is split into calls of `slots` rows (slots / n prompts) run back to back, each
decoding until its longest row ends (`sampler.sample`, as `rl/rollout.generate` with
`sampling.prompts_per_call`). Continuous: `slots` decode slots take rows from the whole rollout
(`sampling/continuous.py`, `sampling.decode_slots`). Both draw every row's tokens from the same
random stream; the share of rows that come out identical is printed (a row can part ways only
where float rounding of its logits, which differs between batch shapes by about 1e-6, moves a
CDF boundary across its uniform draw). The report is `sampler.rollout_report`.

Length mix: a small random Qwen2 (near-uniform next-token distribution) with `k` stop token ids,
k = round(vocab x 4 / max_new_tokens), so a row stops at each step with probability about
4 / max_new_tokens: lengths are geometric (an exponential tail) with mean about max_new_tokens / 4,
capped at max_new_tokens (about e^-4 = 2% of rows reach it). The measured percentiles are printed.

  python benchmarks/rollout.py [--json]        # CPU, 1 device, a few minutes

Paged (`--page-size Z`, 0 to skip): continuous batching again on a paged cache
(`sampling.page_size`; models/paged.py), whose attention reads only the filled pages where the
dense cache reads every slot's whole prompt + max_new_tokens row each step: `paged_speedup` is
the dense continuous wall time over the paged one, same slots and rows.

  python benchmarks/rollout.py --max-new-tokens 512 --prompts 64 --json   # longer rows

Utilization depends on rows per slot: once no row is pending, slots empty while the last rows
finish (at most max_new_tokens steps). The defaults (1,024 rows, the paper's rollout, on 32 slots)
keep that drain small.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
             num_kv_heads=2, tie_word_embeddings=True, rope_theta=10000.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--slots", type=int, default=32, help="decode slots = rows per static call")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64, help="longest prompt (16 at least)")
    ap.add_argument("--page-size", type=int, default=16, help="paged run's page size (0: none)")
    ap.add_argument("--pages", type=int, default=0, help="paged run's pool (0: every slot full)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each (best kept)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = ap.parse_args()
    if args.slots % args.n or (args.prompts * args.n) % args.slots:
        raise SystemExit("--slots must be a multiple of --n and divide prompts x n")

    import jax
    import numpy as np

    from r1zero_jax.models import QwenConfig
    from r1zero_jax.models.decoder import init_model
    from r1zero_jax.sampling.generation import generate
    from r1zero_jax.sampling.sampler import SamplingParams
    from r1zero_jax.sharding import make_mesh

    cfg = QwenConfig(**SMALL)
    mesh = make_mesh("data=1", jax.devices()[:1])
    model = init_model(cfg, mesh, seed=0)
    m = args.max_new_tokens
    k = max(1, round(cfg.vocab_size * 4 / m))
    params = SamplingParams(max_new_tokens=m, n=args.n, stop_token_ids=tuple(range(1, k + 1)))
    rs = np.random.RandomState(0)
    tp = args.prompt_len
    lens = rs.randint(16, tp + 1, args.prompts)
    tokens = rs.randint(k + 1, cfg.vocab_size, (args.prompts, tp)).astype(np.int32)
    mask = np.arange(tp)[None, :] >= tp - lens[:, None]
    per_call = args.slots // args.n
    rows = args.prompts * args.n

    prompts = [t[m].tolist() for t, m in zip(tokens, mask, strict=True)]

    def static():  # the same generation path, with the same slots per call
        return generate(model, prompts, params, tokenizer=None, mesh=mesh, seed=0,
                        prompts_per_call=per_call)

    def continuous():
        return generate(model, prompts, params, tokenizer=None, mesh=mesh, seed=0,
                        decode_slots=args.slots)

    def paged():
        return generate(model, prompts, params, tokenizer=None, mesh=mesh, seed=0,
                        decode_slots=args.slots, page_size=args.page_size,
                        cache_pages=args.pages)

    runs = [("static", static), ("continuous", continuous)]
    runs += [("paged", paged)] if args.page_size else []
    results = {}
    for _, fn in runs:
        fn()  # compile
    for _ in range(args.repeats):  # alternate, so all see the same machine load
        for name, fn in runs:
            t0 = time.perf_counter()
            rollout = fn()
            wall = time.perf_counter() - t0
            if name not in results or wall < results[name]["wall_s"]:
                results[name] = dict(rollout.report, wall_s=wall, tokens=rollout.tokens,
                                     lengths=rollout.lengths)
            print(f"{name:10s} {wall:6.2f}s", flush=True)
    s, c = results["static"], results["continuous"]
    identical = float(np.mean(np.all(s["tokens"] == c["tokens"], axis=1)))
    lengths = c["lengths"]
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
    out = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
        "rows": rows, "slots": args.slots, "max_new_tokens": m, "stop_ids": k,
        "length_mean": float(lengths.mean()), **pct, "length_max": int(lengths.max()),
        "share_at_max": float((lengths == m).mean()),
        "static_wall_s": s["wall_s"], "continuous_wall_s": c["wall_s"],
        "static_decode_steps": s["decode_steps"], "continuous_decode_steps": c["decode_steps"],
        "static_slot_utilization": s["slot_utilization"],
        "slot_utilization": c["slot_utilization"],
        "static_tokens_per_s": s["tokens_per_s"], "continuous_tokens_per_s": c["tokens_per_s"],
        "rows_identical": identical, "speedup": s["wall_s"] / c["wall_s"],
    }
    print(f"{rows} rows, lengths mean {out['length_mean']:.1f} (max_new_tokens {m}), p50/p90/p99 "
          f"{pct['p50']}/{pct['p90']}/{pct['p99']}, {out['share_at_max']:.1%} at the limit; "
          f"{identical:.1%} of rows identical in both")
    print(f"static calls of {args.slots} rows: {s['decode_steps']} steps, utilization "
          f"{s['slot_utilization']:.3f}, {s['wall_s']:.2f}s")
    print(f"continuous, {args.slots} slots: {c['decode_steps']} steps, utilization "
          f"{c['slot_utilization']:.3f}, {c['wall_s']:.2f}s  -> speedup {out['speedup']:.2f}x")
    if args.page_size:
        g = results["paged"]
        out.update(page_size=args.page_size, paged_wall_s=g["wall_s"],
                   paged_preemptions=g["preemptions"], paged_slot_utilization=g["slot_utilization"],
                   paged_rows_identical=float(np.mean(np.all(g["tokens"] == c["tokens"], axis=1))),
                   paged_speedup=c["wall_s"] / g["wall_s"])
        print(f"paged, pages of {args.page_size}: {g['decode_steps']} steps, {g['preemptions']} "
              f"preemptions, {g['wall_s']:.2f}s -> {out['paged_speedup']:.2f}x the dense "
              f"continuous batch; {out['paged_rows_identical']:.1%} of rows identical")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
