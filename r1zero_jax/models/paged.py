"""A paged KV cache for decode steps, and attention that reads only its filled pages.

Shapes: S decode slots, P pages (the pool), Z tokens per page, W pages per slot at most, K kv
heads, G = N // K query heads per kv head, H head dim.

- Pages: k and v, one [P, Z, K*H] per layer: token-major pages, as the TPU kernel keeps them,
  with a token's heads merged so that no op can ask for another physical layout of the pool
  (with [P, K, Z, H] or [P, Z, K, H], XLA:TPU laid the pool out one way for the writes and
  another for the reads, and copied the whole pool between them on every step). The pool is
  sharded over the batch shards like the slots, and a slot's pages lie in its own shard's
  part: `table` holds page numbers local to the shard, so writes and reads never leave the
  device (kv heads split over tensor).
- A slot's tokens are compact: its prompt's real tokens, then its generated ones; token t lies
  at page table[t // Z], offset t % Z. Keys are stored after RoPE, so the layout carries no
  positions, and a decode step's causal mask is "the slot's first `length` tokens".
- `attend` writes each writing slot's new key and value at token `length`, then runs a ragged
  loop: the (slot, page) pairs of filled pages are listed in slot order and taken S at a time,
  so the loop runs (filled pages / S) times and reads the filled pages only, where a dense cache
  reads every slot's whole [Tp + M] row every step. Each pair gives a partial softmax (max, sum,
  weighted values) that is merged into its slot's running sums (online softmax), the design of
  JAX's TPU ragged paged attention kernel (jax.experimental.pallas.ops.tpu), in plain JAX. The
  dense KVCache (decoder.py) stays the reference (tests/test_paged.py).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from r1zero_jax import sharding as shd

_NEG_INF = -1e30


@flax.struct.dataclass
class PagedKVCache:
    k: tuple[jax.Array, ...]  # [P, Z, K*H] per layer
    v: tuple[jax.Array, ...]  # [P, Z, K*H] per layer
    table: jax.Array  # int32 [S, W]: the slot's pages, local to its batch shard
    length: jax.Array  # int32 [S]: tokens in the slot's cache before this pass
    write: jax.Array  # bool [S]: slots that write their fed token (at `length`) and attend

    PAGE_AXES = ("batch", None, "kv_heads")  # the pool follows the slots' shards; K*H over tensor

    @classmethod
    def init(cls, config, *, slots: int, pages: int, page_size: int, pages_per_slot: int,
             dtype=jnp.float32) -> PagedKVCache:
        shape = (pages, page_size, config.num_kv_heads * config.head_dim)
        layers = range(config.num_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   table=jnp.zeros((slots, pages_per_slot), jnp.int32),
                   length=jnp.zeros((slots,), jnp.int32), write=jnp.zeros((slots,), bool))

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    def shardings(self, mesh: Mesh) -> PagedKVCache:
        page = shd.logical_sharding(mesh, self.PAGE_AXES)
        return PagedKVCache(k=tuple(page for _ in self.k), v=tuple(page for _ in self.v),
                            table=shd.logical_sharding(mesh, ("batch", None)),
                            length=shd.logical_sharding(mesh, ("batch",)),
                            write=shd.logical_sharding(mesh, ("batch",)))


def _attend_local(q, k_new, v_new, k_pages, v_pages, table, length, write):
    """One device's slots and pages; see `attend`."""
    s, w = table.shape
    p, z, _ = k_pages.shape
    k, h = q.shape[1], q.shape[-1]
    at = jnp.where(write, jnp.take_along_axis(table, (length // z)[:, None], axis=1)[:, 0], p)
    put = lambda pages, new: pages.at[at, length % z].set(  # noqa: E731
        new.reshape(s, k * h).astype(pages.dtype), mode="drop")
    k_pages, v_pages = put(k_pages, k_new), put(v_pages, v_new)

    n = jnp.where(write, length + 1, 0)  # tokens each slot attends to
    ends = jnp.cumsum(-(-n // z))  # filled pages up to each slot
    total = ends[-1]
    dt = q.dtype
    scale = 1.0 / math.sqrt(h)

    def read(pages, page):  # [S] page numbers -> [S, Z, K, H]
        return pages[page].reshape(s, z, k, h).astype(dt)

    def block(i, carry):
        m_run, l_run, acc = carry
        pair = i * s + jnp.arange(s)
        live = pair < total
        slot = jnp.minimum(jnp.searchsorted(ends, pair, side="right"), s - 1)
        ordinal = pair - (ends[slot] - (-(-n[slot] // z)))
        page = table[slot, jnp.clip(ordinal, 0, w - 1)]
        scores = jnp.einsum("SKGH,SZKH->SKGZ", q[slot], read(k_pages, page),
                            preferred_element_type=jnp.float32) * scale
        ok = live[:, None] & (ordinal[:, None] * z + jnp.arange(z) < n[slot][:, None])  # [S, Z]
        scores = jnp.where(ok[:, None, None], scores, _NEG_INF)
        m = jnp.max(scores, axis=-1)
        probs = jnp.where(ok[:, None, None], jnp.exp(scores - m[..., None]), 0.0)
        out = jnp.einsum("SKGZ,SZKH->SKGH", probs.astype(dt), read(v_pages, page),
                         preferred_element_type=jnp.float32)
        seg = jnp.where(live, slot, s)  # a dead pair's segment is dropped
        m_new = jnp.maximum(m_run, jax.ops.segment_max(m, seg, num_segments=s))
        beta = jnp.exp(m - m_new[slot])
        alpha = jnp.exp(m_run - m_new)
        l_run = l_run * alpha + jax.ops.segment_sum(probs.sum(-1) * beta, seg, num_segments=s)
        acc = acc * alpha[..., None] + jax.ops.segment_sum(out * beta[..., None], seg,
                                                           num_segments=s)
        return m_new, l_run, acc

    shape = q.shape[:-1]
    init = (jnp.full(shape, _NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    _, l_run, acc = jax.lax.fori_loop(0, -(-total // s), block, init)
    out = jnp.where(l_run[..., None] > 0, acc / jnp.maximum(l_run, 1e-30)[..., None], 0.0)
    return out.astype(dt), k_pages, v_pages


def attend(q, k_new, v_new, k_pages, v_pages, cache: PagedKVCache, mesh: Mesh | None):
    """q [S, K, G, H], this pass's k_new, v_new [S, K, H] -> (attention out [S, K, G, H],
    k_pages, v_pages with the new key and value written). Runs per device (shard_map) on a
    mesh: each device holds its slots' pages and its share of the kv heads."""
    args = (q, k_new, v_new, k_pages, v_pages, cache.table, cache.length, cache.write)
    if mesh is None or mesh.devices.size == 1:
        return _attend_local(*args)
    spec = lambda *axes: shd.logical_to_spec(axes)  # noqa: E731
    pages = spec(*PagedKVCache.PAGE_AXES)
    q_spec = spec("batch", "kv_heads", None, "head_dim")
    new = spec("batch", "kv_heads", "head_dim")
    rows = spec("batch")
    return jax.shard_map(
        _attend_local, mesh=mesh,
        in_specs=(q_spec, new, new, pages, pages, spec("batch", None), rows, rows),
        out_specs=(q_spec, pages, pages), check_vma=False)(*args)

