"""Batched sampling with a KV cache: one jitted prefill, then one jitted `lax.while_loop` decode.

Shapes: B prompts, Tp prompt length (left-padded), n samples per prompt, R = B*n rows,
M = max_new_tokens, S = Tp + M cache slots, V vocab.

- The B prompts are prefilled once; their cache is repeated n times along the batch, so row
  b*n+j is sample j of prompt b. The decode loop stops as soon as every row is done.
- The model is split into graphdef + params and the jitted functions are pure in the params: the
  caller's arrays are read in place (the trainer samples with the arrays it trains). The loop
  state (KV cache, output buffers) is donated from prefill to decode.
- Batch rows are sharded over (data, fsdp) and the cache's kv heads over tensor; a prompt batch
  that does not divide the batch shards is padded with dummy rows, dropped on return.
- Randomness: token i of rollout row r is drawn by inverse CDF (categorical.py) from one
  uniform number under key fold_in(fold_in(key(seed), i), r), r = p*n + j for sample j of the
  prompt whose rollout index is p (`prompt_ids`), so a row's sample does not depend on the batch
  size, the padding, the mesh, how the rollout is split into calls or over processes, or
  (continuous.py) the decode slot and step it runs in.
- Process-local prompts (`local=True`): each process passes only its data slice's prompts
  (`sharding.data_slice`); the processes agree on the prompt width with a small allgather, the
  global batch is built from the slices (`sharding.from_local_batch`, each slice padded to its
  own batch shards), and each process reads back only its own rows (`sharding.local_rows`).
- Log-probs: `logprobs[r, i]` = log_softmax(logits / temperature)[token], the temperature-scaled
  distribution BEFORE top-k/top-p filtering (what a learner computing log pi(a|s) from logits /
  temperature reproduces; at temperature 1 it is the model's own log-prob). Greedy (temperature
  0) reports log_softmax(logits), the unscaled model.
- Stops: a row is done after a stop token id (included in tokens and mask) or after the token
  that completes a stop string (matched in the loop on token bytes, see stop_strings.py; the
  token is kept). Stop ids are the caller's, the checkpoint's end-of-sequence ids (config.json
  and generation_config.json, `model.config.eos_token_ids`), the tokenizer's EOS, and the ids of
  stop strings that name a special token (a chat template's end of turn, e.g. <|im_end|>).
  `Rollout.texts` are cut right after the stop string, which stays in the text; a token may
  carry characters past it that only the text drops.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1zero_jax import sharding as shd
from r1zero_jax.models.decoder import KVCache, positions_from_mask
from r1zero_jax.sampling import categorical, filters, vocab_parallel
from r1zero_jax.sampling import stop_strings as stops

MIN_PROMPT_WIDTH = 8  # see prompt_width
PREFILL_CHUNK = 256  # longer prompts are prefilled this many tokens at a time (bounded scores)
PROGRESS_EVERY = 32  # decode steps between progress reports (sample(..., on_progress=...))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    n: int = 1  # samples per prompt
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # no stop ids, no stop strings: exactly max_new_tokens tokens

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} samples per prompt need temperature > 0 (greedy "
                             "samples are all the same)")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")


@dataclasses.dataclass
class Rollout:
    """Host arrays; row b*n+j is sample j of prompt b. M = max_new_tokens (a fixed width)."""

    tokens: np.ndarray  # int32 [B*n, M], 0 after the end
    logprobs: np.ndarray  # float32 [B*n, M], 0 after the end
    mask: np.ndarray  # bool [B*n, M]: generated tokens
    lengths: np.ndarray  # int32 [B*n]
    finish_reason: np.ndarray  # str [B*n]: 'stop' or 'length'
    texts: list[str] | None = None  # decoded, cut after a stop string (with a tokenizer)
    logits: np.ndarray | None = None  # float32 [B*n, M, V] with sample(..., return_logits=True)
    # prefill_s, decode_s, decode_steps (iterations of the decode loop), token_steps (passes that
    # choose a token: the prefill chooses the first in a static call), slots (rows decoded side by
    # side): see `rollout_report`
    timings: dict = dataclasses.field(default_factory=dict)
    prompt_tokens: np.ndarray | None = None  # int32 [B*n, Tp] left-padded, repeated per sample
    prompt_mask: np.ndarray | None = None  # bool [B*n, Tp]
    report: dict = dataclasses.field(default_factory=dict)  # rollout_report, by generation.py

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def truncated(self) -> np.ndarray:
        """bool [B*n]: cut at max_new_tokens."""
        return np.asarray(self.finish_reason) == "length"

    def learner_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """tokens int32 [B*n, Tp + M] (prompt ++ response) and their mask."""
        return (np.concatenate([self.prompt_tokens, self.tokens], axis=1),
                np.concatenate([self.prompt_mask, self.mask], axis=1))

    def take(self, rows) -> Rollout:
        """The rollout of `rows` (an index array or slice), in that order."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        texts = None if self.texts is None else list(np.asarray(self.texts, object)[rows])
        return dataclasses.replace(
            self, tokens=self.tokens[rows], logprobs=self.logprobs[rows], mask=self.mask[rows],
            lengths=self.lengths[rows], finish_reason=np.asarray(self.finish_reason)[rows],
            texts=texts, logits=pick(self.logits), prompt_tokens=pick(self.prompt_tokens),
            prompt_mask=pick(self.prompt_mask))

    @classmethod
    def concat(cls, parts: list[Rollout]) -> Rollout:
        """Rows of `parts` one after another (same max_new_tokens); prompts are left-padded to
        the widest part."""
        width = max(p.prompt_tokens.shape[1] for p in parts) if parts[0].prompt_tokens is not None \
            else 0
        left = lambda x: np.pad(x, ((0, 0), (width - x.shape[1], 0)))  # noqa: E731
        cat = lambda f: (None if getattr(parts[0], f) is None  # noqa: E731
                         else np.concatenate([left(getattr(p, f)) if f.startswith("prompt_")
                                              else getattr(p, f) for p in parts]))
        timings = {k: sum(p.timings.get(k, 0) for p in parts) for k in parts[0].timings}
        return cls(tokens=cat("tokens"), logprobs=cat("logprobs"), mask=cat("mask"),
                   lengths=cat("lengths"), finish_reason=cat("finish_reason"),
                   texts=None if parts[0].texts is None else [t for p in parts for t in p.texts],
                   logits=cat("logits"), timings=timings, prompt_tokens=cat("prompt_tokens"),
                   prompt_mask=cat("prompt_mask"))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled sampler."""

    n: int
    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    stop_token_ids: tuple[int, ...]
    num_stop_strings: int
    mesh: Mesh
    return_logits: bool = False
    prefill_chunk: int = PREFILL_CHUNK


@flax.struct.dataclass
class _Loop:
    cache: KVCache
    step: jax.Array  # int32 []: tokens generated so far (the next column)
    last: jax.Array  # int32 [R]: the last sampled token
    pos: jax.Array  # int32 [R]: its position
    rows: jax.Array  # int32 [R]: each row's index in the rollout (its random stream)
    tokens: jax.Array  # int32 [R, M]
    logprobs: jax.Array  # float32 [R, M]
    lengths: jax.Array  # int32 [R]
    done: jax.Array  # bool [R]
    stopped: jax.Array  # bool [R]: done by a stop id or string (else by length)
    stop_state: jax.Array  # int32 [R, num_stop_strings]: KMP states
    key: jax.Array
    logits: jax.Array | None  # float32 [R, M, V] raw logits (debugging), else None


def _constrain(x, mesh: Mesh, axes):
    return jax.lax.with_sharding_constraint(x, shd.logical_sharding(mesh, axes))


def _constrain_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    return jax.lax.with_sharding_constraint(cache, cache.shardings(mesh))


def _choose(logits, key, steps, rows, temperature, top_p, plan: Plan):
    """logits [R,V] float32, vocab-sharded; steps [R] (each row's token index), rows [R] (each
    row's index in the rollout) -> (token [R] int32, log-prob [R] float32)."""
    if plan.greedy:  # no random numbers to draw
        u = jnp.ones(rows.shape, jnp.float32)
    else:
        keys = jax.vmap(lambda i, r: jax.random.fold_in(jax.random.fold_in(key, i), r))(
            steps, rows.astype(jnp.uint32))
        u = 1.0 - jax.vmap(jax.random.uniform)(keys)  # (0, 1]
    if plan.greedy or not (plan.top_k or plan.use_top_p):
        return vocab_parallel.choose(logits, u, temperature, greedy=plan.greedy, mesh=plan.mesh)
    # top-k and top-p sort whole rows: each row's logits are gathered over the vocab shards
    # (R / batch-shards rows per device), a cost the paper's recipes (top_p = 1) do not pay.
    scaled = filters.apply_temperature(_constrain(logits, plan.mesh, ("batch", None)), temperature)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    kept = filters.top_k_filter(scaled, plan.top_k)
    if plan.use_top_p:
        kept = filters.top_p_filter(kept, top_p)
    token = categorical.draw(jnp.exp(kept - jnp.max(kept, axis=-1, keepdims=True)), u)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _stop_hit(token, stop_state, tables, finals, plan: Plan):
    """token [R] -> (hit [R]: a stop id, or the end of a stop string; the new KMP states)."""
    hit = jnp.zeros(token.shape, bool)
    if plan.stop_token_ids:
        hit = jnp.isin(token, jnp.asarray(plan.stop_token_ids, jnp.int32))
    if plan.num_stop_strings:
        which = jnp.arange(plan.num_stop_strings)[None, :]
        stop_state = tables[which, token[:, None], stop_state]  # [R, num_strings]
        hit = hit | jnp.any(stop_state == finals[None, :], axis=-1)
    return hit, stop_state


def _advance(loop: _Loop, token, logp, logits, tables, finals, plan: Plan) -> _Loop:
    """Record the token of step `loop.step` for rows not yet done; update stops."""
    i, active = loop.step, ~loop.done
    if plan.return_logits:
        loop = loop.replace(logits=jax.lax.dynamic_update_slice(
            loop.logits, logits[:, None].astype(jnp.float32), (0, i, 0)))
    hit, stop_state = _stop_hit(token, loop.stop_state, tables, finals, plan)
    stopped_now = active & hit
    rows = plan.mesh, ("batch", None)
    return loop.replace(
        step=i + 1,
        last=token,
        pos=loop.pos + 1,
        tokens=_constrain(jax.lax.dynamic_update_slice(
            loop.tokens, jnp.where(active, token, 0)[:, None], (0, i)), *rows),
        logprobs=_constrain(jax.lax.dynamic_update_slice(
            loop.logprobs, jnp.where(active, logp, 0.0)[:, None], (0, i)), *rows),
        lengths=loop.lengths + active.astype(jnp.int32),
        done=loop.done | stopped_now | (i + 1 >= plan.max_new_tokens),
        stopped=loop.stopped | stopped_now,
        stop_state=stop_state,
    )


def prefill_prompts(model, tokens, mask, plan: Plan):
    """tokens, mask [B, Tp] -> (the prompts' KVCache [B, ..., Tp], final-normed h of each last
    prompt token [B, D]), in chunks of plan.prefill_chunk tokens."""
    b, tp = tokens.shape
    mesh = plan.mesh
    cache = _constrain_cache(KVCache.init(model.config, b, tp, model.dtype), mesh)
    positions = positions_from_mask(mask)
    chunk = min(tp, plan.prefill_chunk)  # tp is a multiple of it

    def prefill_chunk(c, carry):
        cache, _ = carry
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)  # noqa: E731
        with shd.activation_mesh(mesh):
            h, cache = model.hidden_states(part(tokens), part(positions), part(mask), cache)
        return _constrain_cache(cache, mesh), h[:, -1]

    h0 = jnp.zeros((b, model.config.hidden_size), model.dtype)
    return jax.lax.fori_loop(0, tp // chunk, prefill_chunk, (cache, h0))


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def prefill(state, tokens, mask, key, prompt_ids, temperature, top_p, tables, finals, *,
            graphdef, plan):
    """Prefill the B prompts once, repeat their cache n times, sample the first token."""
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    n, m, mesh = plan.n, plan.max_new_tokens, plan.mesh
    cache, h = prefill_prompts(model, tokens, mask, plan)
    with shd.activation_mesh(mesh):  # left padding: the last column is real in every row
        logits = model.logits(h[:, None])[:, 0]
    cache = _constrain_cache(cache.extend(n, m), mesh)
    rep = functools.partial(jnp.repeat, repeats=n, total_repeat_length=b * n)
    r = b * n
    batch = lambda x: _constrain(x, mesh, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    loop = _Loop(
        cache=cache, step=jnp.zeros((), jnp.int32), last=batch(jnp.zeros((r,), jnp.int32)),
        pos=batch(rep(jnp.sum(mask, axis=-1, dtype=jnp.int32), axis=0) - 1),
        rows=batch(rep(prompt_ids, axis=0) * n + jnp.arange(r, dtype=jnp.int32) % n),
        tokens=batch(jnp.zeros((r, m), jnp.int32)), logprobs=batch(jnp.zeros((r, m), jnp.float32)),
        lengths=batch(jnp.zeros((r,), jnp.int32)), done=batch(jnp.zeros((r,), bool)),
        stopped=batch(jnp.zeros((r,), bool)),
        stop_state=batch(jnp.zeros((r, plan.num_stop_strings), jnp.int32)), key=key,
        logits=batch(jnp.zeros((r, m, logits.shape[-1]), jnp.float32)) if plan.return_logits
        else None)
    logits = _constrain(rep(logits, axis=0), mesh, vocab_parallel.LOGIT_AXES)
    token, logp = _choose(logits, key, jnp.zeros((r,), jnp.int32), loop.rows, temperature, top_p,
                          plan)
    return _advance(loop, token, logp, logits, tables, finals, plan)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("loop",))
def decode(state, loop, temperature, top_p, tables, finals, until=None, *, graphdef, plan):
    """Decode one token per row per iteration until every row is done (or `until` tokens, an
    int32 scalar, are generated: the host then reports progress and calls again)."""
    model = nnx.merge(graphdef, state)
    r = loop.last.shape[0]
    one = jnp.ones((r, 1), bool)

    def body(loop: _Loop) -> _Loop:
        with shd.activation_mesh(plan.mesh):
            h, cache = model.hidden_states(loop.last[:, None], loop.pos[:, None], one, loop.cache)
            logits = _constrain(model.logits(h)[:, 0], plan.mesh, vocab_parallel.LOGIT_AXES)
        token, logp = _choose(logits, loop.key, jnp.broadcast_to(loop.step, (r,)), loop.rows,
                              temperature, top_p, plan)
        loop = loop.replace(cache=_constrain_cache(cache, plan.mesh))
        return _advance(loop, token, logp, logits, tables, finals, plan)

    def cond(s: _Loop):
        going = ~jnp.all(s.done)
        return going if until is None else going & (s.step < until)

    return jax.lax.while_loop(cond, body, loop)


def serving_state(state, mesh: Mesh, dtype):
    """The sampler's copy of the weights (an nnx.State of arrays, or of ShapeDtypeStructs when
    compiling ahead of time): floating params in the compute dtype (the model casts each weight to
    it on use, so samples are unchanged), laid out by sharding.SERVING_RULES. One cast and
    reshard per sampler call, instead of [rows, F] partial sums on every decode step."""
    from r1zero_jax.models.decoder import state_shardings

    shardings = state_shardings(state, mesh, shd.SERVING_RULES).to_pure_dict()

    def one(x, sharding):
        dt = jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=sharding)
        return jax.device_put(x.astype(dt), sharding)

    out = jax.tree.map(lambda x: x, state)  # new Variables: the caller's model is not touched
    out.replace_by_pure_dict(jax.tree.map(one, state.to_pure_dict(), shardings))
    return out


def prompt_width(longest: int) -> int:
    """The prompt width for prompts of at most `longest` tokens: a power of two from
    MIN_PROMPT_WIDTH up to PREFILL_CHUNK, then a multiple of PREFILL_CHUNK. Prompts change every
    step, so a few widths mean a few compiles of the prefill and of the learner."""
    if longest > PREFILL_CHUNK:
        return -(-longest // PREFILL_CHUNK) * PREFILL_CHUNK
    return max(MIN_PROMPT_WIDTH, 1 << max(longest - 1, 0).bit_length())


def stops_of(config, tokenizer, params: SamplingParams) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop ids, stop strings matched on text) of a call; see the module docstring. A stop
    string naming a special token becomes that token's id: decoded text never holds one."""
    if params.ignore_eos:
        return (), ()
    ids = set(params.stop_token_ids) | set(config.eos_token_ids)
    texts = params.stop_strings
    if tokenizer is not None:
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab() if texts else {}
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special.update(i for i, t in added.items() if getattr(t, "special", False))
        named = {s: vocab[s] for s in texts if vocab.get(s) in special}
        ids.update(named.values())
        texts = tuple(s for s in texts if s not in named)
    return tuple(sorted(ids)), texts


def _check_prompts(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> None:
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must be the "
                         "same [B, T] shape")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"empty prompt batch {tokens.shape}")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"prompts {empty.tolist()[:10]} have no tokens (mask all False)")
    if np.any(mask[:, :-1] & ~mask[:, 1:]):
        bad = np.flatnonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1))
        raise ValueError(f"prompts {bad.tolist()[:10]} are not left-padded (mask goes True then "
                         "False)")
    real = tokens[mask]
    if real.min() < 0 or real.max() >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got "
                         f"[{real.min()}, {real.max()}]")


@dataclasses.dataclass(frozen=True)
class Call:
    """One sampler call's device inputs, checked and padded on the host (`prepare`)."""

    plan: Plan
    graphdef: Any
    state: Any  # the serving copy of the weights
    tokens: jax.Array  # int32 [Bp, Tpp]: B prompts, padded to the batch shards and the width
    mask: jax.Array  # bool [Bp, Tpp]
    key: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    tables: jax.Array | None  # stop-string KMP tables
    finals: jax.Array | None
    prompt_ids: jax.Array  # int32 [Bp]: each prompt's index in the rollout (its rows' streams)
    prompts: int  # B
    decode_rows: int  # rows up to the last real one in the global batch (continuous.py)
    local: bool  # prompts and rows are this process's data slice
    stop_strings: tuple[str, ...]
    prompt_tokens: np.ndarray  # int32 [B, Tp] on the host, pad ids zeroed (Tp agreed by all)
    prompt_mask: np.ndarray  # bool [B, Tp]

    def host_rows(self, x) -> np.ndarray:
        """A device output [rows, ...] on the host: this process's rows (local) or all."""
        return shd.local_rows(self.plan.mesh, x) if self.local else shd.to_host(x)


def prepare(model, prompt_tokens, prompt_mask, params: SamplingParams, *, seed: Any, mesh: Mesh,
            tokenizer=None, return_logits: bool = False, prompt_ids=None,
            local: bool = False) -> Call:
    """Check the prompts and stops (clear errors, before anything compiles), pad the batch and
    place the inputs on the mesh. prompt_ids int [B]: the prompts' indices in the rollout
    (default: 0, 1, ... counted from this data slice's first prompt). local: the prompts are this
    process's data slice (see the module docstring)."""
    tokens = np.asarray(prompt_tokens).astype(np.int32)
    mask = np.asarray(prompt_mask).astype(bool)
    config = model.config
    _check_prompts(tokens, mask, config.vocab_size)
    tokens = np.where(mask, tokens, 0)  # pad ids may lie outside the vocabulary
    stop_ids, stop_strs = stops_of(config, tokenizer, params)
    if stop_strs and tokenizer is None:
        raise ValueError(f"stop_strings {stop_strs} need a tokenizer")
    if any(not 0 <= t < config.vocab_size for t in stop_ids):
        raise ValueError(f"stop_token_ids {stop_ids} must be in [0, {config.vocab_size})")

    b, tp = tokens.shape
    index, slices = shd.data_slice(mesh) if local else (0, 1)
    if slices > 1:  # every process must compile the same shapes: agree on them
        sizes = shd.allgather_json([b, tp])
        if len({s[0] for s in sizes}) > 1:
            raise ValueError("process-local prompt batches must be the same size on every "
                             f"process, got {[s[0] for s in sizes]} prompts")
        tokens, mask = (np.pad(x, ((0, 0), (max(s[1] for s in sizes) - tp, 0)))
                        for x in (tokens, mask))
        b, tp = tokens.shape
    prompt_ids = index * b + np.arange(b) if prompt_ids is None else np.asarray(prompt_ids)
    if prompt_ids.shape != (b,):
        raise ValueError(f"prompt_ids {prompt_ids.shape} must be one per prompt ({b})")
    shards = shd.axis_size(mesh, "batch") // slices
    bp = -(-b // shards) * shards
    tpp = prompt_width(tp)
    ids = np.concatenate([prompt_ids, prompt_ids[-1] + 1 + np.arange(bp - b)]).astype(np.int32)
    padded_tokens = np.zeros((bp, tpp), np.int32)
    padded_mask = np.zeros((bp, tpp), bool)
    padded_tokens[:b, tpp - tp:], padded_mask[:b, tpp - tp:] = tokens, mask
    padded_mask[b:, -1] = True  # dummy one-token prompts, dropped on return

    if stop_strs:
        tables = jax.device_put(stops.stop_string_tables(tokenizer, config.vocab_size, stop_strs),
                                shd.replicated(mesh))
        finals = jax.device_put(stops.final_states(stop_strs), shd.replicated(mesh))
    else:
        tables = finals = None
    plan = Plan(n=params.n, max_new_tokens=params.max_new_tokens,
                 greedy=params.temperature == 0, top_k=params.top_k,
                 use_top_p=params.top_p < 1.0, stop_token_ids=stop_ids,
                 num_stop_strings=len(stop_strs), mesh=mesh, return_logits=return_logits,
                 prefill_chunk=PREFILL_CHUNK)
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    rep = shd.replicated(mesh)
    graphdef, state = nnx.split(model)
    put = shd.from_local_batch if local else shd.shard_batch
    return Call(plan=plan, graphdef=graphdef, state=serving_state(state, mesh, model.dtype),
                tokens=put(mesh, padded_tokens), mask=put(mesh, padded_mask),
                key=jax.device_put(key, rep),
                temperature=jax.device_put(np.float32(params.temperature or 1.0), rep),
                top_p=jax.device_put(np.float32(params.top_p), rep), tables=tables, finals=finals,
                prompt_ids=put(mesh, ids), prompts=b,
                decode_rows=((slices - 1) * bp + b) * params.n, local=local,
                stop_strings=stop_strs, prompt_tokens=tokens, prompt_mask=mask)


def sample(model, prompt_tokens, prompt_mask, params: SamplingParams, *, seed: Any, mesh: Mesh,
           tokenizer=None, return_logits: bool = False, prompt_ids=None, local: bool = False,
           on_progress=None) -> Rollout:
    """Sample `params.n` completions for each left-padded prompt.

    model: a decoder (models/decoder.py) whose params are on `mesh`; prompt_tokens int32 [B, Tp],
    prompt_mask bool [B, Tp] (left-padded); seed: int or a jax PRNG key; tokenizer: adds its EOS
    ids to the stop ids, is required for stop strings, and fills `Rollout.texts`. return_logits
    keeps every step's raw logits (debugging and tests: R*M*V floats). prompt_ids: the prompts'
    indices in the rollout (their rows' random streams), when a rollout is split into calls.
    local: the prompts are this process's data slice, and so are the returned rows.
    on_progress(rows_done, tokens): called every PROGRESS_EVERY decode steps with the finished
    rows and generated tokens so far (of the B*n real rows), for progress lines.
    """
    c = prepare(model, prompt_tokens, prompt_mask, params, seed=seed, mesh=mesh,
                tokenizer=tokenizer, return_logits=return_logits, prompt_ids=prompt_ids,
                local=local)
    static = dict(graphdef=c.graphdef, plan=c.plan)
    t0 = time.perf_counter()
    loop = prefill(c.state, c.tokens, c.mask, c.key, c.prompt_ids, c.temperature, c.top_p,
                   c.tables, c.finals, **static)
    jax.block_until_ready(loop)
    t1 = time.perf_counter()
    if on_progress is None:
        loop = decode(c.state, loop, c.temperature, c.top_p, c.tables, c.finals, **static)
    else:
        r = c.prompts * params.n
        while True:
            until = jax.device_put(np.int32(int(loop.step) + PROGRESS_EVERY),
                                   shd.replicated(mesh))
            loop = decode(c.state, loop, c.temperature, c.top_p, c.tables, c.finals, until,
                          **static)
            mine = c.host_rows(loop.done)[:r]
            on_progress(int(mine.sum()), int(c.host_rows(loop.lengths)[:r].sum()))
            if shd.to_host(loop.done).all():  # every process's rows: all stop together
                break
    jax.block_until_ready(loop)
    steps = int(loop.step)  # with compilation on a first call
    timings = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1,
               "decode_steps": steps - 1, "token_steps": steps, "slots": int(loop.done.shape[0])}
    r = c.prompts * params.n
    return finish(c, loop.tokens, loop.logprobs, loop.lengths, loop.stopped, rows=r,
                  params=params, tokenizer=tokenizer, timings=timings,
                  logits=c.host_rows(loop.logits)[:r] if return_logits else None)


def finish(c: Call, tokens, logprobs, lengths, stopped, *, rows: int, params: SamplingParams,
           tokenizer, timings: dict, logits=None) -> Rollout:
    """The Rollout of call `c` from the first `rows` rows of the device buffers [>= rows, M]
    (of this process's slice when the call is local)."""
    lengths = c.host_rows(lengths)[:rows]
    rollout = Rollout(
        tokens=c.host_rows(tokens)[:rows], logprobs=c.host_rows(logprobs)[:rows],
        mask=np.arange(params.max_new_tokens)[None, :] < lengths[:, None], lengths=lengths,
        finish_reason=np.where(c.host_rows(stopped)[:rows], "stop", "length"), logits=logits,
        timings=timings, prompt_tokens=np.repeat(c.prompt_tokens, params.n, axis=0),
        prompt_mask=np.repeat(c.prompt_mask, params.n, axis=0))
    if tokenizer is not None:
        rollout.texts = decode_texts(tokenizer, rollout, c.stop_strings)
    return rollout


def rollout_report(timings: list[dict], generated_tokens: int) -> dict:
    """Per rollout (over its sampler calls): decode_steps (token-choosing passes, summed over
    calls), generated_tokens, slot_utilization = generated tokens / sum(slots x steps) (the share
    of decoded row-steps that produced a token), tokens_per_s (prefill and decode wall time);
    with a paged cache, preemptions (rows decoded again for lack of pages)."""
    slot_steps = sum(t["slots"] * t["token_steps"] for t in timings)
    wall = sum(t["prefill_s"] + t["decode_s"] for t in timings)
    report = {"decode_steps": int(sum(t["token_steps"] for t in timings)),
              "generated_tokens": int(generated_tokens),
              "slot_utilization": generated_tokens / max(slot_steps, 1),
              "tokens_per_s": generated_tokens / max(wall, 1e-9)}
    if any("preemptions" in t for t in timings):
        report["preemptions"] = int(sum(t.get("preemptions", 0) for t in timings))
    return report


def decode_texts(tokenizer, rollout: Rollout, stop_strings: tuple[str, ...] = ()) -> list[str]:
    """Each row's generated text (special tokens skipped), cut right after a stop string."""
    texts = tokenizer.batch_decode([row[:n].tolist() for row, n in
                                    zip(rollout.tokens, rollout.lengths, strict=False)],
                                   skip_special_tokens=True)
    return [stops.truncate_after(t, stop_strings)[0] for t in texts]
