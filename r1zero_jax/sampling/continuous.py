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

Paged (`page_size` > 0): the slots' cache is a pool of pages (models/paged.py) and attention
reads only the filled ones. A slot holds pages for its prompt's real tokens, then one more each
time its row crosses a page; a row that ends returns its pages. Each batch shard has its own
part of the pool for its own slots, so page bookkeeping runs per shard (`_per_shard`). A slot
is refilled only while its shard keeps a full prompt's pages plus one free per slot refilled
(admission). When a shard's rows need more pages than are free, its youngest rows (highest row
index) are preempted: their pages return to the pool and the rows go back to the queue, to be
decoded again from their first token. Their tokens come out the same (row- and step-keyed
draws), so a small pool costs time, not results; `Rollout.timings["preemptions"]` counts them.
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
from r1zero_jax.models.paged import PagedKVCache
from r1zero_jax.sampling import vocab_parallel
from r1zero_jax.sampling.sampler import (PROGRESS_EVERY, Plan, Rollout, SamplingParams, _choose,
                                         _constrain, _constrain_cache, _stop_hit, finish,
                                         prefill_prompts, prepare)

REFILLS_PER_STEP = 8


@flax.struct.dataclass
class _Slots:
    cache: KVCache | PagedKVCache  # dense: [S, ..., C], a write index per slot
    prompt_cache: KVCache  # [Bp, ..., Tp]
    prompt_h: jax.Array  # [Bp, D]: final-normed h of each prompt's last token
    prompt_len: jax.Array  # int32 [Bp]
    # int32 [Bp]: each prompt's index in the rollout (random streams); None: the row index is
    prompt_ids: jax.Array | None
    num_rows: jax.Array  # int32 []: R
    row: jax.Array  # int32 [S]: the slot's row; Rp (past the buffers) when idle
    step: jax.Array  # int32 [S]: tokens its row has so far (the next token's index)
    last: jax.Array  # int32 [S]: the token fed next
    fresh: jax.Array  # bool [S]: the row was just taken: its first token comes from the prompt
    stop_state: jax.Array  # int32 [S, num_stop_strings]
    pending: jax.Array  # bool [Rp]: rows waiting for a slot (taken lowest first)
    iterations: jax.Array  # int32 []
    tokens: jax.Array  # int32 [Rp, M]
    logprobs: jax.Array  # float32 [Rp, M]
    lengths: jax.Array  # int32 [Rp]
    stopped: jax.Array  # bool [Rp]
    key: jax.Array
    free: jax.Array | None = None  # paged: bool [P] pages not held by a slot
    held: jax.Array | None = None  # paged: int32 [S] pages in each slot's table
    preemptions: jax.Array | None = None  # paged: int32 []


def _slot(x, mesh):
    return _constrain(x, mesh, ("batch",) + (None,) * (x.ndim - 1))


def _mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return entry if isinstance(entry, tuple) else (entry,) if entry else ()


def _local_slot(slot, rows: int, batch: tuple[str, ...]):
    """Inside shard_map over the `batch` mesh axes, with `rows` slots per shard: (slot's index
    in this shard, clipped into it; whether this shard holds the slot)."""
    first = jax.lax.axis_index(batch) * rows if batch else 0
    return jnp.clip(slot - first, 0, rows - 1), (slot >= first) & (slot < first + rows)


def _put_row(x, update, axes, *, slot, mesh: Mesh):
    """x [S, ...] laid out by logical `axes` (slots over the batch shards); update [1, ...] no
    larger than a row, written at the start of row `slot`, by the shard that holds that row
    alone (a scatter at a dynamic row of a sharded array makes XLA gather the whole array)."""
    spec = shd.logical_sharding(mesh, axes).spec
    batch = _mesh_axes(spec[0])
    update = jax.lax.with_sharding_constraint(
        update, NamedSharding(mesh, P(None, *spec[1:])))

    def local(x, u, slot):
        at, mine = _local_slot(slot, x.shape[0], batch)
        start = (at,) + (0,) * (x.ndim - 1)
        old = jax.lax.dynamic_slice(x, start, u.shape)
        return jax.lax.dynamic_update_slice(x, jnp.where(mine, u.astype(x.dtype), old), start)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(None, *spec[1:]), P()),
                         out_specs=spec)(x, update, slot)


def _per_shard(fn, mesh: Mesh, *args):
    """fn on each batch shard's own slots and pages: every arg and output is [S or P, ...],
    split over the batch shards (the pool's pages follow their slots)."""
    if mesh.devices.size == 1:
        return fn(*args)
    spec = shd.logical_to_spec(("batch",))
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec for _ in args), out_specs=spec,
                         check_vma=False)(*args)


def _release(free, table, held, mask):
    """Return the pages of the slots in `mask` to the pool (one shard's)."""
    drop = jnp.where(mask[:, None] & (jnp.arange(table.shape[1]) < held[:, None]), table,
                     free.shape[0])
    return free.at[drop.ravel()].set(True, mode="drop"), jnp.where(mask, 0, held)


def _alloc(free, table, held, count):
    """Append count[s] free pages to each slot's table (one shard's; they must exist): the
    lowest free pages, in slot order."""
    j = jnp.arange(table.shape[1])[None, :]
    fill = (j >= held[:, None]) & (j < (held + count)[:, None])
    rank = (jnp.cumsum(count) - count)[:, None] + j - held[:, None]
    page = jnp.searchsorted(jnp.cumsum(free), rank + 1)  # the (rank+1)-th free page
    free = free.at[jnp.where(fill, page, free.shape[0]).ravel()].set(False, mode="drop")
    return free, jnp.where(fill, page, table).astype(table.dtype), held + count


def _grow(free, table, held, need, age):
    """One shard's slots in `need` get their next page. If the free pages are too few, the
    youngest rows (highest `age`, -1 when idle) are preempted first until they suffice.
    -> (free, table, held, preempted [S])."""
    order = jnp.argsort(-age)
    zero = jnp.zeros((1,), jnp.int32)
    freed = jnp.concatenate([zero, jnp.cumsum(held[order])])
    met = jnp.concatenate([zero, jnp.cumsum(need[order].astype(jnp.int32))])
    enough = jnp.sum(need) - met <= jnp.sum(free) + freed  # [S+1]: after preempting k
    preempt = jnp.zeros_like(need).at[order].set(jnp.arange(need.shape[0]) < jnp.argmax(enough))
    free, held = _release(free, table, held, preempt)
    free, table, held = _alloc(free, table, held, (need & ~preempt).astype(jnp.int32))
    return free, table, held, preempt


def _put_pages(pool, update, table, *, slot, count, mesh: Mesh):
    """pool [P, Z, K*H] over the batch shards; update [Wp, Z, K*H]: the first `count` pages
    are written at slot `slot`'s first table entries, by the shard that holds the slot."""
    spec = shd.logical_to_spec(PagedKVCache.PAGE_AXES)
    batch = () if mesh.devices.size == 1 else _mesh_axes(spec[0])

    def local(pool, u, table, slot, count):
        at, mine = _local_slot(slot, table.shape[0], batch)
        j = jnp.arange(u.shape[0])
        return pool.at[jnp.where(mine & (j < count), table[at, j], pool.shape[0])].set(
            u.astype(pool.dtype), mode="drop")

    if not batch:
        return local(pool, update, table, slot, count)
    whole = P(None, *spec[1:])
    update = jax.lax.with_sharding_constraint(update, NamedSharding(mesh, whole))
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(spec, whole, shd.logical_to_spec(("batch", None)), P(), P()),
                         out_specs=spec, check_vma=False)(pool, update, table, slot, count)


def _prompt_pages(x, length, page_size: int):
    """x [Tp, K, H]: a left-padded prompt's keys or values -> [ceil(Tp / Z), Z, K*H] pages
    holding its `length` real tokens from the first."""
    tp, k, h = x.shape
    wp = -(-tp // page_size)
    x = jnp.pad(jnp.roll(x, length - tp, axis=0), ((0, wp * page_size - tp), (0, 0), (0, 0)))
    return x.reshape(wp, page_size, k * h)


def _admissible(s: _Slots, free, plan: Plan):
    """bool [S]: the free slots whose shard keeps a full prompt's pages plus one for each slot
    it refills (paged; every free slot on a dense cache)."""
    if s.free is None:
        return free
    shards = shd.axis_size(plan.mesh, "batch")
    z = s.cache.page_size
    per_row = -(-s.prompt_cache.valid.shape[1] // z) + 1
    pages = jnp.sum(s.free.reshape(shards, -1), axis=1, dtype=jnp.int32)
    slots = free.reshape(shards, -1)
    rank = jnp.cumsum(slots, axis=1)
    return (slots & (rank * per_row <= pages[:, None])).reshape(-1)


def _refill(s: _Slots, free, cap: int, plan: Plan) -> _Slots:
    """Give the free slots [S] the lowest pending rows (at most `cap` of them, and on a paged
    cache only where their shard has the pages); the others idle."""
    n, mesh = plan.n, plan.mesh
    idle = s.tokens.shape[0]
    can = _admissible(s, free, plan)
    rank = jnp.cumsum(can) - 1
    waiting = jnp.cumsum(s.pending)
    new_row = jnp.searchsorted(waiting, rank + 1)  # the (rank+1)-th pending row
    take = can & (rank < cap) & (rank < waiting[-1])
    row = jnp.where(take, new_row, jnp.where(free, idle, s.row))
    pending = s.pending.at[jnp.where(take, new_row, idle)].set(False, mode="drop")
    order = jnp.cumsum(take)
    pc = s.prompt_cache
    tp = pc.valid.shape[1]

    def slot_prompt(i):
        """The (i+1)-th refilled slot, its prompt, and a function taking that prompt's row
        [1, ...] of a prompt array (one prompt moves, not the whole array)."""
        which = jnp.argmax(order == i + 1)
        prompt = jnp.take(row, which) // n
        return which, prompt, lambda x: jnp.take(x, prompt[None], axis=0)

    if s.free is None:
        def copy(i, c: KVCache) -> KVCache:
            which, _, pick = slot_prompt(i)
            put = functools.partial(_put_row, slot=which, mesh=mesh)
            valid = jnp.pad(pick(pc.valid), ((0, 0), (0, c.valid.shape[1] - tp)))
            return KVCache(k=tuple(put(x, pick(p), KVCache.K_AXES)
                                   for x, p in zip(c.k, pc.k, strict=True)),
                           v=tuple(put(x, pick(p), KVCache.V_AXES)
                                   for x, p in zip(c.v, pc.v, strict=True)),
                           valid=put(c.valid, valid, ("batch", "cache_length")), index=c.index)

        extra = {}
    else:
        z = s.cache.page_size
        count = jnp.where(take, -(-s.prompt_len[jnp.minimum(row // n, pc.valid.shape[0] - 1)]
                                  // z), 0)
        free_pages, table, held = _per_shard(_alloc, mesh, s.free, s.cache.table, s.held, count)

        def copy(i, c: PagedKVCache) -> PagedKVCache:
            which, prompt, pick = slot_prompt(i)
            length = s.prompt_len[prompt]
            put = functools.partial(_put_pages, table=table, slot=which,
                                    count=-(-length // z), mesh=mesh)
            k = tuple(put(x, _prompt_pages(pick(p)[0].transpose(2, 0, 1), length, z))
                      for x, p in zip(c.k, pc.k, strict=True))
            v = tuple(put(x, _prompt_pages(pick(p)[0].transpose(1, 0, 2), length, z))
                      for x, p in zip(c.v, pc.v, strict=True))
            return c.replace(k=k, v=v)

        extra = dict(free=free_pages, held=held)
        s = s.replace(cache=s.cache.replace(table=table))

    cache = jax.lax.fori_loop(0, order[-1], copy, s.cache)
    return s.replace(
        cache=cache, row=_slot(row, mesh),
        step=_slot(jnp.where(take, 0, s.step), mesh), fresh=_slot(take, mesh),
        stop_state=_slot(jnp.where(take[:, None], 0, s.stop_state), mesh), pending=pending,
        **extra)


def pages_per_slot(prompt_width: int, max_new_tokens: int, page_size: int) -> int:
    """W: the pages of the longest row (a prompt of the full width and max_new_tokens)."""
    return -(-(prompt_width + max_new_tokens) // page_size)


def pool_pages(pages: int, *, slots: int, width: int, shards: int) -> int:
    """The pool's pages: `pages`, or (0) `slots` rows of `width` pages (W) each, so that no row
    is ever preempted; rounded up to a multiple of the batch shards."""
    return -(-(pages or slots * width) // shards) * shards


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "slots", "page_size", "pages"))
def start(state, tokens, mask, key, num_rows, prompt_ids, *, graphdef, plan: Plan, slots: int,
          page_size: int = 0, pages: int = 0) -> _Slots:
    """Prefill the prompts [Bp, Tp]; fill the `slots` decode slots with rows 0, 1, ...; a
    dense cache of Tp + M per slot, or (page_size > 0) a pool of `pages` pages."""
    model = nnx.merge(graphdef, state)
    mesh = plan.mesh
    prompt_cache, h = prefill_prompts(model, tokens, mask, plan)
    bp, tp = tokens.shape
    rows, m = bp * plan.n, plan.max_new_tokens
    zeros = lambda shape, dt: _slot(jnp.zeros(shape, dt), mesh)  # noqa: E731
    if page_size:
        cache = PagedKVCache.init(model.config, slots=slots, pages=pages, page_size=page_size,
                                  pages_per_slot=pages_per_slot(tp, m, page_size),
                                  dtype=model.dtype)
        cache = _constrain_cache(cache, mesh)
        paged = dict(free=_slot(jnp.ones((pages,), bool), mesh),
                     held=zeros((slots,), jnp.int32), preemptions=jnp.zeros((), jnp.int32))
    else:
        cache = KVCache.init(model.config, slots, tp + m, model.dtype)
        cache = _constrain_cache(cache.replace(index=jnp.zeros((slots,), jnp.int32)), mesh)
        paged = {}
    s = _Slots(
        cache=cache, prompt_cache=prompt_cache, prompt_h=_slot(h, mesh),
        prompt_len=_slot(jnp.sum(mask, axis=-1, dtype=jnp.int32), mesh),
        prompt_ids=None if prompt_ids is None else _slot(prompt_ids, mesh), num_rows=num_rows,
        row=zeros((slots,), jnp.int32), step=zeros((slots,), jnp.int32),
        last=zeros((slots,), jnp.int32), fresh=zeros((slots,), bool),
        stop_state=zeros((slots, plan.num_stop_strings), jnp.int32),
        pending=jnp.arange(rows) < num_rows, iterations=jnp.zeros((), jnp.int32),
        tokens=zeros((rows, m), jnp.int32), logprobs=zeros((rows, m), jnp.float32),
        lengths=zeros((rows,), jnp.int32), stopped=zeros((rows,), bool), key=key, **paged)
    return _refill(s, jnp.ones((slots,), bool), slots, plan)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "refills"),
                   donate_argnames=("s",))
def run(state, s: _Slots, temperature, top_p, tables, finals, until=None, *, graphdef,
        plan: Plan, refills: int = REFILLS_PER_STEP) -> _Slots:
    """Decode until every row of the rollout is done (or the loop has run `until` iterations,
    an int32 scalar: the host then reports progress and calls again)."""
    model = nnx.merge(graphdef, state)
    mesh, m = plan.mesh, plan.max_new_tokens
    tp = s.prompt_cache.valid.shape[1]
    slots, idle = s.row.shape[0], s.tokens.shape[0]
    one = jnp.ones((slots, 1), bool)
    paged = s.free is not None

    def body(s: _Slots) -> _Slots:
        active = s.row < s.num_rows
        prompt = jnp.minimum(s.row // plan.n, s.prompt_h.shape[0] - 1)
        # The fed token is the row's token step-1, at position len + step-1: in the dense cache
        # at slot Tp + step-1, in a paged one at token len + step-1 (the prompt's real tokens
        # come first).
        pos = s.prompt_len[prompt] + s.step - 1
        preempted = jnp.zeros((slots,), bool)
        if paged:
            write = active & ~s.fresh
            need = write & (pos % s.cache.page_size == 0)
            free, table, held, preempted = _per_shard(
                _grow, mesh, s.free, s.cache.table, s.held, need, jnp.where(active, s.row, -1))
            cache = s.cache.replace(table=table, length=jnp.where(write, pos, 0),
                                    write=write & ~preempted)
            s = s.replace(free=free, held=held,
                          preemptions=s.preemptions + jnp.sum(preempted, dtype=jnp.int32),
                          pending=s.pending.at[jnp.where(preempted, s.row, idle)].set(
                              True, mode="drop"))
            active = active & ~preempted
        else:
            cache = s.cache.replace(index=tp + jnp.maximum(s.step - 1, 0))
        with shd.activation_mesh(mesh):
            h, cache = model.hidden_states(s.last[:, None], pos[:, None], one, cache)
            h = jnp.where(s.fresh[:, None], s.prompt_h[prompt], h[:, 0])
            logits = _constrain(model.logits(h[:, None])[:, 0], mesh, vocab_parallel.LOGIT_AXES)
        stream = s.row if s.prompt_ids is None else s.prompt_ids[prompt] * plan.n + s.row % plan.n
        token, logp = _choose(logits, s.key, s.step, stream, temperature, top_p, plan)
        hit, stop_state = _stop_hit(token, s.stop_state, tables, finals, plan)
        done = active & (hit | (s.step + 1 >= m))
        at = jnp.where(active, s.row, idle)  # idle slots write nowhere (mode="drop")
        ended = jnp.where(done, s.row, idle)
        if paged:
            free, held = _per_shard(_release, mesh, s.free, cache.table, s.held, done)
            s = s.replace(free=free, held=held)
        s = s.replace(
            cache=_constrain_cache(cache, mesh), step=s.step + 1, last=token,
            stop_state=stop_state, iterations=s.iterations + 1,
            tokens=s.tokens.at[at, s.step].set(token, mode="drop"),
            logprobs=s.logprobs.at[at, s.step].set(logp, mode="drop"),
            lengths=s.lengths.at[ended].set(s.step + 1, mode="drop"),
            stopped=s.stopped.at[ended].set(hit, mode="drop"))
        return _refill(s, done | preempted | ~(s.row < s.num_rows), min(refills, slots), plan)

    def cond(s: _Slots):
        going = jnp.any(s.row < s.num_rows) | jnp.any(s.pending)
        return going if until is None else going & (s.iterations < until)

    return jax.lax.while_loop(cond, body, s)


def sample_continuous(model, prompt_tokens, prompt_mask, params: SamplingParams, *, seed: Any,
                      mesh: Mesh, slots: int, tokenizer=None, page_size: int = 0,
                      pages: int = 0, local: bool = False, on_progress=None) -> Rollout:
    """`sampler.sample` over the whole rollout with `slots` decode slots (rounded up to a
    multiple of the batch shards): the same Rollout, row for row. page_size > 0: a paged cache
    of `pages` pages (0: enough for every slot at full length, so no row is ever preempted;
    rounded up to a multiple of the batch shards). local: the prompts are this process's data
    slice, and so are the returned rows (slots take rows of every slice). on_progress(rows,
    tokens): called every PROGRESS_EVERY decode steps with the finished rows and their tokens
    (of every slice)."""
    if slots < 1:
        raise ValueError(f"decode slots must be >= 1, got {slots}")
    if page_size < 0 or pages < 0:
        raise ValueError(f"page_size and pages must be >= 0, got {page_size} and {pages}")
    c = prepare(model, prompt_tokens, prompt_mask, params, seed=seed, mesh=mesh,
                tokenizer=tokenizer, local=local)
    shards = shd.axis_size(mesh, "batch")
    slots = -(-slots // shards) * shards
    rows = c.prompts * params.n
    paging = {}
    if page_size:
        width = pages_per_slot(c.tokens.shape[1], params.max_new_tokens, page_size)
        pages = pool_pages(pages, slots=slots, width=width, shards=shards)
        if pages // shards < width:
            raise ValueError(
                f"a paged cache of {pages} pages of {page_size} tokens leaves "
                f"{pages // shards} per batch shard ({shards} shards); one row of prompt width "
                f"{c.tokens.shape[1]} + max_new_tokens {params.max_new_tokens} needs {width}: "
                f"raise sampling.cache_pages to at least {width * shards}")
        paging = dict(page_size=page_size, pages=pages)
    static = dict(graphdef=c.graphdef, plan=c.plan)
    t0 = time.perf_counter()
    # Local: each slice's padding prompts lie between the slices' rows; they are decoded too.
    # One slice: a row's stream is its index, read without the ids.
    s = start(c.state, c.tokens, c.mask, c.key,
              jax.device_put(np.int32(c.decode_rows), shd.replicated(mesh)),
              c.prompt_ids if local and shd.data_slice(mesh)[1] > 1 else None,
              slots=slots, **static, **paging)
    jax.block_until_ready(s)
    t1 = time.perf_counter()
    if on_progress is None:
        s = run(c.state, s, c.temperature, c.top_p, c.tables, c.finals, **static)
    else:
        while True:
            until = int(s.iterations) + PROGRESS_EVERY
            s = run(c.state, s, c.temperature, c.top_p, c.tables, c.finals,
                    jax.device_put(np.int32(until), shd.replicated(mesh)), **static)
            lengths = shd.to_host(s.lengths)  # a finished row has its length set
            on_progress(int((lengths > 0).sum()), int(lengths.sum()))
            if int(s.iterations) < until:
                break
    jax.block_until_ready(s)
    steps = int(s.iterations)
    timings = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1,
               "decode_steps": steps, "token_steps": steps, "slots": slots}
    if page_size:
        timings.update(pages=pages, preemptions=int(s.preemptions))
    return finish(c, s.tokens, s.logprobs, s.lengths, s.stopped, rows=rows, params=params,
                  tokenizer=tokenizer, timings=timings)
