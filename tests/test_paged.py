"""The paged KV cache (models/paged.py) and continuous batching on it (sampling/continuous.py):
ragged attention against a direct softmax over each slot's tokens, on one device and sharded;
every row's tokens and log-probs the same as one static call on the dense cache, also when a
small pool preempts rows; clear refusals of pools that cannot hold a row."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from r1zero_jax.config import load_config
from r1zero_jax.models import paged
from r1zero_jax.models.decoder import init_model
from r1zero_jax.sampling.continuous import sample_continuous
from r1zero_jax.sampling.generation import generate
from r1zero_jax.sampling.sampler import SamplingParams, sample
from r1zero_jax.sharding import logical_sharding, make_mesh
from test_continuous import CONFIG, PadTokenizer, _prompts, _same
from test_sampling import LetterTokenizer

K, G, H, Z = 2, 3, 8, 4  # kv heads, queries per kv head, head dim, page size


def _case(shards, slots_per_shard, pages_per_shard, width, seed=0):
    """Random slots: per shard, the slots own disjoint random pages of that shard's pool (local
    numbers), some left free; lengths cover empty, one token, a page boundary and several pages."""
    rs = np.random.RandomState(seed)
    s, p = shards * slots_per_shard, shards * pages_per_shard
    q = rs.randn(s, K, G, H).astype(np.float32)
    k_new, v_new = (rs.randn(s, K, H).astype(np.float32) for _ in range(2))
    k_pages, v_pages = (rs.randn(p, Z, K, H).astype(np.float32) for _ in range(2))
    table = np.zeros((s, width), np.int32)
    for i in range(shards):
        owned = rs.permutation(pages_per_shard)[:slots_per_shard * width]
        table[i * slots_per_shard:(i + 1) * slots_per_shard] = owned.reshape(-1, width)
    length = rs.randint(0, width * Z, s).astype(np.int32)  # tokens before this pass
    length[:4] = [0, Z - 1, Z, 2 * Z + 1][:len(length[:4])]
    write = np.ones(s, bool)
    write[1::5] = False  # idle slots: no write, output zero
    return q, k_new, v_new, k_pages, v_pages, table, length, write


def _reference(q, k_new, v_new, k_pages, v_pages, table, length, write, shards):
    """Each writing slot's softmax over its own tokens (its pages in table order, then the new
    one), in float64 numpy; the pools with the new key and value written."""
    s, width = table.shape
    per_shard_pages = k_pages.shape[0] // shards
    kp, vp = k_pages.copy(), v_pages.copy()
    out = np.zeros(q.shape)
    for i in range(s):
        if not write[i]:
            continue
        base = i // (s // shards) * per_shard_pages  # the slot's shard's first page
        page, off = base + table[i, length[i] // Z], length[i] % Z
        kp[page, off], vp[page, off] = k_new[i], v_new[i]
        n = length[i] + 1
        keys = np.concatenate([kp[base + table[i, t]] for t in range(width)])[:n]  # [T, K, H]
        vals = np.concatenate([vp[base + table[i, t]] for t in range(width)])[:n]
        scores = np.einsum("KGH,TKH->KGT", q[i].astype(np.float64), keys) / math.sqrt(H)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[i] = np.einsum("KGT,TKH->KGH", probs / probs.sum(-1, keepdims=True), vals)
    return out, kp, vp


@pytest.mark.parametrize("spec,shards", [("data=1", 1), ("data=4,tensor=2", 4)])
def test_ragged_attention_matches_a_softmax_over_each_slots_tokens(spec, shards):
    mesh = make_mesh(spec, jax.devices()[:1] if spec == "data=1" else None)
    case = _case(shards, slots_per_shard=6, pages_per_shard=27, width=4)
    q, k_new, v_new, k_pages, v_pages, table, length, write = case
    put = lambda x, axes: jax.device_put(x, logical_sharding(mesh, axes))  # noqa: E731
    cache = paged.PagedKVCache(k=(), v=(), table=put(table, ("batch", None)),
                               length=put(length, ("batch",)), write=put(write, ("batch",)))
    fn = jax.jit(lambda *a: paged.attend(*a, cache, mesh))
    out, kp, vp = fn(put(q, ("batch", "kv_heads", None, None)),
                     put(k_new, ("batch", "kv_heads", None)),
                     put(v_new, ("batch", "kv_heads", None)),
                     put(k_pages.reshape(-1, Z, K * H), paged.PagedKVCache.PAGE_AXES),
                     put(v_pages.reshape(-1, Z, K * H), paged.PagedKVCache.PAGE_AXES))
    want, want_k, want_v = _reference(*case, shards=shards)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(kp).reshape(want_k.shape), want_k)
    np.testing.assert_array_equal(np.asarray(vp).reshape(want_v.shape), want_v)
    assert not np.asarray(out)[~write].any()


@pytest.mark.parametrize("spec,prompts,runs", [
    # (slots, page size, pages): enough pages for every slot; a pool so small rows are preempted
    ("data=1", 5, ((15, 8, 0), (4, 4, 12))), ("data=4,tensor=2", 4, ((8, 4, 40),)),
    pytest.param("data=1", 5, ((4, 4, 0), (21, 2, 0)), marks=pytest.mark.slow),
    pytest.param("data=4,tensor=2", 4, ((12, 2, 0),), marks=pytest.mark.slow)])
def test_paged_rows_match_one_static_call(spec, prompts, runs):
    """The test_continuous rows (stop ids, a stop string, the length limit) on a paged cache:
    the static call's tokens and log-probs for every slot count and page size, and the same with
    a pool too small for every slot's rows (preempted rows come back with the same tokens)."""
    mesh = make_mesh(spec, jax.devices()[:1] if spec == "data=1" else None)
    model = init_model(CONFIG, mesh, seed=1)
    tokens, mask = _prompts(prompts)
    params = SamplingParams(max_new_tokens=14, n=3, stop_token_ids=(5, 17, 40, 61),
                            stop_strings=("ab",))
    tok = LetterTokenizer()
    ref = sample(model, tokens, mask, params, seed=3, mesh=mesh, tokenizer=tok)
    for slots, page_size, pages in runs:
        out = sample_continuous(model, tokens, mask, params, seed=3, mesh=mesh, slots=slots,
                                tokenizer=tok, page_size=page_size, pages=pages)
        _same(out, ref)
        assert out.texts == ref.texts
        if pages:
            assert out.timings["pages"] == pages and out.timings["preemptions"] > 0
        else:
            assert out.timings["preemptions"] == 0


def test_generate_reports_preemptions_and_refuses_a_pool_without_room_for_a_row():
    mesh = make_mesh("data=1", jax.devices()[:1])
    model = init_model(CONFIG, mesh, seed=1)
    tokens, mask = _prompts(b=4)
    prompts = [t[m].tolist() for t, m in zip(tokens, mask, strict=False)]
    params = SamplingParams(max_new_tokens=10, n=2, stop_token_ids=(5, 17, 40, 61))
    kw = dict(tokenizer=PadTokenizer(), mesh=mesh, seed=jax.random.key(7))
    dense = generate(model, prompts, params, decode_slots=4, **kw)
    small = generate(model, prompts, params, decode_slots=4, page_size=4, cache_pages=8, **kw)
    np.testing.assert_array_equal(small.tokens, dense.tokens)
    assert small.report["preemptions"] > 0 and "preemptions" not in dense.report
    # the widest prompt (9 tokens, width 16) + 10 new tokens: 7 pages of 4
    with pytest.raises(ValueError, match=r"needs 7: raise sampling.cache_pages to at least 7"):
        generate(model, prompts, params, decode_slots=4, page_size=4, cache_pages=6, **kw)


def test_paged_config_is_checked_first():
    base = ["sampling.decode_slots=16", "sampling.page_size=64"]
    assert load_config("qwen2_5_math_1_5b_dr_grpo", base).sampling.page_size == 64
    with pytest.raises(ValueError, match="sampling.page_size=64 pages the cache of continuous"):
        load_config("qwen2_5_math_1_5b_dr_grpo", ["sampling.page_size=64"])
    with pytest.raises(ValueError, match="sampling.cache_pages=99 needs sampling.page_size"):
        load_config("qwen2_5_math_1_5b_dr_grpo", ["sampling.cache_pages=99"])
    with pytest.raises(ValueError, match="sampling.page_size=-1"):
        load_config("qwen2_5_math_1_5b_dr_grpo", base + ["sampling.page_size=-1"])
    # 512 + 3000 tokens in pages of 64: 55 per row, on each of 4 batch shards
    with pytest.raises(ValueError, match="leaves 50 pages per batch shard.*set at least 220"):
        load_config("qwen2_5_math_1_5b_dr_grpo",
                    base + ["sampling.cache_pages=200", "mesh.spec=data=4"], num_devices=4)


def test_prompt_pages_hold_the_real_tokens_from_the_first():
    from r1zero_jax.sampling.continuous import _prompt_pages

    x = jnp.arange(10 * 2 * 3, dtype=jnp.float32).reshape(10, 2, 3)  # [Tp, K, H], 4 pad first
    tokens = np.asarray(_prompt_pages(x, jnp.int32(6), 4)).reshape(12, 2, 3)  # [3, Z, K*H]
    np.testing.assert_array_equal(tokens[:6], np.asarray(x)[4:])
