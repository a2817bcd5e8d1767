"""Run metrics at the edges: rollout statistics, metrics.jsonl, TensorBoard, the progress line,
and the reward / length curves PNG."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from r1zero_jax import paths
from r1zero_jax.progress import Progress, fmt_duration

from r1zero_jax.analysis import has_self_reflection


def rollout_metrics(rollout, scores, rewards: np.ndarray, group_size: int, *,
                    gather=lambda rows: rows) -> dict:
    """Reward (`rewards`, what the learner sees), accuracy (solved by the task's scores), lengths
    of correct vs incorrect responses, truncation, reflection share, grading timeouts and lost
    grader workers, the share of groups without learning signal, and the sampler's report
    (decode steps, generated tokens, slot utilization). `gather` turns this process's per-row
    figures into the whole rollout's (`sharding.gather_slices` when each process holds a slice)."""
    rows = gather({
        "length": rollout.lengths.astype(np.float64), "correct": scores.correct,
        "truncated": rollout.truncated, "reward": rewards, "timed_out": scores.timed_out,
        "reflection": np.array([has_self_reflection(t) for t in rollout.texts], bool),
        "worker_deaths": np.array([scores.worker_deaths])})
    lengths, good = rows["length"], rows["correct"]

    def mean(x):
        return float(x.mean()) if x.size else float("nan")

    return {
        "reward_mean": float(rows["reward"].mean()),
        "accuracy": float(good.mean()),
        "response_length": mean(lengths),
        "response_length_correct": mean(lengths[good]),
        "response_length_incorrect": mean(lengths[~good]),
        "truncation_rate": float(rows["truncated"].mean()),
        "reflection_rate": float(np.mean(rows["reflection"])),
        "grader_timeouts": int(rows["timed_out"].sum()),
        "grader_worker_deaths": int(rows["worker_deaths"].sum()),
        **group_stats(rows["reward"], group_size),
        # the sampler's tokens/s is left to the trainer's gen_tokens_per_s (wall-clock figures
        # keep that prefix or a time_ one)
        **{f"rollout_{k}": v for k, v in rollout.report.items() if k != "tokens_per_s"},
    }


def group_stats(rewards: np.ndarray, group_size: int) -> dict:
    """Share of groups whose rewards are all equal (zero advantage: no learning signal)."""
    g = rewards.reshape(-1, group_size)
    same = (g == g[:, :1]).all(axis=1)
    return {"zero_advantage_groups": float(same.mean()),
            "solved_all_groups": float((g > 0).all(axis=1).mean())}


def _num(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def progress_line(m: dict, total: int, rate_s: float, eta_s: float) -> str:
    """One console line per step: reward, accuracy, lengths, loss, time split, rate, ETA."""
    parts = [
        f"step {m['step']}/{total}",
        f"reward {m['reward_mean']:.3f}",
        f"acc {m['accuracy']:.3f}",
        f"len {_num(m['response_length'])} (ok {_num(m['response_length_correct'])} / "
        f"wrong {_num(m['response_length_incorrect'])})",
        f"loss {m['loss']:+.4f}",
        f"ent {m['entropy']:.3f}",
        f"clip {m['clip_frac']:.3f}",
        f"gnorm {m['grad_norm']:.3g}",
        f"gen {m['gen_tokens_per_s']:.0f} tok/s",
        f"t s/g/l {m['time_sample_s']:.1f}/{m['time_grade_s']:.1f}/{m['time_learn_s']:.1f}",
    ]
    if "eval_accuracy" in m:
        parts.append(f"EVAL {m['eval_accuracy']:.3f}")
    parts.append(f"{rate_s:.1f} s/step ETA {fmt_duration(eta_s)}")
    return " | ".join(parts)


class RunLogger:
    """Writes each step's metrics to metrics.jsonl and TensorBoard and prints the progress line.

    Only one process of a multi-host run writes (`enabled`). On resume, rows after the resumed
    step are dropped so the file stays one row per step.
    """

    def __init__(self, workdir: str, total_steps: int, *, start_step: int = 0,
                 tensorboard: bool = True, enabled: bool = True, printer=print):
        self.workdir, self.total, self.enabled, self.print = workdir, total_steps, enabled, printer
        self.path = paths.join(workdir, "metrics.jsonl")
        self.history = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        # rate and ETA leave out the first step's compilation once a second step is done
        self._progress = Progress("train", total_steps, "steps", start=start_step,
                                  printer=lambda line: None)
        self._tb = None
        if enabled:
            paths.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
            if tensorboard:
                from tensorboardX import SummaryWriter

                # tensorboardX cannot write gs:// without TensorFlow: event files of a GCS run
                # stay on the local disk of process 0.
                tb_dir = (os.path.join("runs", "tensorboard", workdir.replace("gs://", ""))
                          if paths.is_gcs(workdir) else os.path.join(workdir, "tensorboard"))
                self._tb = SummaryWriter(tb_dir)

    def log(self, metrics: dict) -> None:
        step = metrics["step"]
        metrics = {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
                   for k, v in metrics.items()}
        self.history.append(metrics)
        self._progress.update(step)
        rate = 1 / max(self._progress.rate, 1e-9)
        if not self.enabled:
            return
        paths.append_text(self.path, json.dumps(metrics, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and not math.isnan(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        self.print(progress_line(metrics, self.total, rate, self._progress.eta_s), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    if not paths.exists(path):
        return []
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def plot_curves(history: list[dict], path: str, title: str = "",
                eval_before: float | None = None) -> None:
    """PNG: reward and greedy eval accuracy (left; `eval_before` at step 0), response length of
    correct / incorrect responses (right) per step."""
    # A bare Figure, not pyplot: no global backend switch (notebooks keep showing their plots).
    from matplotlib.figure import Figure

    steps = [r["step"] for r in history]
    col = lambda k: [r.get(k, float("nan")) for r in history]  # noqa: E731
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, col("reward_mean"), label="reward (train samples)")
    ev = [(0, eval_before)] if eval_before is not None else []
    ev += [(r["step"], r["eval_accuracy"]) for r in history if "eval_accuracy" in r]
    if ev:
        ax1.plot(*zip(*ev, strict=False), "o-", label="greedy eval accuracy")
    ax1.set_xlabel("RL step")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend()
    ax1.set_title("reward")
    ax2.plot(steps, col("response_length"), label="all")
    ax2.plot(steps, col("response_length_correct"), label="correct")
    ax2.plot(steps, col("response_length_incorrect"), label="incorrect")
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("tokens")
    ax2.legend()
    ax2.set_title("response length")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with paths.open_file(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
