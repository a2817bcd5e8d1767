"""GRPO vs Dr. GRPO response lengths on the toy task (configs/toy_{grpo,dr_grpo}.py), over seeds.

For each seed: one supervised warm-up makes the base model (saved as an HF directory), then the
real trainer runs each loss from that same base model with the same RL seed, so the two runs of
a seed differ only in the loss. Per-step mean lengths of correct and of incorrect responses
(the trainer's metrics.jsonl) are gathered into one JSON; `plot` draws them (mean over seeds,
band = min..max), `table` prints the final lengths.

    python benchmarks/length_bias.py --seeds 0 1 2 --steps 60 \\
        --json docs/length_bias.json --png docs/length_bias.png

notebooks/length_bias.ipynb imports this file and runs a shortened version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings

LOSSES = ("grpo", "dr_grpo")
COLORS = {"grpo": "tab:red", "dr_grpo": "tab:blue"}
KEYS = ("reward_mean", "accuracy", "response_length", "response_length_correct",
        "response_length_incorrect", "truncation_rate", "zero_advantage_groups")
FINAL_WINDOW = 5  # "final" length = mean over the last steps, as single steps are noisy


def setup_devices(config: str = "toy_dr_grpo") -> None:
    """Virtual CPU devices the config asks for; only effective before JAX is imported."""
    from r1zero_jax.config import load_config
    from r1zero_jax.rl.launch import request_cpu_devices

    n = load_config(config).mesh.num_cpu_devices
    if n and "jax" not in sys.modules:
        request_cpu_devices(n)


def make_base_model(seed: int, out_dir: str, *, warmup_steps: int | None = None,
                    overrides=(), printer=print) -> str:
    """Random init (seed) + the trainer's supervised warm-up (seed) -> fp32 HF directory
    `out_dir`. `warmup_steps` overrides the config's skill + habit steps in total."""
    import jax.numpy as jnp

    from r1zero_jax import sharding as shd
    from r1zero_jax.config import load_config
    from r1zero_jax.convert.hf import write_hf_dir
    from r1zero_jax.data.synthetic import SyntheticTask, SyntheticTokenizer
    from r1zero_jax.rl.learner import make_binder
    from r1zero_jax.rl.trainer import build_model
    from r1zero_jax.rl.warmup import warmup

    cfg = load_config("toy_dr_grpo", [*overrides, f"model.init_seed={seed}"])
    t = cfg.train
    mesh = shd.make_mesh(cfg.mesh.spec)
    tok = SyntheticTokenizer()
    qc, params, _ = build_model(cfg, mesh, tok)
    bind = make_binder(qc, dtype=jnp.float32)
    skill, habit = t.warmup_sft_steps, t.warmup_sft_habit_steps
    if warmup_steps is not None:  # a shortened warm-up keeps the config's skill:habit ratio
        skill, habit = (round(warmup_steps * skill / (skill + habit)),
                        round(warmup_steps * habit / (skill + habit)))
    params = warmup(params, bind, SyntheticTask(), tok, mesh, skill_steps=skill, habit_steps=habit,
                    lr=t.warmup_sft_lr, batch=t.warmup_sft_batch, seed=seed, printer=printer)
    write_hf_dir(out_dir, params, qc, dtype="float32")
    return out_dir


def run_length_bias(seeds=(0, 1, 2), *, steps: int | None = None, warmup_steps: int | None = None,
                    workdir: str = "runs/length_bias", overrides=(), printer=print,
                    json_path: str | None = None) -> dict:
    """Train both losses for every seed; returns {"runs": {loss: {seed: [metrics per step]}}, ...}.

    `json_path` is rewritten after every run, so a long experiment can be watched (and plotted)
    while it goes."""
    # Everything loaded up front: one code version per experiment, even if files change.
    import r1zero_jax.checkpoint  # noqa: F401
    import r1zero_jax.sampling.sampler  # noqa: F401
    from r1zero_jax.config import load_config
    from r1zero_jax.data import synthetic
    from r1zero_jax.rl.metrics import read_metrics
    from r1zero_jax.rl.trainer import Trainer

    with open(synthetic.__file__, "rb") as f:  # the toy task's code, which results depend on
        task_sha = hashlib.sha256(f.read()).hexdigest()[:12]
    results = {"command": " ".join(sys.argv), "seeds": list(seeds), "steps": steps,
               "synthetic_py_sha256": task_sha, "vocab": len(synthetic.SyntheticTokenizer()),
               "warmup_steps": warmup_steps, "overrides": list(overrides),
               "runs": {loss: {} for loss in LOSSES}, "wall_time_s": {}}
    total = len(seeds) * len(LOSSES)
    t_all = time.perf_counter()
    for i, seed in enumerate(seeds):
        t0 = time.perf_counter()
        base = make_base_model(seed, os.path.join(workdir, f"base-{seed}"),
                               warmup_steps=warmup_steps, overrides=overrides, printer=printer)
        results["wall_time_s"][f"base-{seed}"] = round(time.perf_counter() - t0, 1)
        for j, loss in enumerate(LOSSES):
            t0 = time.perf_counter()
            run_dir = os.path.join(workdir, f"{loss}-{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
            sets = [*overrides, f"model.path={os.path.abspath(base)}", "train.warmup_sft_steps=0",
                    f"train.seed={seed}", f"data.seed={seed}", f"model.init_seed={seed}"]
            if steps is not None:
                sets.append(f"train.steps={steps}")
            cfg = load_config(f"toy_{loss}", sets)
            trainer = Trainer(cfg, run_dir, printer=printer)
            trainer.run()
            rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            results["runs"][loss][str(seed)] = [
                {"step": r["step"], **{k: r.get(k) for k in KEYS}} for r in rows]
            results.setdefault("final_styles", {}).setdefault(loss, {})[str(seed)] = \
                final_styles(trainer)
            results["wall_time_s"][f"{loss}-{seed}"] = round(time.perf_counter() - t0, 1)
            done = i * len(LOSSES) + j + 1
            el = time.perf_counter() - t_all
            printer(f"== run {done}/{total} done ({loss}, seed {seed}): final incorrect length "
                    f"{final_length(rows, 'response_length_incorrect'):.1f} | {el:.0f}s elapsed, "
                    f"ETA {el / done * (total - done):.0f}s", flush=True)
            if json_path:
                save(results, json_path)
    return results


def style_of(text: str) -> str:
    """The synthetic task's answer styles (data/synthetic.py), told apart by how they start."""
    if text.startswith("\\boxed"):
        return "guess"
    if text.startswith("hmm"):
        return "ramble"
    return "recheck" if "recheck" in text else "worked"


def final_styles(trainer, prompts: int = 64, seed: int = 12345) -> dict:
    """Share, accuracy and mean length of each style among samples of the trained model."""
    import numpy as np

    from r1zero_jax.data.pipeline import make_encoder
    from r1zero_jax.data.synthetic import SyntheticTask
    from r1zero_jax.sampling.generation import generate, sampling_params
    from r1zero_jax.tasks import score

    cfg, tok, task = trainer.cfg, trainer.tokenizer, trainer.task
    rows = SyntheticTask().rows("eval", prompts, seed=seed)
    ids = make_encoder(tok)([task.prompt(r) for r in rows])
    G = cfg.rl.group_size
    rollout = generate(trainer.bind(trainer.state.params), ids,
                       sampling_params(cfg.sampling, n=G, stop_strings=task.stop_strings),
                       tokenizer=tok, mesh=trainer.mesh, seed=seed)
    with task.pool(workers=1) as pool:
        correct = score(task, pool, rollout.texts,
                        [r["answer"] for r in rows for _ in range(G)]).correct
    styles = np.array([style_of(t) for t in rollout.texts])
    out = {}
    for name in ("guess", "ramble", "worked", "recheck"):
        m = styles == name
        out[name] = {"share": float(m.mean()),
                     "accuracy": float(correct[m].mean()) if m.any() else None,
                     "length": float(rollout.lengths[m].mean()) if m.any() else None}
    return out


def style_table(results: dict) -> str:
    """Markdown: style shares of the final models, mean over seeds."""
    names = ("guess", "ramble", "worked", "recheck")
    lines = ["| loss | " + " | ".join(f"{n} share (accuracy)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for loss, per_seed in results.get("final_styles", {}).items():
        cells = []
        for n in names:
            share = _nanmean([s[n]["share"] for s in per_seed.values()])
            acc = _nanmean([s[n]["accuracy"] for s in per_seed.values()])
            cells.append(f"{share:.2f} ({_fmt(acc, 2)})")
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def save(results: dict, path: str) -> None:
    """Compact JSON (4 decimals), small enough to commit next to its figure."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_rounded(results), f, separators=(",", ":"))


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _nanmean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def final_length(rows: list[dict], key: str, window: int = FINAL_WINDOW) -> float:
    """Mean of `key` over the last `window` steps (NaN steps, with no such response, skipped)."""
    return _nanmean([r.get(key) for r in rows[-window:]])


def curves(results: dict, loss: str, key: str):
    """(steps [S], values [seeds, S]) as numpy, NaN where a step had no such response."""
    import numpy as np

    runs = results["runs"][loss]
    seeds = sorted(runs, key=int)
    steps = np.asarray([r["step"] for r in runs[seeds[0]]])
    vals = np.full((len(seeds), len(steps)), np.nan)
    for i, s in enumerate(seeds):
        for j, r in enumerate(runs[s][:len(steps)]):
            v = r.get(key)
            vals[i, j] = np.nan if v is None else v
    return steps, vals


def plot(results: dict, path: str | None = None, title: str = "the toy task"):
    """Three panels: incorrect / correct response length and accuracy per RL step; line = mean
    over seeds, band = min..max over seeds."""
    import matplotlib.pyplot as plt
    import numpy as np

    panels = (("response_length_incorrect", "incorrect responses: mean length (tokens)"),
              ("response_length_correct", "correct responses: mean length (tokens)"),
              ("accuracy", "accuracy of sampled responses"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    n_seeds = max(len(runs) for runs in results["runs"].values())
    for ax, (key, panel_title) in zip(axes, panels, strict=False):
        for loss in LOSSES:
            if not results["runs"].get(loss):
                continue
            steps, vals = curves(results, loss, key)
            with warnings.catch_warnings():  # all-NaN columns: a step without such responses
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
            ax.plot(steps, mean, color=COLORS[loss],
                    label=f"{loss} (mean of {vals.shape[0]} seeds)")
            ax.fill_between(steps, lo, hi, color=COLORS[loss], alpha=0.2, lw=0)
        ax.set_title(panel_title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"GRPO vs Dr. GRPO on {title} ({n_seeds} seeds; band = min..max over seeds)")
    fig.tight_layout()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return fig


def table(results: dict) -> str:
    """Markdown: final (last-steps mean) incorrect and correct lengths and accuracy, per seed."""
    lines = ["| loss | seed | incorrect length, step 1 | incorrect length, final | "
             "correct length, final | accuracy, final |", "|---|---|---|---|---|---|"]
    for loss in LOSSES:
        runs = results["runs"].get(loss, {})
        finals = []
        for seed in sorted(runs, key=int):
            rows = runs[seed]
            f = final_length(rows, "response_length_incorrect")
            finals.append(f)
            lines.append(f"| {loss} | {seed} | {_fmt(rows[0]['response_length_incorrect'])} | "
                         f"{_fmt(f)} | {_fmt(final_length(rows, 'response_length_correct'))} | "
                         f"{_fmt(final_length(rows, 'accuracy'), 3)} |")
        if finals:
            lines.append(f"| **{loss}** | **mean** | | **{_fmt(_nanmean(finals))}** | | |")
    return "\n".join(lines)


def _fmt(x, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the config's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: the config's")
    p.add_argument("--workdir", default="runs/length_bias")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override KEY=VALUE, applied to both losses")
    p.add_argument("--json", default="docs/length_bias.json")
    p.add_argument("--png", default="docs/length_bias.png")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw --png and the table from --json")
    a = p.parse_args(argv)
    if not a.plot_only:
        setup_devices()
        run_length_bias(a.seeds, steps=a.steps, warmup_steps=a.warmup_steps, workdir=a.workdir,
                        overrides=a.overrides, json_path=a.json)
    results = load(a.json)
    plot(results, a.png)
    print(table(results))
    print(style_table(results))
    print(f"wrote {a.json} and {a.png}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
