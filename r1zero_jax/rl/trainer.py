"""The RL loop; the only place that knows the order of stages.

Each step: prompts -> sampler (same mesh, same weights, no copy) -> grader -> advantages ->
old log-probs recomputed by the learner (gap to the sampler's logged) -> optimizer steps over
minibatches -> metrics (metrics.jsonl, TensorBoard, one progress line) -> periodic greedy eval ->
checkpoint. Resumes from the latest checkpoint in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1zero_jax import paths
from r1zero_jax import sharding as shd
from r1zero_jax.config import RunConfig, to_dict, validate
from r1zero_jax.data.pipeline import PipelineConfig, PromptPipeline, make_encoder
from r1zero_jax.rewards.templates import STOP_STRINGS, apply_template
from r1zero_jax.rl import losses
from r1zero_jax.rl import rollout as ro
from r1zero_jax.rl.learner import (LearnBatch, Learner, TrainState, abstract_state, init_state,
                                   jit_learner, params_of)
from r1zero_jax.rl.metrics import RunLogger, plot_curves, rollout_metrics
from r1zero_jax.run_lock import RunLock

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# May change when a run is resumed; anything else needs --allow-config-change.
RESUMABLE_CHANGES = ("name", "train.steps", "log", "eval.every", "checkpoint")


# ---------------------------------------------------------------------------------------------
# Data and model


def load_rows(source: str, data_dir: str = "", *, split: str = "train", size: int = 0,
              seed: int = 0) -> list[dict]:
    """Rows {problem, answer} of a data source (see DataConfig.source)."""
    if source == "synthetic":
        from r1zero_jax.data.synthetic import SyntheticTask

        return SyntheticTask().rows(split, size or None, seed)
    if source.startswith("jsonl:"):
        from r1zero_jax.data.builders import read_jsonl_rows

        rows = read_jsonl_rows(source[len("jsonl:"):])  # bad rows skipped and counted
    else:
        from r1zero_jax.data.builders import load_split

        rows = load_split(source, data_dir or None)
    if size:
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:size]]
    return rows


def build_model(cfg: RunConfig, mesh, tokenizer=None):
    """(QwenConfig, fp32 master params dict, tokenizer): from `model.path`, or random init."""
    from r1zero_jax.models.qwen2 import QwenConfig, init_model

    m = cfg.model
    dtype, param_dtype = _DTYPES[m.dtype], _DTYPES[m.param_dtype]
    if m.path:
        from r1zero_jax.convert.hf import load_model

        model, qc, tok = load_model(m.path, mesh, dtype=dtype, param_dtype=param_dtype)
        return qc, params_of(model), tokenizer or tok
    if m.preset == "custom":
        vocab = m.vocab_size or -(-len(tokenizer) // 64) * 64
        qc = QwenConfig(vocab_size=vocab, hidden_size=m.hidden_size,
                        intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                        rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
                        tie_word_embeddings=m.tie_word_embeddings,
                        max_position_embeddings=m.max_position_embeddings)
    else:
        qc = QwenConfig.preset(m.preset)
    if tokenizer is not None and len(tokenizer) > qc.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than model.vocab_size="
                         f"{qc.vocab_size}")
    model = init_model(qc, mesh, dtype=dtype, param_dtype=param_dtype, seed=m.init_seed)
    return qc, params_of(model), tokenizer


def sampling_params(cfg: RunConfig, tokenizer, *, n: int, greedy: bool = False,
                    max_new_tokens: int | None = None):
    from r1zero_jax.sampling.sampler import SamplingParams

    s = cfg.sampling
    return SamplingParams(
        max_new_tokens=max_new_tokens or s.max_new_tokens,
        temperature=0.0 if greedy else s.temperature,
        top_p=1.0 if greedy else s.top_p, top_k=0 if greedy else s.top_k, n=n,
        stop_token_ids=(tokenizer.eos_token_id,),
        stop_strings=STOP_STRINGS[cfg.data.template])


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, rows: list[dict], tokenizer, cfg: RunConfig, mesh, pool) -> dict:
    """Greedy accuracy, mean response length and truncation rate on `rows`."""
    e, template = cfg.eval, cfg.data.template
    max_new = e.max_new_tokens or cfg.sampling.max_new_tokens
    sampling = sampling_params(cfg, tokenizer, n=1, greedy=True, max_new_tokens=max_new)
    encode = make_encoder(tokenizer)
    prompts = encode([apply_template(template, r["problem"]) for r in rows])
    keep = [i for i, p in enumerate(prompts) if len(p) <= cfg.data.max_prompt_tokens]
    correct, lengths, truncated = [], [], []
    for start in range(0, len(keep), e.batch_size):
        idx = keep[start:start + e.batch_size]
        # Pad the last batch to the full size so only one shape compiles.
        padded = idx + [idx[-1]] * (e.batch_size - len(idx))
        rb = ro.generate(model, [prompts[i] for i in padded], [rows[i]["answer"] for i in padded],
                         params=sampling, tokenizer=tokenizer, mesh=mesh,
                         # A raw uint32 key, as in training: a typed key made from an int cannot
                         # be placed on a multi-process mesh (greedy: its value is unused).
                         seed=jax.random.PRNGKey(0),
                         max_prompt_tokens=cfg.data.max_prompt_tokens)
        ro.grade(rb, template, pool)
        k = len(idx)
        correct += list(rb.rewards[:k] > 0)
        lengths += list(rb.lengths[:k])
        truncated += list(rb.truncated[:k])
    n = len(correct)
    return {"accuracy": float(np.mean(correct)) if n else 0.0,
            "response_length": float(np.mean(lengths)) if n else 0.0,
            "truncation_rate": float(np.mean(truncated)) if n else 0.0,
            "n": n, "skipped": len(rows) - len(keep)}


# ---------------------------------------------------------------------------------------------
# The trainer


def learner_minibatches(rb: ro.RolloutBatch, old_logp: np.ndarray, advantages: np.ndarray,
                        loss_mask: np.ndarray, ref_logp: np.ndarray | None, *, minibatch: int,
                        microbatch: int, order: np.ndarray):
    """Host LearnBatches [A, M, ...] over the rollout in `order`."""
    tokens, input_mask = rb.learner_inputs()
    a = minibatch // microbatch
    for start in range(0, len(order), minibatch):
        idx = order[start:start + minibatch]
        shape = lambda x: x[idx].reshape(a, microbatch, *x.shape[1:])  # noqa: E731
        yield LearnBatch(tokens=shape(tokens), input_mask=shape(input_mask),
                         loss_mask=shape(loss_mask), old_logp=shape(old_logp),
                         advantages=shape(advantages),
                         ref_logp=None if ref_logp is None else shape(ref_logp))


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


class Trainer:
    """Dr. GRPO / GRPO training of one config in one run directory (resumable)."""

    def __init__(self, cfg: RunConfig, workdir: str, *, mesh=None, allow_config_change: bool = False,
                 printer=print, stop_signals=(signal.SIGTERM,)):
        self.mesh = mesh or shd.make_mesh(cfg.mesh.spec)
        self.cfg = validate(cfg, num_devices=self.mesh.devices.size)
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
            self._setup()
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

    def _setup(self) -> None:
        c = self.cfg
        e = c.eval

        self.tokenizer = None
        if c.data.source == "synthetic":
            from r1zero_jax.data.synthetic import SyntheticTokenizer

            self.tokenizer = SyntheticTokenizer()
        self.qconfig, params, self.tokenizer = build_model(c, self.mesh, self.tokenizer)
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer: model.path={c.model.path!r} holds none")
        self.train_rows = load_rows(c.data.source, c.data.data_dir, split="train", seed=c.data.seed)
        self.eval_rows = (load_rows(e.source, c.data.data_dir, split="eval", size=e.size, seed=c.data.seed)
                          if e.source else [])
        self.learner = Learner.from_config(c, self.qconfig)
        self.bind, self.tx = self.learner.bind, self.learner.tx
        self._init_params = params

    # -- pieces --------------------------------------------------------------------------------
    def _checkpointer(self):
        from r1zero_jax.checkpoint import Checkpointer

        k = self.cfg.checkpoint
        directory = k.directory or paths.join(self.workdir, "checkpoints")
        return Checkpointer(directory, save_every=k.every or max(self.cfg.train.steps, 1),
                            keep_last=k.keep_last, keep_every=k.keep_every or None,
                            async_save=k.async_save)

    def _warmup(self, params: dict) -> dict:
        from r1zero_jax.data.synthetic import SyntheticTask
        from r1zero_jax.rl.warmup import warmup

        t = self.cfg.train
        self.print(f"supervised warm-up ({t.warmup_sft_steps} + {t.warmup_sft_habit_steps} steps) "
                   "to make a weak base model: a random model earns no reward", flush=True)
        return warmup(params, self.bind, SyntheticTask(), self.tokenizer, self.mesh,
                      skill_steps=t.warmup_sft_steps, habit_steps=t.warmup_sft_habit_steps,
                      lr=t.warmup_sft_lr, batch=t.warmup_sft_batch,
                      seed=t.seed, printer=self.print)

    def _logprobs(self, fn, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        mb = self.cfg.microbatch
        out = [shd.to_host(fn(params, shd.shard_batch(self.mesh, tokens[s:s + mb]),
                           shd.shard_batch(self.mesh, mask[s:s + mb])))
               for s in range(0, len(tokens), mb)]
        return np.concatenate(out)

    def _eval(self, params, pool) -> dict:
        t0 = time.perf_counter()
        r = evaluate(self.bind(params), self.eval_rows, self.tokenizer, self.cfg, self.mesh, pool)
        self.print(f"eval: greedy accuracy {r['accuracy']:.3f} on {r['n']} problems, "
                   f"mean length {r['response_length']:.1f}, truncated {r['truncation_rate']:.3f} "
                   f"({time.perf_counter() - t0:.1f}s)", flush=True)
        return r

    # -- the loop ------------------------------------------------------------------------------
    def run(self, steps: int | None = None) -> dict:
        """Trains until `steps` (default train.steps), resuming the run directory; returns the
        summary. Releases the run directory at the end, however it ends."""
        try:
            return self._run(steps)
        finally:
            self.close()

    def _run(self, steps: int | None = None) -> dict:
        from r1zero_jax.checkpoint import PREEMPTED_EXIT_CODE, check_config_compatible
        from r1zero_jax.rewards.pool import GraderPool

        c = self.cfg
        if steps is not None:
            c = self.cfg = dataclasses.replace(c, train=dataclasses.replace(c.train, steps=steps))
        total = c.train.steps
        t_run = time.perf_counter()
        pipeline = PromptPipeline(self.train_rows, self.tokenizer, PipelineConfig(
            template=c.data.template, max_prompt_tokens=c.data.max_prompt_tokens,
            batch_size=c.prompts_per_rollout, seed=c.data.seed))
        ckpt = self._checkpointer()
        latest = ckpt.latest_step()
        if self.is_writer:  # the run's checkpoints are model paths too (load_model, to-hf)
            from r1zero_jax.convert.hf import write_model_files

            write_model_files(ckpt.directory, self.qconfig, c.model.path or None)
        params = self._init_params
        self._init_params = None
        meta: dict[str, Any] = {}
        if latest is None and c.train.warmup_sft_steps and not c.model.path:
            params = self._warmup(params)
        state = init_state(params, self.tx, self.mesh)
        ref_params = None
        if latest is not None:
            # Compare configs before restoring: a changed model shape then reads as the list of
            # changed fields, not as an Orbax shape error.
            diffs = check_config_compatible(ckpt.read_meta()["config"], to_dict(c),
                                            self.allow_config_change, ignore=RESUMABLE_CHANGES)
            for d in diffs:
                self.print(f"config change on resume: {d}")
            # The newest step that reads back whole: a damaged newer one is named and skipped.
            saved, meta = ckpt.restore(abstract_state=self._ckpt_tree(abstract_state(state)))
            latest = meta["step"]
            state = TrainState(step=saved["step"], params=saved["params"],
                               opt_state=saved["opt_state"])
            ref_params = saved.get("ref_params")
            pipeline.restore(meta["pipeline"])
            self.print(f"resumed {self.workdir} at step {latest}", flush=True)
        elif c.rl.kl_beta > 0:
            ref_params = jax.tree.map(jnp.copy, state.params)
        logprobs_fn, step_fn = jit_learner(self.learner, state, self.mesh)
        start = int(state.step)
        logger = RunLogger(self.workdir, total, start_step=start, tensorboard=c.log.tensorboard,
                           enabled=self.is_writer, printer=self.print)
        key = jax.random.PRNGKey(c.train.seed)
        preempted = False
        guard = self._guard
        with GraderPool() as pool:
            eval_before = meta.get("eval_accuracy_before")
            if self.eval_rows and eval_before is None:
                eval_before = self._eval(state.params, pool)["accuracy"]
            for step in range(start, total):
                if self._lock is not None:
                    self._lock.check()
                m, state = self._step(state, step, pipeline, pool, logprobs_fn, step_fn,
                                      ref_params, key)
                guard.progressed()
                if self.eval_rows and c.eval.every and (step + 1) % c.eval.every == 0 \
                        and step + 1 < total:
                    m["eval_accuracy"] = self._eval(state.params, pool)["accuracy"]
                logger.log(m)
                _check_finite(m, ckpt)
                meta = {"config": to_dict(c), "pipeline": pipeline.state(),
                        "eval_accuracy_before": eval_before, "step": step + 1}
                tree = self._ckpt_tree(state, ref_params)
                if guard.should_stop(step + 1):
                    ckpt.save(step + 1, tree, meta, force=True)
                    ckpt.wait()
                    preempted = True
                    break
                ckpt.save(step + 1, tree, meta)
            eval_after = None
            if self.eval_rows and not preempted:
                r = self._eval(state.params, pool)
                eval_after = r["accuracy"]
                if logger.history:
                    logger.history[-1]["eval_accuracy"] = eval_after
        if not preempted and int(state.step) > 0:
            ckpt.save(int(state.step), self._ckpt_tree(state, ref_params),
                      {"config": to_dict(c), "pipeline": pipeline.state(),
                       "eval_accuracy_before": eval_before, "step": int(state.step)}, force=True)
        ckpt.wait()
        ckpt.close()
        logger.close()
        if preempted:
            self.print(f"preempted: checkpointed step {int(state.step)}; rerun the same command "
                       "to resume", flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
        # The trained weights in the format `r1zero-jax convert to-hf` reads.
        from r1zero_jax.convert.hf import save_params, write_model_files

        model_dir = paths.join(self.workdir, "model")
        if self.is_writer and paths.exists(model_dir):
            paths.remove(model_dir, recursive=True)  # a resumed run replaces its final weights
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("r1zero_model_dir")
        save_params(model_dir, state.params, self.qconfig)
        if self.is_writer:
            write_model_files(model_dir, self.qconfig, c.model.path or None)
        summary = {
            "config": c.name, "num_devices": int(self.mesh.devices.size),
            "num_processes": jax.process_count(), "mesh": shd.mesh_shape(self.mesh),
            "steps": int(state.step), "eval_accuracy_before": eval_before,
            "eval_accuracy_after": eval_after,
            "final_reward_mean": logger.history[-1]["reward_mean"] if logger.history else None,
            "wall_time_s": round(time.perf_counter() - t_run, 1),
            "model_dir": model_dir,
        }
        self.state = state
        if self.is_writer:
            paths.write_text(paths.join(self.workdir, "summary.json"), json.dumps(summary, indent=2))
            if c.log.plot and logger.history:
                plot_curves(logger.history, paths.join(self.workdir, "curves.png"), c.name,
                            eval_before)
        if eval_before is not None:
            self.print(f"held-out greedy accuracy: before RL {eval_before:.3f} -> after RL "
                       f"{eval_after:.3f} ({100 * (eval_after - eval_before):+.1f} points)", flush=True)
        return summary

    @staticmethod
    def _ckpt_tree(state: TrainState, ref_params=None) -> dict:
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        if ref_params is not None:
            tree["ref_params"] = ref_params
        return tree

    def _step(self, state: TrainState, step: int, pipeline, pool, logprobs_fn, step_fn, ref_params,
              key) -> tuple[dict, TrainState]:
        c, G = self.cfg, self.cfg.rl.group_size
        t0 = time.perf_counter()
        batch = next(pipeline)
        rb = ro.generate(self.bind(state.params), batch["prompt_tokens"], batch["answers"],
                         params=sampling_params(c, self.tokenizer, n=G), tokenizer=self.tokenizer,
                         mesh=self.mesh, seed=jax.random.fold_in(key, step),
                         prompts_per_call=c.sampling.prompts_per_call,
                         max_prompt_tokens=c.data.max_prompt_tokens)
        t1 = time.perf_counter()
        ro.grade(rb, c.data.template, pool)
        t2 = time.perf_counter()
        advantages = np.asarray(losses.compute_advantages(c.rl.loss, jnp.asarray(rb.rewards), G))
        loss_mask = rb.mask & ~rb.truncated[:, None] if c.rl.mask_truncated else rb.mask
        tokens, input_mask = rb.learner_inputs()
        old_logp = self._logprobs(logprobs_fn, state.params, tokens, input_mask)
        ref_logp = (self._logprobs(logprobs_fn, ref_params, tokens, input_mask)
                    if c.rl.kl_beta > 0 else None)
        gap = np.abs(old_logp - rb.sampler_logp)[rb.mask]
        rng = np.random.default_rng([c.train.seed, step])
        put = lambda x: shd.shard_batch(self.mesh, x, (None, "batch") + (None,) * (x.ndim - 2))  # noqa: E731
        step_metrics = []
        for _ in range(c.rl.epochs_per_rollout):
            for hb in learner_minibatches(rb, old_logp, advantages, loss_mask, ref_logp,
                                          minibatch=c.train.minibatch_size,
                                          microbatch=c.microbatch, order=rng.permutation(rb.size)):
                state, m = step_fn(state, jax.tree.map(put, hb))
                step_metrics.append(m)
        state = state.replace(step=state.step + 1)
        learned = {k: float(np.mean([float(m[k]) for m in step_metrics])) for k in step_metrics[0]}
        t3 = time.perf_counter()
        return {
            "step": step + 1,
            **rollout_metrics(rb, G),
            **learned,
            "optimizer_steps": len(step_metrics),
            "logprob_gap_mean": float(gap.mean()) if gap.size else 0.0,
            "logprob_gap_max": float(gap.max()) if gap.size else 0.0,
            "gen_tokens_per_s": float(rb.mask.sum() / max(t1 - t0, 1e-9)),
            "time_sample_s": t1 - t0, "time_grade_s": t2 - t1, "time_learn_s": t3 - t2,
            "time_step_s": t3 - t0,
        }, state
