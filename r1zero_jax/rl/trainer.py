"""The RL loop; the only place that knows the order of stages.

`Trainer(cfg, workdir)` builds the components from the config (task, tokenizer, model, rows,
learner); `run()` restores or initialises the training state (a fresh run of a random synthetic
model first gets the optional SFT warm-up stage, rl/warmup.py), then each step is: rollout
(prompts -> the one generation path -> the task's rewards -> advantages), learn (old log-probs
recomputed by the learner, optimizer steps over minibatches), and the after-step hooks, each with
its period: stop checks, metrics, held-out eval (`eval.evaluate`), checkpoint, preemption.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from r1zero_jax import dtypes, paths
from r1zero_jax import sharding as shd
from r1zero_jax import tasks
from r1zero_jax.config import RunConfig, to_dict, validate
from r1zero_jax.data.pipeline import PipelineConfig, PromptPipeline
from r1zero_jax.data.sources import load_rows
from r1zero_jax.rl import losses
from r1zero_jax.models.decoder import params_of
from r1zero_jax.rl.learner import (LearnBatch, Learner, TrainState, abstract_state, init_state,
                                   jit_learner)
from r1zero_jax.rl.metrics import RunLogger, plot_curves, rollout_metrics
from r1zero_jax.run_lock import RunLock
from r1zero_jax.sampling.generation import generate, sampling_params
from r1zero_jax.sampling.sampler import Rollout

# May change when a run is resumed; anything else needs --allow-config-change.
RESUMABLE_CHANGES = ("name", "train.steps", "log", "eval.every", "checkpoint")


# ---------------------------------------------------------------------------------------------
# Model


def build_model(cfg: RunConfig, mesh, tokenizer=None):
    """(model config, fp32 master params dict, tokenizer): from `model.path`, or random init."""
    from r1zero_jax.models import config_from_run
    from r1zero_jax.models.decoder import init_model

    m = cfg.model
    dtype, param_dtype = dtypes.numpy_dtype(m.dtype), dtypes.numpy_dtype(m.param_dtype)
    if m.path:
        from r1zero_jax.convert.hf import load_model

        model, qc, tok = load_model(m.path, mesh, dtype=dtype, param_dtype=param_dtype)
        return qc, params_of(model), tokenizer or tok
    qc = config_from_run(m, None if tokenizer is None else len(tokenizer))
    if tokenizer is not None and len(tokenizer) > qc.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than model.vocab_size="
                         f"{qc.vocab_size}")
    model = init_model(qc, mesh, dtype=dtype, param_dtype=param_dtype, seed=m.init_seed)
    return qc, params_of(model), tokenizer


# ---------------------------------------------------------------------------------------------
# One step's pieces


def training_rewards(rollout: Rollout, scores: tasks.Scores) -> np.ndarray:
    """float32 [R]: the task's rewards, with 0 for a response cut at max_new_tokens. A cut
    response has no final answer of its own making (a number it was still writing can match by
    accident), and rewarding it would teach the policy that running out of tokens is fine; the
    paper does the same. Evaluation grades cut responses on their text instead (eval.py)."""
    return np.where(rollout.truncated, 0.0, scores.rewards).astype(np.float32)


def _check_finite(m: dict, ckpt) -> None:
    """Stops the run at a non-finite loss or gradient norm, before that step is checkpointed:
    every later step would train on NaN weights, and resuming would restore them."""
    bad = {k: m[k] for k in ("loss", "grad_norm") if not np.isfinite(m[k])}
    if bad:
        ckpt.wait()  # the previous step's save, if still in flight, completes intact
        raise ValueError(f"step {m['step']}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
                         + f" is not finite; stopped without checkpointing it (the last checkpoint "
                         f"in {ckpt.directory} is intact). Lower optim.learning_rate or set "
                         "optim.clip_norm, then rerun the same command to resume")


def _check_slices(cfg: RunConfig, slices: int) -> None:
    """Refuses a rollout that does not split evenly over the processes' data slices (before
    any model work): every process samples the same number of prompts per call."""
    for key, n in (("rollout prompts (rl.rollout_batch_size / rl.group_size)",
                    cfg.prompts_per_rollout),
                   ("sampling.prompts_per_call", cfg.sampling.prompts_per_call)):
        if n % slices:
            raise ValueError(f"{key}={n} is not divisible by the {slices} data slices of this "
                             f"run (one per process whose devices hold their own rows of mesh "
                             f"{cfg.mesh.spec!r}); each process samples an equal share")


def _shared_token_counts(encode, prompts: list[str]) -> list[int]:
    """Every prompt's token count, each process encoding a contiguous share (gathered)."""
    count, rank = jax.process_count(), jax.process_index()
    share = -(-len(prompts) // count)
    own = prompts[rank * share:(rank + 1) * share]
    mine = [len(t) for t in encode(own)] if own else []
    return [n for counts in shd.allgather_json(mine) for n in counts]


@dataclasses.dataclass
class Hook:
    """Runs `fn(step, metrics)` after every `every`-th RL step (step counts from 1)."""

    every: int
    fn: Callable[[int, dict], None]


class _Stop(Exception):
    """Raised by a hook to end the loop after the current step (preemption)."""


@dataclasses.dataclass
class _RunState:
    """What the loop carries from step to step."""

    state: TrainState
    ref_params: Any
    pipeline: PromptPipeline
    ckpt: Any
    logger: RunLogger
    eval_before: float | None
    last_eval: dict | None = None


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Dr. GRPO / GRPO training of one config in one run directory (resumable)."""

    def __init__(self, cfg: RunConfig, workdir: str, *, mesh=None,
                 allow_config_change: bool = False, printer=print,
                 stop_signals=(signal.SIGTERM,)):
        self.mesh = mesh or shd.make_mesh(cfg.mesh.spec)
        self.cfg = validate(cfg, num_devices=self.mesh.devices.size)
        # Each process reads, samples and learns from its data slice of every rollout only.
        self.slice, self.slices = shd.data_slice(self.mesh)
        _check_slices(self.cfg, self.slices)
        self.is_writer = jax.process_index() == 0
        self.workdir = workdir
        self.print = printer if self.is_writer else (lambda *a, **k: None)
        self.allow_config_change = allow_config_change
        # Storage and the run directory before any model or data work: a dead bucket or a
        # second trainer on this directory is refused in seconds, not after a model load.
        for directory in (workdir, self.cfg.checkpoint.directory):
            paths.check_gcs_bucket(directory)
        paths.makedirs(workdir)
        self._lock = RunLock(workdir, printer=self.print).acquire() if self.is_writer else None
        # From here to the end of the first step a stop signal exits at once (exit code 75):
        # there is nothing new to save while loading, compiling and sampling the first rollout.
        from r1zero_jax.checkpoint import PreemptionGuard  # Orbax: imported after the lock

        self._guard = PreemptionGuard(stop_signals, on_idle_exit=self._release_lock).__enter__()
        try:
            if self.is_writer:  # before the load, not after minutes of it
                from r1zero_jax.plan import host_warning

                if warning := host_warning(self.cfg):
                    print(warning, file=sys.stderr, flush=True)
            self._build()
        except BaseException:
            self.close()
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def close(self) -> None:
        """Releases the run directory and the stop signals (done by `run` at its end)."""
        self._guard.__exit__(None, None, None)
        self._release_lock()

    def _build(self) -> None:
        """The components: task, tokenizer, model, rows, learner."""
        c = self.cfg
        self.task = tasks.from_config(c.data.task, c.data.template)
        if c.train.warmup_sft_steps and self.task.warmup_data() is None:
            raise ValueError(f"train.warmup_sft_steps={c.train.warmup_sft_steps}: task "
                             f"{self.task.name!r} has no warm-up data (Task.warmup_data)")
        tokenizer = self.task.tokenizer()
        if tokenizer is None and c.data.source == "synthetic":
            from r1zero_jax.data.synthetic import SyntheticTokenizer

            tokenizer = SyntheticTokenizer()
        self.qconfig, self._init_params, self.tokenizer = build_model(c, self.mesh, tokenizer)
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer: model.path={c.model.path!r} holds none")
        self.train_rows = self._rows(c.data.source, "train", 0)
        self.eval_rows = self._rows(c.eval.source, "eval", c.eval.size) if c.eval.source else []
        self.learner = Learner.from_config(c, self.qconfig)
        self.bind, self.tx = self.learner.bind, self.learner.tx

    def _rows(self, source: str, split: str, size: int) -> list[dict]:
        rows = self.task.rows(split, size, self.cfg.data.seed)
        return rows if rows is not None else load_rows(
            source, self.cfg.data.data_dir, split=split, size=size, seed=self.cfg.data.seed)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, steps: int | None = None) -> dict:
        """Trains until `steps` (default train.steps), resuming the run directory; returns the
        summary. Releases the run directory at the end, however it ends."""
        try:
            return self._run(self.cfg.train.steps if steps is None else steps)
        finally:
            self.close()

    def _run(self, total: int) -> dict:
        from r1zero_jax.checkpoint import PREEMPTED_EXIT_CODE

        t_run = time.perf_counter()
        run = self._restore_or_init(total)
        logprobs_fn, step_fn = jit_learner(self.learner, run.state, self.mesh)
        preempted, guard = False, self._guard
        with self.task.pool() as pool:
            if self.eval_rows and run.eval_before is None:
                run.eval_before = self._eval(run.state.params, pool)["accuracy"]
            hooks = self._hooks(run, pool, guard, total)
            try:
                for step in range(int(run.state.step), total):
                    rollout, scores, rewards = self._rollout(run.state, step, run.pipeline, pool)
                    m, run.state = self._learn(run.state, run.ref_params, rollout, rewards,
                                               step, logprobs_fn, step_fn)
                    guard.progressed()  # a stop signal now checkpoints before exiting
                    m = {"step": step + 1, **rollout_metrics(
                        rollout, scores, rewards, self.cfg.rl.group_size,
                        gather=functools.partial(shd.gather_slices, self.mesh)), **m}
                    for hook in hooks:
                        if (step + 1) % hook.every == 0:
                            hook.fn(step + 1, m)
            except _Stop:
                preempted = True
            if self.eval_rows and not preempted:
                run.last_eval = self._eval(run.state.params, pool)
                if run.logger.history:
                    run.logger.history[-1]["eval_accuracy"] = run.last_eval["accuracy"]
        if not preempted and int(run.state.step) > 0:
            self._save(run, force=True)
        run.ckpt.wait()
        run.ckpt.close()
        run.logger.close()
        if preempted:
            self.print(f"preempted: checkpointed step {int(run.state.step)}; rerun the same "
                       "command to resume", flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
        return self._finish(run, time.perf_counter() - t_run)

    def _hooks(self, run: _RunState, pool, guard, total: int) -> list[Hook]:
        """After-step hooks, in order: a stale run lock stops the run; metrics are logged and
        checked finite before anything is saved; the held-out eval; the checkpoint; preemption."""
        c = self.cfg

        def check_lock(step, m):
            if self._lock is not None:
                self._lock.check()

        def evaluate(step, m):
            if step < total:  # the final eval runs after the loop
                m["eval_accuracy"] = self._eval(run.state.params, pool)["accuracy"]

        def log(step, m):
            run.logger.log(m)
            _check_finite(m, run.ckpt)

        def save(step, m):
            if guard.should_stop(step):
                self._save(run, force=True)
                run.ckpt.wait()
                raise _Stop
            self._save(run)

        hooks = [Hook(1, check_lock)]
        if self.eval_rows and c.eval.every:
            hooks.append(Hook(c.eval.every, evaluate))
        return hooks + [Hook(1, log), Hook(1, save)]

    def _restore_or_init(self, total: int) -> _RunState:
        """The training state: the run directory's newest readable checkpoint, else the
        initial weights (after the SFT warm-up stage when configured)."""
        from r1zero_jax.checkpoint import check_config_compatible

        c = self.cfg
        pipeline = PromptPipeline(
            self.train_rows, self.tokenizer,
            PipelineConfig(template=c.data.template, max_prompt_tokens=c.data.max_prompt_tokens,
                           batch_size=c.prompts_per_rollout // self.slices, seed=c.data.seed,
                           process_index=self.slice, process_count=self.slices),
            prompt=self.task.prompt, count_tokens=_shared_token_counts)
        ckpt = self._checkpointer()
        latest = ckpt.latest_step()
        if self.is_writer:  # the run's checkpoints are model paths too (load_model, to-hf)
            from r1zero_jax.convert.hf import write_model_files

            write_model_files(ckpt.directory, self.qconfig, c.model.path or None)
        params, self._init_params = self._init_params, None
        if latest is None and c.train.warmup_sft_steps and not c.model.path:
            params = self._warmup(params)
        state = init_state(params, self.tx, self.mesh)
        ref_params, meta = None, {}
        if latest is not None:
            # Compare configs before restoring: a changed model shape then reads as the list of
            # changed fields, not as an Orbax shape error.
            diffs = check_config_compatible(ckpt.read_meta()["config"], to_dict(c),
                                            self.allow_config_change, ignore=RESUMABLE_CHANGES)
            for d in diffs:
                self.print(f"config change on resume: {d}")
            # The newest step that reads back whole: a damaged newer one is named and skipped.
            saved, meta = ckpt.restore(abstract_state=self._ckpt_tree(abstract_state(state)))
            state = TrainState(step=saved["step"], params=saved["params"],
                               opt_state=saved["opt_state"])
            ref_params = saved.get("ref_params")
            pipeline.restore(meta["pipeline"])
            self.print(f"resumed {self.workdir} at step {meta['step']}", flush=True)
        elif c.rl.kl_beta > 0:
            ref_params = jax.tree.map(jnp.copy, state.params)
        logger = RunLogger(self.workdir, total, start_step=int(state.step),
                           tensorboard=c.log.tensorboard, enabled=self.is_writer,
                           printer=self.print)
        return _RunState(state=state, ref_params=ref_params, pipeline=pipeline, ckpt=ckpt,
                         logger=logger, eval_before=meta.get("eval_accuracy_before"))

    def _finish(self, run: _RunState, wall_s: float) -> dict:
        """The final weights (`convert to-hf` reads them), summary.json and the curves."""
        from r1zero_jax.convert.hf import save_params, write_model_files

        c, state = self.cfg, run.state
        model_dir = paths.join(self.workdir, "model")
        if self.is_writer and paths.exists(model_dir):
            paths.remove(model_dir, recursive=True)  # a resumed run replaces its final weights
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("r1zero_model_dir")
        save_params(model_dir, state.params, self.qconfig)
        if self.is_writer:
            write_model_files(model_dir, self.qconfig, c.model.path or None)
        history = run.logger.history
        eval_before = run.eval_before
        eval_after = run.last_eval["accuracy"] if run.last_eval else None
        summary = {
            "config": c.name, "num_devices": int(self.mesh.devices.size),
            "num_processes": jax.process_count(), "mesh": shd.mesh_shape(self.mesh),
            "steps": int(state.step), "eval_accuracy_before": eval_before,
            "eval_accuracy_after": eval_after,
            "final_reward_mean": history[-1]["reward_mean"] if history else None,
            "wall_time_s": round(wall_s, 1),
            "model_dir": model_dir,
        }
        self.state = state
        if self.is_writer:
            paths.write_text(paths.join(self.workdir, "summary.json"),
                             json.dumps(summary, indent=2))
            if c.log.plot and history:
                plot_curves(history, paths.join(self.workdir, "curves.png"), c.name, eval_before)
        if eval_before is not None:
            self.print(f"held-out greedy accuracy: before RL {eval_before:.3f} -> after RL "
                       f"{eval_after:.3f} ({100 * (eval_after - eval_before):+.1f} points)",
                       flush=True)
        return summary

    # -- pieces --------------------------------------------------------------------------------
    def _checkpointer(self):
        from r1zero_jax.checkpoint import Checkpointer

        k = self.cfg.checkpoint
        directory = k.directory or paths.join(self.workdir, "checkpoints")
        return Checkpointer(directory, save_every=k.every or max(self.cfg.train.steps, 1),
                            keep_last=k.keep_last, keep_every=k.keep_every or None,
                            async_save=k.async_save)

    def _save(self, run: _RunState, force: bool = False) -> None:
        step = int(run.state.step)
        meta = {"config": to_dict(self.cfg), "pipeline": run.pipeline.state(),
                "eval_accuracy_before": run.eval_before, "step": step}
        run.ckpt.save(step, self._ckpt_tree(run.state, run.ref_params), meta, force=force)

    @staticmethod
    def _ckpt_tree(state: TrainState, ref_params=None) -> dict:
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        if ref_params is not None:
            tree["ref_params"] = ref_params
        return tree

    def _warmup(self, params: dict) -> dict:
        """The optional SFT stage before RL (fresh runs only)."""
        from r1zero_jax.rl.warmup import warmup

        t = self.cfg.train
        self.print(f"supervised warm-up ({t.warmup_sft_steps} + {t.warmup_sft_habit_steps} steps) "
                   "to make a weak base model: a random model earns no reward", flush=True)
        return warmup(params, self.bind, self.task.warmup_data(), self.tokenizer, self.mesh,
                      skill_steps=t.warmup_sft_steps, habit_steps=t.warmup_sft_habit_steps,
                      lr=t.warmup_sft_lr, batch=t.warmup_sft_batch,
                      seed=t.seed, printer=self.print)

    def _eval(self, params, pool) -> dict:
        """Greedy accuracy on the held-out rows, through `eval.evaluate`."""
        from r1zero_jax.eval import evaluate

        c, t0 = self.cfg, time.perf_counter()
        greedy = sampling_params(c.sampling, n=1, greedy=True, stop_strings=self.task.stop_strings,
                                 max_new_tokens=c.eval.max_new_tokens)
        scores = evaluate(self.bind(params), self.tokenizer, {"held_out": self.eval_rows}, greedy,
                          task=self.task, mesh=self.mesh, pool=pool, batch_size=c.eval.batch_size,
                          max_prompt_tokens=c.data.max_prompt_tokens)["benchmarks"]["held_out"]
        r = {"accuracy": scores["accuracy"], "n": scores["n"],
             "response_length": scores["mean_response_length"],
             "truncation_rate": scores["truncation_rate"]}
        self.print(f"eval: greedy accuracy {r['accuracy']:.3f} on {r['n']} problems, "
                   f"mean length {r['response_length']:.1f}, truncated {r['truncation_rate']:.3f} "
                   f"({time.perf_counter() - t0:.1f}s)", flush=True)
        return r

    def _logprobs(self, fn, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Log-probs [R, Tn] of this process's rows, a microbatch of every slice at a time."""
        mb = self.cfg.microbatch // self.slices
        put = functools.partial(shd.from_local_batch, self.mesh)
        return np.concatenate([
            shd.local_rows(self.mesh, fn(params, put(tokens[s:s + mb]), put(mask[s:s + mb])))
            for s in range(0, len(tokens), mb)])

    def _rollout(self, state: TrainState, step: int, pipeline, pool):
        """G samples of each of this process's prompts of the step (its data slice), their
        scores and training rewards."""
        c = self.cfg
        t0 = time.perf_counter()
        batch = next(pipeline)
        params = sampling_params(c.sampling, n=c.rl.group_size, stop_strings=self.task.stop_strings)
        rollout = generate(self.bind(state.params), batch["prompt_tokens"], params,
                           tokenizer=self.tokenizer, mesh=self.mesh,
                           seed=jax.random.fold_in(jax.random.PRNGKey(c.train.seed), step),
                           prompts_per_call=c.sampling.prompts_per_call,
                           decode_slots=c.sampling.decode_slots,
                           page_size=c.sampling.page_size, cache_pages=c.sampling.cache_pages,
                           local=True)
        t1 = time.perf_counter()
        answers = [a for a in batch["answers"] for _ in range(c.rl.group_size)]
        scores = tasks.score(self.task, pool, rollout.texts, answers,
                             peers=shd.slice_peers(self.mesh))
        rollout.timings.update(sample_s=t1 - t0, grade_s=time.perf_counter() - t1)
        return rollout, scores, training_rewards(rollout, scores)

    def _learn(self, state: TrainState, ref_params, rollout: Rollout, rewards: np.ndarray,
               step: int, logprobs_fn, step_fn) -> tuple[dict, TrainState]:
        """Advantages, old log-probs, and the optimizer steps of one rollout."""
        c, G = self.cfg, self.cfg.rl.group_size
        t0 = time.perf_counter()
        advantages = np.asarray(losses.compute_advantages(c.rl.loss, jnp.asarray(rewards), G))
        loss_mask = rollout.mask & ~rollout.truncated[:, None] if c.rl.mask_truncated \
            else rollout.mask
        tokens, input_mask = rollout.learner_inputs()
        old_logp = self._logprobs(logprobs_fn, state.params, tokens, input_mask)
        ref_logp = (self._logprobs(logprobs_fn, ref_params, tokens, input_mask)
                    if c.rl.kl_beta > 0 else None)
        gap = shd.gather_slices(self.mesh, np.abs(old_logp - rollout.logprobs)[rollout.mask])
        # The whole rollout on the mesh, each process placing its own rows; the minibatches of
        # a permutation of all rows are gathered on the devices.
        rows = jax.tree.map(functools.partial(shd.from_local_batch, self.mesh), LearnBatch(
            tokens=tokens, input_mask=input_mask, loss_mask=loss_mask, old_logp=old_logp,
            advantages=advantages, ref_logp=ref_logp))
        total, mb = rows.tokens.shape[0], c.train.minibatch_size
        rng = np.random.default_rng([c.train.seed, step])
        step_metrics = []
        for _ in range(c.rl.epochs_per_rollout):
            order = rng.permutation(total).astype(np.int32)
            for start in range(0, total, mb):
                idx = jax.device_put(order[start:start + mb].reshape(-1, c.microbatch),
                                     shd.replicated(self.mesh))
                state, m = step_fn(state, shd.take_rows(rows, idx, mesh=self.mesh))
                step_metrics.append(m)
        state = state.replace(step=state.step + 1)
        learned = {k: float(np.mean([float(m[k]) for m in step_metrics])) for k in step_metrics[0]}
        t = rollout.timings
        learn_s = time.perf_counter() - t0
        return {
            **learned,
            "optimizer_steps": len(step_metrics),
            "logprob_gap_mean": float(gap.mean()) if gap.size else 0.0,
            "logprob_gap_max": float(gap.max()) if gap.size else 0.0,
            "gen_tokens_per_s": float(rollout.report["generated_tokens"] / max(t["sample_s"],
                                                                                1e-9)),
            "time_sample_s": t["sample_s"], "time_grade_s": t["grade_s"], "time_learn_s": learn_s,
            "time_step_s": t["sample_s"] + t["grade_s"] + learn_s,
        }, state
