"""Continuous batching: a fixed number of decode slots works through the whole rollout inside one
jitted loop, each slot taking the next pending row as soon as its row ends.

Shapes: B prompts, n samples each, R = B*n rows (row b*n+j is sample j of prompt b), S decode
slots, Tp prompt width, M max_new_tokens, C = Tp + M cache slots per decode slot.

- The B prompts are prefilled once (`sampler.prefill_prompts`); their caches stay beside the
  slots' cache. A slot whose row ends is refilled in the loop: the next row's prompt KV and mask
  are copied in (the n samples of a prompt share its prefill) and its generated part is marked
  empty. The copies run one prompt at a time, in a loop over the slots refilled this iteration
  (usually none or one): on a mesh a copy moves one prompt's cache [K, H, Tp] per layer, where
  a batched gather would move `REFILLS_PER_STEP` of them every step. At most `REFILLS_PER_STEP`
  slots are refilled per iteration (a slot left over waits one).
- A slot's cache has a static call's row layout (prompt at [0, Tp), token i at Tp + i) and token
  i of row r draws under fold_in(fold_in(key, i), r), the key `sampler.sample` uses: every row
  gets the tokens and log-probs of one big static call, whatever the slot count.
- A refilled slot's first token is chosen from its prompt's last hidden state, as a static call's
  prefill does; the decode pass the slot also runs in that iteration is discarded (its key and
  value at slot Tp are rewritten by the next pass, which feeds the first token).
- The loop stops when every slot is idle (no row left). Outputs are scattered by row; decode
  steps, slots and wall times come back in `Rollout.timings` for `sampler.rollout_report`.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1zero_jax import sharding as shd
from r1zero_jax.models.decoder import KVCache
from r1zero_jax.sampling import vocab_parallel
from r1zero_jax.sampling.sampler import (Plan, Rollout, SamplingParams, _choose, _constrain,
                                         _constrain_cache, _stop_hit, finish, prefill_prompts,
                                         prepare)

REFILLS_PER_STEP = 8


@flax.struct.dataclass
class _Slots:
    cache: KVCache  # [S, ..., C], a write index per slot
    prompt_cache: KVCache  # [Bp, ..., Tp]
    prompt_h: jax.Array  # [Bp, D]: final-normed h of each prompt's last token
    prompt_len: jax.Array  # int32 [Bp]
    prompt_ids: jax.Array  # int32 [Bp]: each prompt's index in the rollout (random streams)
    num_rows: jax.Array  # int32 []: R
    row: jax.Array  # int32 [S]: the slot's row; Rp (past the buffers) when idle
    step: jax.Array  # int32 [S]: tokens its row has so far (the next token's index)
    last: jax.Array  # int32 [S]: the token fed next
    fresh: jax.Array  # bool [S]: the row was just taken: its first token comes from the prompt
    stop_state: jax.Array  # int32 [S, num_stop_strings]
    next_row: jax.Array  # int32 []: the next pending row
    iterations: jax.Array  # int32 []
    tokens: jax.Array  # int32 [Rp, M]
    logprobs: jax.Array  # float32 [Rp, M]
    lengths: jax.Array  # int32 [Rp]
    stopped: jax.Array  # bool [Rp]
    key: jax.Array


def _slot(x, mesh):
    return _constrain(x, mesh, ("batch",) + (None,) * (x.ndim - 1))


def _put_row(x, update, axes, *, slot, mesh: Mesh):
    """x [S, ...] laid out by logical `axes` (slots over the batch shards); update [1, ...] no
    larger than a row, written at the start of row `slot`, by the shard that holds that row
    alone (a scatter at a dynamic row of a sharded array makes XLA gather the whole array)."""
    spec = shd.logical_sharding(mesh, axes).spec
    batch = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    update = jax.lax.with_sharding_constraint(
        update, NamedSharding(mesh, P(None, *spec[1:])))

    def local(x, u, slot):
        rows = x.shape[0]
        first = jax.lax.axis_index(batch) * rows if batch else 0
        at = jnp.clip(slot - first, 0, rows - 1)
        start = (at,) + (0,) * (x.ndim - 1)
        old = jax.lax.dynamic_slice(x, start, u.shape)
        mine = (slot >= first) & (slot < first + rows)
        return jax.lax.dynamic_update_slice(x, jnp.where(mine, u.astype(x.dtype), old), start)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(None, *spec[1:]), P()),
                         out_specs=spec)(x, update, slot)


def _refill(s: _Slots, free, cap: int, plan: Plan) -> _Slots:
    """Give the free slots [S] the next pending rows (at most `cap` of them); the others idle."""
    n, mesh = plan.n, plan.mesh
    idle = s.tokens.shape[0]
    rank = jnp.cumsum(free) - 1
    new_row = s.next_row + rank
    take = free & (rank < cap) & (new_row < s.num_rows)
    row = jnp.where(take, new_row, jnp.where(free, idle, s.row))
    tp = s.prompt_cache.valid.shape[1]
    pc = s.prompt_cache
    order = jnp.cumsum(take)

    def copy(i, c: KVCache) -> KVCache:
        which = jnp.argmax(order == i + 1)  # the (i+1)-th refilled slot
        prompt = jnp.take(row, which) // n
        put = functools.partial(_put_row, slot=which, mesh=mesh)
        pick = lambda x: jnp.take(x, prompt[None], axis=0)  # noqa: E731
        valid = jnp.pad(pick(pc.valid), ((0, 0), (0, c.valid.shape[1] - tp)))
        return KVCache(k=tuple(put(x, pick(p), KVCache.K_AXES)
                               for x, p in zip(c.k, pc.k, strict=True)),
                       v=tuple(put(x, pick(p), KVCache.V_AXES)
                               for x, p in zip(c.v, pc.v, strict=True)),
                       valid=put(c.valid, valid, ("batch", "cache_length")), index=c.index)

    cache = jax.lax.fori_loop(0, order[-1], copy, s.cache)
    return s.replace(
        cache=cache, row=_slot(row, mesh),
        step=_slot(jnp.where(take, 0, s.step), mesh), fresh=_slot(take, mesh),
        stop_state=_slot(jnp.where(take[:, None], 0, s.stop_state), mesh),
        next_row=s.next_row + jnp.sum(take, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "slots"))
def start(state, tokens, mask, key, num_rows, prompt_ids, *, graphdef, plan: Plan,
          slots: int) -> _Slots:
    """Prefill the prompts [Bp, Tp]; fill the `slots` decode slots with rows 0, 1, ..."""
    model = nnx.merge(graphdef, state)
    mesh = plan.mesh
    prompt_cache, h = prefill_prompts(model, tokens, mask, plan)
    bp, tp = tokens.shape
    rows, m = bp * plan.n, plan.max_new_tokens
    cache = KVCache.init(model.config, slots, tp + m, model.dtype)
    cache = _constrain_cache(cache.replace(index=jnp.zeros((slots,), jnp.int32)), mesh)
    zeros = lambda shape, dt: _slot(jnp.zeros(shape, dt), mesh)  # noqa: E731
    s = _Slots(
        cache=cache, prompt_cache=prompt_cache, prompt_h=_slot(h, mesh),
        prompt_len=_slot(jnp.sum(mask, axis=-1, dtype=jnp.int32), mesh),
        prompt_ids=_slot(prompt_ids, mesh), num_rows=num_rows,
        row=zeros((slots,), jnp.int32), step=zeros((slots,), jnp.int32),
        last=zeros((slots,), jnp.int32), fresh=zeros((slots,), bool),
        stop_state=zeros((slots, plan.num_stop_strings), jnp.int32),
        next_row=jnp.zeros((), jnp.int32), iterations=jnp.zeros((), jnp.int32),
        tokens=zeros((rows, m), jnp.int32), logprobs=zeros((rows, m), jnp.float32),
        lengths=zeros((rows,), jnp.int32), stopped=zeros((rows,), bool), key=key)
    return _refill(s, jnp.ones((slots,), bool), slots, plan)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "refills"),
                   donate_argnames=("s",))
def run(state, s: _Slots, temperature, top_p, tables, finals, *, graphdef, plan: Plan,
        refills: int = REFILLS_PER_STEP) -> _Slots:
    """Decode until every row of the rollout is done."""
    model = nnx.merge(graphdef, state)
    mesh, m = plan.mesh, plan.max_new_tokens
    tp = s.prompt_cache.valid.shape[1]
    slots, idle = s.row.shape[0], s.tokens.shape[0]
    one = jnp.ones((slots, 1), bool)

    def body(s: _Slots) -> _Slots:
        active = s.row < s.num_rows
        prompt = jnp.minimum(s.row // plan.n, s.prompt_h.shape[0] - 1)
        # The fed token is the row's token step-1, at slot Tp + step-1 and position len + step-1.
        cache = s.cache.replace(index=tp + jnp.maximum(s.step - 1, 0))
        pos = s.prompt_len[prompt] + s.step - 1
        with shd.activation_mesh(mesh):
            h, cache = model.hidden_states(s.last[:, None], pos[:, None], one, cache)
            h = jnp.where(s.fresh[:, None], s.prompt_h[prompt], h[:, 0])
            logits = _constrain(model.logits(h[:, None])[:, 0], mesh, vocab_parallel.LOGIT_AXES)
        stream = s.prompt_ids[prompt] * plan.n + s.row % plan.n  # = s.row on one process
        token, logp = _choose(logits, s.key, s.step, stream, temperature, top_p, plan)
        hit, stop_state = _stop_hit(token, s.stop_state, tables, finals, plan)
        done = active & (hit | (s.step + 1 >= m))
        at = jnp.where(active, s.row, idle)  # idle slots write nowhere (mode="drop")
        ended = jnp.where(done, s.row, idle)
        s = s.replace(
            cache=_constrain_cache(cache, mesh), step=s.step + 1, last=token,
            stop_state=stop_state, iterations=s.iterations + 1,
            tokens=s.tokens.at[at, s.step].set(token, mode="drop"),
            logprobs=s.logprobs.at[at, s.step].set(logp, mode="drop"),
            lengths=s.lengths.at[ended].set(s.step + 1, mode="drop"),
            stopped=s.stopped.at[ended].set(hit, mode="drop"))
        return _refill(s, done | ~active, min(refills, slots), plan)

    return jax.lax.while_loop(lambda s: jnp.any(s.row < s.num_rows), body, s)


def sample_continuous(model, prompt_tokens, prompt_mask, params: SamplingParams, *, seed: Any,
                      mesh: Mesh, slots: int, tokenizer=None, local: bool = False) -> Rollout:
    """`sampler.sample` over the whole rollout with `slots` decode slots (rounded up to a
    multiple of the batch shards): the same Rollout, row for row. local: the prompts are this
    process's data slice, and so are the returned rows (slots take rows of every slice)."""
    if slots < 1:
        raise ValueError(f"decode slots must be >= 1, got {slots}")
    c = prepare(model, prompt_tokens, prompt_mask, params, seed=seed, mesh=mesh,
                tokenizer=tokenizer, local=local)
    shards = shd.axis_size(mesh, "batch")
    slots = -(-slots // shards) * shards
    rows = c.prompts * params.n
    static = dict(graphdef=c.graphdef, plan=c.plan)
    t0 = time.perf_counter()
    # Local: each slice's padding prompts lie between the slices' rows; they are decoded too.
    s = start(c.state, c.tokens, c.mask, c.key,
              jax.device_put(np.int32(c.decode_rows), shd.replicated(mesh)), c.prompt_ids,
              slots=slots, **static)
    jax.block_until_ready(s)
    t1 = time.perf_counter()
    s = run(c.state, s, c.temperature, c.top_p, c.tables, c.finals, **static)
    jax.block_until_ready(s)
    steps = int(s.iterations)
    timings = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1,
               "decode_steps": steps, "token_steps": steps, "slots": slots}
    return finish(c, s.tokens, s.logprobs, s.lengths, s.stopped, rows=rows, params=params,
                  tokenizer=tokenizer, timings=timings)
