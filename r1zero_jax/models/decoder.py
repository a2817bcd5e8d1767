"""The one decoder every model family runs (Flax NNX), with a KV cache for the sampler.

Pre-norm blocks of grouped-query attention with RoPE and a SwiGLU MLP, RMSNorm; the family's
config (models/family.py) picks the variant: q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3),
Llama 3's RoPE scaling, a tied LM head.

Shapes: B batch, T query length, S cache slots, D embed, N query heads, K kv heads, G = N // K,
H head dim, F mlp, V vocab, L layers. Every parameter carries `logical` axis names that
`r1zero_jax.sharding.LOGICAL_RULES` maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from r1zero_jax import sharding as shd
from r1zero_jax.models import paged
from r1zero_jax.models.family import DecoderConfig, RopeScaling
from r1zero_jax.models.paged import PagedKVCache

_NEG_INF = -1e30  # finite, so a fully masked (left-pad) query row gives no NaN


def _pin(x, axes):
    """Pin an activation [B, T, ...] to its logical sharding on the activation mesh (if any):
    axes[0] when T > 1 (learner, prefill), axes[1] for a decode step (T = 1). With many tokens
    the batch is sharded over (data, fsdp) and XLA gathers each layer's fsdp-sharded weights
    (FSDP). A decode step's rows are far smaller than the weights, which stay where they are: the
    residual stream shards its features over fsdp like the weights, and only activations move.
    """
    return shd.constrain(x, axes[x.shape[1] == 1])


# (T > 1, decode step) logical axes of the activations that `_pin` fixes
_X_AXES = (("batch", "length", "act_embed"), ("decode_batch", "length", "embed"))
_Q_AXES = (("batch", "length", "heads", "head_dim"),) * 2
_KV_AXES = (("batch", "length", "kv_heads", "head_dim"),) * 2
_MLP_AXES = (("batch", "length", "mlp"), ("decode_batch", "length", "decode_mlp"))
_LOGIT_AXES = (("batch", "length", "act_vocab"), ("decode_batch", "length", "vocab"))


# -- KV cache ----------------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
    """k: one [B, K, H, S] array per layer (slots last); v: one [B, K, S, H] per layer;
    valid: [B, S] slots holding a real (non-pad) token; index: next slot.

    Per-layer arrays, so each decode step updates a layer in place with no copy. The two layouts
    are the ones the decode step reads fastest: scores contract H against keys whose slots are
    contiguous, and values are read row by row (on XLA:CPU a step at 2,096 slots takes 22 ms
    against 27 ms with [B, K, S, H] keys; BENCHMARKS.md).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array  # int32 []: one slot for every row, or [B]: each row's own (continuous
    #                   batching, where rows sit at different lengths)

    K_AXES = ("batch", "kv_heads", "head_dim", "cache_length")
    V_AXES = ("batch", "kv_heads", "cache_length", "head_dim")

    @classmethod
    def init(cls, config: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        k, h, layers = config.num_kv_heads, config.head_dim, range(config.num_layers)
        return cls(k=tuple(jnp.zeros((batch, k, h, max_len), dtype) for _ in layers),
                   v=tuple(jnp.zeros((batch, k, max_len, h), dtype) for _ in layers),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    def extend(self, repeats: int, slots: int) -> KVCache:
        """Each row repeated `repeats` times (row b*repeats+j is copy j of row b), with `slots`
        empty slots appended."""
        rows = self.valid.shape[0] * repeats
        rep = functools.partial(jnp.repeat, repeats=repeats, axis=0, total_repeat_length=rows)
        pad = lambda x, axis: jnp.pad(rep(x), [(0, slots if a == axis else 0)  # noqa: E731
                                               for a in range(x.ndim)])
        return KVCache(k=tuple(pad(x, 3) for x in self.k), v=tuple(pad(x, 2) for x in self.v),
                       valid=pad(self.valid, 1), index=self.index)

    def logical_axes(self) -> KVCache:
        return KVCache(k=tuple(KVCache.K_AXES for _ in self.k),
                       v=tuple(KVCache.V_AXES for _ in self.v), valid=("batch", "cache_length"),
                       index=("batch",) if self.index.ndim else ())

    def shardings(self, mesh: Mesh) -> KVCache:
        return jax.tree.map(lambda axes: shd.logical_sharding(mesh, axes), self.logical_axes(),
                            is_leaf=lambda x: isinstance(x, tuple) and all(
                                isinstance(a, (str, type(None))) for a in x))


def write_slots(cache, new, index, axis: int):
    """`new` (T slots along `axis`) written into `cache` from slot `index`: int32 [] for every
    row, or [B] for each row its own (a per-row scatter)."""
    new = new.astype(cache.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(
            cache, new, tuple(index if a == axis else 0 for a in range(cache.ndim)))
    return jax.vmap(lambda c, x, i: write_slots(c, x, i, axis - 1))(cache, new, index)


# -- layers ------------------------------------------------------------------------------------
def _param(rngs: nnx.Rngs, init, shape, dtype, logical):
    return nnx.Param(init(rngs.params(), shape, dtype), logical=logical)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)  # the variance in float32, as HF does
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x.astype(dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """float32 [H/2] inverse frequencies; with Llama 3 scaling, long wavelengths are divided
    by `factor` and the band between the two thresholds is interpolated (as HF computes them)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    s = scaling
    wavelen = 2 * math.pi / inv_freq
    old = s.original_max_position_embeddings
    scaled = jnp.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def rope(x, positions, inv_freq):
    """Rotary embedding, half-split layout (HF `rotate_half`). x: [B,T,*,H], positions [B,T],
    inv_freq [H/2] from `rope_frequencies`."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B,T,1,H]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        w = nnx.initializers.normal(0.02)
        z = nnx.initializers.zeros
        self.cfg, self.dtype = cfg, dtype
        self.q_kernel = _param(rngs, w, (d, n, h), param_dtype, ("embed", "heads", "head_dim"))
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, z, (n, h), param_dtype, ("heads", "head_dim"))
        self.k_kernel = _param(rngs, w, (d, k, h), param_dtype, ("embed", "kv_heads", "head_dim"))
        if cfg.qkv_bias:
            self.k_bias = _param(rngs, z, (k, h), param_dtype, ("kv_heads", "head_dim"))
        self.v_kernel = _param(rngs, w, (d, k, h), param_dtype, ("embed", "kv_heads", "head_dim"))
        if cfg.qkv_bias:
            self.v_bias = _param(rngs, z, (k, h), param_dtype, ("kv_heads", "head_dim"))
        self.o_kernel = _param(rngs, w, (n, h, d), param_dtype, ("heads", "head_dim", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, key_valid, key_slot, query_slot, kv=None, index=None):
        """x [B,T,D]; key_valid [B,S]; key_slot [S]; query_slot [T] (or [B,T] with a per-row
        cache index).

        Without a cache S == T. With a cache (kv = (k [B,K,H,S], v [B,K,S,H]) of this layer),
        the new keys are written at slots index..index+T-1 and the updated (k, v) are returned.
        A decode step on a paged cache (models/paged.py) passes kv = this layer's (k, v) pages
        and index = the PagedKVCache (page table, lengths); the key_* arguments are unused.
        """
        cfg, dt = self.cfg, self.dtype
        p = lambda v: v[...].astype(dt)  # noqa: E731
        q = jnp.einsum("BTD,DNH->BTNH", x, p(self.q_kernel))
        k = jnp.einsum("BTD,DKH->BTKH", x, p(self.k_kernel))
        v = jnp.einsum("BTD,DKH->BTKH", x, p(self.v_kernel))
        if cfg.qkv_bias:
            q, k, v = q + p(self.q_bias), k + p(self.k_bias), v + p(self.v_bias)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = _pin(q, _Q_AXES), _pin(k, _KV_AXES), _pin(v, _KV_AXES)
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        b, t = x.shape[:2]
        g = cfg.num_heads // cfg.num_kv_heads
        if isinstance(index, PagedKVCache):
            out, *kv = paged.attend(q[:, 0].reshape(b, cfg.num_kv_heads, g, cfg.head_dim),
                                    k[:, 0], v[:, 0], *kv, index, shd.active_mesh())
            return self._project(out.reshape(b, t, cfg.num_heads, cfg.head_dim)), tuple(kv)
        k_spec = v_spec = "BSKH"
        if kv is not None:
            cache_k, cache_v = kv
            k = write_slots(cache_k, k.transpose(0, 2, 3, 1), index, axis=3)
            v = write_slots(cache_v, v.transpose(0, 2, 1, 3), index, axis=2)
            kv, k_spec, v_spec = (k, v), "BKHS", "BKSH"
        q = q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim)
        causal = key_slot <= query_slot[..., None]  # [T,S], or [B,T,S] with per-row slots
        allowed = key_valid[:, None, None, None, :] & causal.reshape(
            (-1, 1, 1) + causal.shape[-2:])
        # Queries go heads-first ([B,K,G,T,H]) so that the scores leave the dot in softmax order
        # (else XLA:CPU transposes them: half of a long prefill). Decode (T = 1) drops the T
        # axis: XLA:CPU then picks kernels that read the cache about 1.3x faster.
        if t == 1:
            qs, ss, q, allowed = "BKGH", "BKGS", q[:, 0], allowed[:, :, :, 0]
        else:
            qs, ss, q = "BKGTH", "BKGTS", q.transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum(f"{qs},{k_spec}->{ss}", q, k.astype(dt),
                            preferred_element_type=jnp.float32) / math.sqrt(cfg.head_dim)
        probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG_INF), axis=-1).astype(dt)
        out = jnp.einsum(f"{ss},{v_spec}->{qs}", probs, v.astype(dt))
        out = out if t == 1 else out.transpose(0, 3, 1, 2, 4)  # [B,T,K,G,H]
        return self._project(out.reshape(b, t, cfg.num_heads, cfg.head_dim)), kv

    def _project(self, out):
        """Attention output [B,T,N,H] -> [B,T,D]."""
        o = self.o_kernel[...].astype(self.dtype)
        return _pin(jnp.einsum("BTNH,NHD->BTD", _pin(out, _Q_AXES), o), _X_AXES)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        w = nnx.initializers.normal(0.02)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype = dtype
        self.gate_kernel = _param(rngs, w, (d, f), param_dtype, ("mlp_embed", "mlp"))
        self.up_kernel = _param(rngs, w, (d, f), param_dtype, ("mlp_embed", "mlp"))
        self.down_kernel = _param(rngs, w, (f, d), param_dtype, ("mlp", "mlp_embed"))

    def __call__(self, x):
        p = lambda v: v[...].astype(self.dtype)  # noqa: E731
        gate = _pin(jnp.einsum("BTD,DF->BTF", x, p(self.gate_kernel)), _MLP_AXES)
        up = _pin(jnp.einsum("BTD,DF->BTF", x, p(self.up_kernel)), _MLP_AXES)
        return _pin(jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, p(self.down_kernel)),
                    _X_AXES)


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dtype=dtype, **kw)

    def __call__(self, x, positions, key_valid, key_slot, query_slot, kv=None, index=None):
        a, kv = self.attn(self.input_norm(x), positions, key_valid, key_slot, query_slot, kv, index)
        x = x + a
        return x + self.mlp(self.post_attn_norm(x)), kv


class Decoder(nnx.Module):
    """A causal LM of any family (its `config`): what the sampler and the learner call.
    `dtype` is the compute dtype, `param_dtype` the storage dtype."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        self.config, self.dtype, self.remat = config, dtype, remat
        self.embed = _param(rngs, nnx.initializers.normal(0.02),
                            (config.vocab_size, config.hidden_size), param_dtype,
                            ("vocab", "vocab_embed"))
        self.layers = nnx.List([Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                  param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, nnx.initializers.normal(0.02),
                                  (config.hidden_size, config.vocab_size), param_dtype,
                                  ("vocab_embed", "vocab"))

    def hidden_states(self, tokens, positions, mask, cache: KVCache | None = None):
        """tokens, positions [B,T] int32; mask [B,T] bool -> (final-normed h [B,T,D], cache).
        With a PagedKVCache (a decode step, T = 1) the mask is unused: the cache's lengths and
        write flags say what each row attends to."""
        t = tokens.shape[1]
        x = _pin(jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype), _X_AXES)
        paged = isinstance(cache, PagedKVCache)
        index = cache if paged else None if cache is None else cache.index
        if paged:  # the cache's lengths say what each row attends to
            key_valid = key_slot = query_slot = None
        elif cache is None:
            key_valid, key_slot, query_slot = mask, jnp.arange(t), jnp.arange(t)
        else:
            s = cache.valid.shape[1]
            key_valid = write_slots(cache.valid, mask, cache.index, axis=1)
            key_slot, query_slot = jnp.arange(s), cache.index[..., None] + jnp.arange(t)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if self.remat and cache is None:
                x = nnx.remat(lambda m, *a: m(*a)[0])(layer, x, positions, key_valid, key_slot,
                                                      query_slot)
            else:
                x, kv = layer(x, positions, key_valid, key_slot, query_slot, kv, index)
            x = _pin(x, _X_AXES)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        if paged:
            cache = cache.replace(k=tuple(new_k), v=tuple(new_v),
                                  length=cache.length + cache.write)
        elif cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=key_valid,
                            index=cache.index + t)
        return self.final_norm(x), cache

    def head_weight(self, gather: bool = True):
        """The LM head in the compute dtype: [V, D] (tied embeddings) or [D, V]. `gather` (T > 1):
        gathered over fsdp, kept vocab-sharded over tensor; a caller that runs the head over
        chunks of positions takes it once, outside its loop. A decode step reads the
        vocab-sharded weight where it lies."""
        tied = self.config.tie_word_embeddings
        w = (self.embed if tied else self.lm_head)[...].astype(self.dtype)
        if not gather:
            return w
        axes = ("act_vocab", "vocab_embed") if tied else ("vocab_embed", "act_vocab")
        return shd.constrain(w, axes)

    def logits(self, h, head=None):
        """h [B,T,D] -> float32 logits [B,T,V] (bf16 matmul, float32 accumulation), vocab-sharded.
        `head`: the result of `head_weight()`, else taken here."""
        if head is None:
            head = self.head_weight(gather=h.shape[1] > 1)
        spec = "BTD,VD->BTV" if self.config.tie_word_embeddings else "BTD,DV->BTV"
        return _pin(jnp.einsum(spec, h, head, preferred_element_type=jnp.float32), _LOGIT_AXES)

    def __call__(self, tokens, positions, mask, cache: KVCache | None = None):
        h, cache = self.hidden_states(tokens, positions, mask, cache)
        return self.logits(h), cache


def positions_from_mask(mask):
    """Left-padded mask [B,T] -> positions [B,T]: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# -- sharded construction -------------------------------------------------------------------
def state_shardings(state, mesh: Mesh, rules: dict | None = None):
    """NamedShardings for an nnx.State of the model's variables (their `logical` metadata)."""
    def one(v):
        axes = v.get_metadata().get("logical", (None,) * v.get_value().ndim)
        return shd.logical_sharding(mesh, axes, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mesh_problems(config: DecoderConfig, mesh: Mesh | dict[str, int]) -> list[str]:
    """What a mesh (or its axis sizes) cannot shard evenly of this model: its stored layout
    and the sampler's serving layout."""
    return (shd.divisibility_problems(mesh, {
        "heads": config.num_heads, "kv_heads": config.num_kv_heads, "vocab": config.vocab_size,
        "mlp": config.intermediate_size, "embed": config.hidden_size})
        + [f"{p} (the sampler's layout)" for p in shd.divisibility_problems(
            mesh, {"mlp": config.intermediate_size}, shd.SERVING_RULES)])


def check_mesh_fits(config: DecoderConfig, mesh: Mesh) -> None:
    """Refuse, before anything compiles, a mesh that cannot shard this model."""
    problems = mesh_problems(config, mesh)
    if problems:
        raise ValueError(f"mesh {shd.mesh_shape(mesh)} does not fit the model: "
                         + "; ".join(problems))


def abstract_model(config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   remat: bool = False) -> Decoder:
    """The model with jax.ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Decoder(config, dtype=dtype, param_dtype=param_dtype,
                                          remat=remat, rngs=nnx.Rngs(0)))


def num_params(config: DecoderConfig) -> int:
    """Parameter count from abstract shapes. Layers are identical, so a 1- and a 2-layer model
    give the per-layer count; building 80 abstract layers of a 72B model would take seconds."""
    def count(layers):
        state = nnx.state(abstract_model(dataclasses.replace(config, num_layers=layers)), nnx.Param)
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

    one = count(1)
    return one + (config.num_layers - 1) * (count(2) - one)


def param_shardings(model: Decoder, mesh: Mesh, rules: dict | None = None):
    """NamedShardings (an nnx.State) for the model's params, from the LOGICAL_RULES table (or
    `rules`, e.g. sharding.SERVING_RULES)."""
    return state_shardings(nnx.state(model, nnx.Param), mesh, rules)


def init_model(config: DecoderConfig, mesh: Mesh, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, seed: int = 0) -> Decoder:
    """Random init, each param created directly in its shards (no full copy on any host)."""
    check_mesh_fits(config, mesh)
    abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh)

    def make():
        model = Decoder(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                      rngs=nnx.Rngs(seed))
        return jax.lax.with_sharding_constraint(nnx.state(model), shardings)

    make = jax.jit(make, out_shardings=shardings)
    return nnx.merge(graphdef, make())


def model_from_params(config: DecoderConfig, params, *, dtype=jnp.float32, remat: bool = False):
    """A model around an existing params State (already placed on devices)."""
    param_dtype = jax.tree.leaves(params)[0].dtype
    graphdef, _ = nnx.split(abstract_model(config, dtype=dtype, param_dtype=param_dtype,
                                           remat=remat))
    return nnx.merge(graphdef, params)


def params_of(model: Decoder) -> dict:
    """The model's params as a nested dict of arrays (no copy)."""
    return nnx.state(model, nnx.Param).to_pure_dict()
