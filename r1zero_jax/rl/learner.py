"""The learner: response log-probs under the current weights, and one optimizer step.

Sequences are a left-padded prompt followed by a right-padded response: tokens [B, T] with the
last Tn positions the response. Params are fp32 master weights (a nested dict); the model casts
them to its compute dtype (bf16 on accelerators), and gradients come back in fp32.
A minibatch arrives as [A, M, ...]: A microbatches of M sequences, scanned with gradient
accumulation; the loss normalisers are the whole minibatch's, so summing microbatch losses gives
exactly the minibatch loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from r1zero_jax import sharding as shd
from r1zero_jax.config import OptimConfig, RLConfig
from r1zero_jax.models import DecoderConfig
from r1zero_jax.models.decoder import Decoder, abstract_model, positions_from_mask
from r1zero_jax.rl import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # RL steps done, int32 scalar
    params: Any  # fp32 master weights, nested dict
    opt_state: Any


@flax.struct.dataclass
class LearnBatch:
    """One minibatch, leading dims [A, M] (accumulation steps, microbatch)."""

    tokens: jax.Array  # int32 [A, M, T] prompt ++ response
    input_mask: jax.Array  # bool [A, M, T] real tokens
    loss_mask: jax.Array  # bool [A, M, Tn] response tokens that enter the loss
    old_logp: jax.Array  # float32 [A, M, Tn]
    advantages: jax.Array  # float32 [A, M]
    ref_logp: jax.Array | None = None  # float32 [A, M, Tn] when kl_beta > 0


def make_binder(config: DecoderConfig, *, dtype, param_dtype=jnp.float32,
                remat: bool = False) -> Callable[[dict], Decoder]:
    """params (nested dict) -> the model wrapping them (no copy; usable inside jit)."""
    graphdef, abstract = nnx.split(abstract_model(config, dtype=dtype, param_dtype=param_dtype,
                                                  remat=remat))

    def bind(params: dict) -> Decoder:
        state = jax.tree.map(lambda x: x, abstract)
        state.replace_by_pure_dict(params)
        return nnx.merge(graphdef, state)

    return bind


def response_logprobs(model: Decoder, tokens, input_mask, num_new: int, *, temperature: float = 1.0,
                      chunk: int = 0):
    """Log-probs and entropies [B, Tn] of the last `num_new` tokens under `model`.

    The LM head runs over Tn in chunks of `chunk` positions (rematerialised in the backward
    pass), so [B, Tn, V] logits never exist at once for long responses. Logits stay
    vocab-sharded: the target's logit is picked by a masked sum, not a gather (a gather across
    vocab shards makes XLA move the whole logits).
    """
    h, _ = model.hidden_states(tokens, positions_from_mask(input_mask), input_mask)
    h = h[:, -num_new - 1:-1]  # position t predicts token t + 1
    targets = tokens[:, -num_new:]
    w = model.head_weight()  # gathered once, outside the chunk loop

    def head(hc, tc):
        logits = model.logits(hc, w) / temperature  # float32 [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        logp = jnp.sum(jnp.where(vocab == tc[..., None], logits, 0.0), axis=-1) - lse
        sg = jax.lax.stop_gradient(logits)
        entropy = jax.lax.stop_gradient(lse) - (jax.nn.softmax(sg, axis=-1) * sg).sum(-1)
        return logp, entropy

    if not chunk or chunk >= num_new:
        return head(h, targets)
    pad = -num_new % chunk
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tp = jnp.pad(targets, ((0, 0), (0, pad)))
    b, n = hp.shape[0], hp.shape[1] // chunk
    hs = hp.reshape(b, n, chunk, -1).swapaxes(0, 1)
    ts = tp.reshape(b, n, chunk).swapaxes(0, 1)
    logp, ent = jax.lax.map(lambda xs: jax.checkpoint(head)(*xs), (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :num_new]  # noqa: E731
    return unchunk(logp), unchunk(ent)


def lr_schedule(o: OptimConfig) -> optax.Schedule:
    """Linear warm-up to the peak over `warmup_steps` optimizer steps, then constant."""
    if not o.warmup_steps:
        return optax.constant_schedule(o.learning_rate)
    return lambda count: o.learning_rate * jnp.minimum(1.0, (count + 1) / o.warmup_steps)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw


def opt_state_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
    """Shardings of `tx`'s state: every params-shaped tree (Adam's mu and nu) leaf by leaf like
    the params, counters replicated. `params`: arrays or ShapeDtypeStructs with shardings."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_utils.tree_map_params(
        tx, lambda _, p: p.sharding, abstract, params,
        transform_non_params=lambda _: shd.replicated(mesh))


def init_state(params: dict, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    # optax's zeros do not depend on the params' values, so without out_shardings XLA would
    # replicate mu and nu on every chip.
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shd.replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt_state)


def abstract_train_state(params, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The TrainState of `init_state` as ShapeDtypeStructs (params: abstract, with shardings)."""
    opt = shd.abstract(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt)


def state_shardings(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)


def abstract_state(state: TrainState):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


@dataclasses.dataclass(frozen=True)
class Learner:
    """Jitted learner functions for one model, loss and optimizer on one mesh."""

    bind: Callable[[dict], Decoder]
    rl: RLConfig
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    max_new_tokens: int  # Dr. GRPO's constant normaliser, and the response length Tn
    temperature: float = 1.0
    logits_chunk: int = 0

    @classmethod
    def from_config(cls, cfg, qconfig: DecoderConfig) -> Learner:
        """The learner of a RunConfig (the trainer's, and the one `plan --compile` compiles)."""
        m = cfg.model
        return cls(bind=make_binder(qconfig, dtype=jnp.dtype(m.dtype),
                                    param_dtype=jnp.dtype(m.param_dtype), remat=m.remat),
                   rl=cfg.rl, tx=make_optimizer(cfg.optim), schedule=lr_schedule(cfg.optim),
                   max_new_tokens=cfg.sampling.max_new_tokens,
                   temperature=cfg.sampling.temperature or 1.0,
                   logits_chunk=cfg.train.logits_chunk)

    def logprobs(self, params, tokens, input_mask):
        """float32 [B, Tn] log-probs of the responses, no gradient (old / reference log-probs)."""
        model = self.bind(params)
        logp, _ = response_logprobs(model, tokens, input_mask, self.max_new_tokens,
                                    temperature=self.temperature, chunk=self.logits_chunk)
        return logp

    def _microbatch_loss(self, params, mb: LearnBatch, num_seqs, num_tokens):
        model = self.bind(params)
        logp, entropy = response_logprobs(model, mb.tokens, mb.input_mask, self.max_new_tokens,
                                          temperature=self.temperature, chunk=self.logits_chunk)
        rl = self.rl
        loss, metrics = losses.policy_loss(
            rl.loss, logp, mb.old_logp, mb.advantages, mb.loss_mask, max_len=self.max_new_tokens,
            clip_low=rl.clip_low, clip_high=rl.clip_high, aggregation=rl.aggregation,
            ref_logp=mb.ref_logp, kl_beta=rl.kl_beta, num_seqs=num_seqs, num_tokens=num_tokens)
        mask = mb.loss_mask.astype(jnp.float32)
        ntok = mask.sum()
        metrics["entropy"] = (entropy * mask).sum() / jnp.maximum(ntok, 1.0)
        return loss, (metrics, ntok)

    def train_step(self, state: TrainState, batch: LearnBatch) -> tuple[TrainState, dict]:
        """One optimizer step over a minibatch [A, M, ...] (A accumulation steps)."""
        a, m = batch.advantages.shape
        num_tokens = batch.loss_mask.sum()
        grad_fn = jax.value_and_grad(self._microbatch_loss, has_aux=True)

        def body(acc, mb):
            (loss, (metrics, ntok)), g = grad_fn(state.params, mb, a * m, num_tokens)
            return jax.tree.map(jnp.add, acc, g), (loss, metrics, ntok)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (loss, metrics, ntok) = jax.lax.scan(body, zeros, batch)
        weights = ntok / jnp.maximum(ntok.sum(), 1.0)
        out = {k: (v * weights).sum() for k, v in metrics.items()}
        out["loss"] = loss.sum()
        out["grad_norm"] = optax.global_norm(grads)
        out["lr"] = self.schedule(_count(state.opt_state))
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state), out


def _count(opt_state) -> jax.Array:
    """Optimizer steps taken so far (the adam count) from an optax state."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(s, optax.ScaleByAdamState):
            return s.count
    raise ValueError("optimizer state holds no Adam counter")


def _on_mesh(fn, mesh: Mesh):
    """fn traced with its activations pinned to `mesh` (see `sharding.constrain`)."""
    def traced(*args):
        with shd.activation_mesh(mesh):
            return fn(*args)

    return traced


def jit_learner(learner: Learner, state: TrainState, mesh: Mesh):
    """(logprobs_fn, train_step_fn) jitted with the state kept in its shardings. `state` may be
    abstract (ShapeDtypeStructs with shardings), as when compiling for another topology."""
    shardings = state_shardings(state)
    rep = shd.replicated(mesh)
    logprobs = jax.jit(_on_mesh(learner.logprobs, mesh),
                       out_shardings=shd.logical_sharding(mesh, ("batch", None)))
    step = jax.jit(_on_mesh(learner.train_step, mesh), out_shardings=(shardings, rep),
                   donate_argnums=(0,))
    return logprobs, step
