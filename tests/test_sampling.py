"""Sampler: greedy parity with transformers, cached logits and log-probs against a full forward,
n samples from one prefill, stops, filters (statistically), bad input."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import torch

from r1zero_jax.convert.hf import load_model
from r1zero_jax.models.decoder import Decoder
from r1zero_jax.sampling import categorical, filters, stop_strings
from r1zero_jax.sampling.sampler import SamplingParams, _choose, Plan, sample
from r1zero_jax.sharding import make_mesh

VOCAB = 128


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-zero biases and norms, so a dropped term shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def torch_model(hf_dir):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh("data=1", jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh("data=4,tensor=2")


def _prompts():
    """3 left-padded prompts of lengths 7, 4, 6."""
    tokens = np.random.RandomState(0).randint(0, VOCAB, (3, 7)).astype(np.int32)
    mask = np.ones((3, 7), bool)
    mask[1, :3] = False
    mask[2, :1] = False
    return np.where(mask, tokens, 0), mask


def _hf_greedy(torch_model, tokens, mask, m):
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long),
                                   max_new_tokens=m, min_new_tokens=m, do_sample=False,
                                   pad_token_id=0)
    return out[:, tokens.shape[1]:].numpy()


def _hf_logits(torch_model, tokens, mask, generated):
    """Full uncached forward over prompt + generated; logits predicting each generated token."""
    full = np.concatenate([tokens, generated], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(generated, bool)], axis=1)
    pos = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    with torch.no_grad():
        logits = torch_model(input_ids=torch.tensor(full, dtype=torch.long),
                             attention_mask=torch.tensor(full_mask, dtype=torch.long),
                             position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
    tp, m = tokens.shape[1], generated.shape[1]
    return logits[:, tp - 1:tp - 1 + m]


@pytest.mark.parametrize("mesh_name", ["mesh1", "mesh8"])
def test_greedy_matches_transformers(request, hf_dir, torch_model, mesh_name):
    mesh = request.getfixturevalue(mesh_name)
    model, _, _ = load_model(hf_dir, mesh)
    tokens, mask = _prompts()
    m = 12
    ro = sample(model, tokens, mask, SamplingParams(max_new_tokens=m, temperature=0.0), seed=0,
                mesh=mesh)
    np.testing.assert_array_equal(ro.tokens, _hf_greedy(torch_model, tokens, mask, m))
    assert ro.mask.all() and (ro.lengths == m).all() and (ro.finish_reason == "length").all()
    # greedy log-probs are the unscaled model's
    ref = torch.log_softmax(torch.tensor(_hf_logits(torch_model, tokens, mask, ro.tokens)), -1)
    ref = np.take_along_axis(ref.numpy(), ro.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(ro.logprobs, ref, atol=1e-4)
    # ignore_eos drops the stop ids: the same compiled sampler, full length
    stop = int(ro.tokens[0, 2])
    again = sample(model, tokens, mask, SamplingParams(max_new_tokens=m, temperature=0.0,
                                                       stop_token_ids=(stop,), ignore_eos=True),
                   seed=0, mesh=mesh)
    np.testing.assert_array_equal(again.tokens, ro.tokens)
    # pad ids outside the vocabulary are harmless
    odd_pad = sample(model, np.where(mask, tokens, -1), mask,
                     SamplingParams(max_new_tokens=m, temperature=0.0), seed=0, mesh=mesh)
    np.testing.assert_array_equal(odd_pad.tokens, ro.tokens)


def test_chunked_prefill_greedy_matches_transformers(hf_dir, torch_model, mesh1, monkeypatch):
    import r1zero_jax.sampling.sampler as sampler

    monkeypatch.setattr(sampler, "PREFILL_CHUNK", 8)  # 20-token prompts: 3 chunks of 8
    model, _, _ = load_model(hf_dir, mesh1)
    rs = np.random.RandomState(5)
    mask = np.arange(20)[None, :] >= np.array([[0], [7], [15]])
    tokens = np.where(mask, rs.randint(0, VOCAB, mask.shape), 0).astype(np.int32)
    ro = sample(model, tokens, mask, SamplingParams(max_new_tokens=4, temperature=0.0), seed=0,
                mesh=mesh1)
    np.testing.assert_array_equal(ro.tokens, _hf_greedy(torch_model, tokens, mask, 4))


def test_n_samples_logits_and_logprobs(hf_dir, torch_model, mesh8, monkeypatch):
    model, _, _ = load_model(hf_dir, mesh8)
    tokens, mask = _prompts()
    n, m = 3, 10
    calls = []
    original = Decoder.hidden_states

    def spy(self, tok, *args, **kwargs):
        calls.append(tok.shape)
        return original(self, tok, *args, **kwargs)

    monkeypatch.setattr(Decoder, "hidden_states", spy)
    sp = SamplingParams(max_new_tokens=m, temperature=1.0, top_k=20, n=n)
    ro = sample(model, tokens, mask, sp, seed=1, mesh=mesh8, return_logits=True)
    monkeypatch.undo()
    # One prefill over the 3 prompts (padded to the 4 batch shards and the width rule's power of
    # two), decode over 4 * n rows.
    assert tokens.shape[1] == 7 and calls == [(4, 8), (4 * n, 1)], calls
    assert ro.tokens.shape == (3 * n, m)
    for b in range(3):
        rows = ro.tokens[b * n:(b + 1) * n]
        assert len({tuple(r) for r in rows}) == n, f"samples of prompt {b} are not distinct"

    prompt_tokens, prompt_mask = np.repeat(tokens, n, 0), np.repeat(mask, n, 0)
    ref = _hf_logits(torch_model, prompt_tokens, prompt_mask, ro.tokens)
    np.testing.assert_allclose(ro.logits, ref, atol=1e-4)
    # temperature 1: log-probs of the full forward, unaffected by the top-k filter
    ref_lp = np.take_along_axis(torch.log_softmax(torch.tensor(ref), -1).numpy(),
                                ro.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(ro.logprobs, ref_lp, atol=1e-4)
    # every sampled token lies in the top 20 of its step
    kth = np.sort(ref, -1)[..., -20]
    assert (np.take_along_axis(ref, ro.tokens[..., None], -1)[..., 0] >= kth - 1e-5).all()

    # temperature 0.7 (same compiled sampler): log_softmax(logits / 0.7) at the sampled tokens
    ro7 = sample(model, tokens, mask, SamplingParams(max_new_tokens=m, temperature=0.7,
                                                     top_k=20, n=n),
                 seed=1, mesh=mesh8, return_logits=True)
    ref7 = _hf_logits(torch_model, prompt_tokens, prompt_mask, ro7.tokens)
    lp7 = torch.log_softmax(torch.tensor(ref7) / 0.7, -1).numpy()
    np.testing.assert_allclose(ro7.logprobs, np.take_along_axis(lp7, ro7.tokens[..., None], -1)[
        ..., 0], atol=1e-4)

    # deterministic per seed, different across seeds
    same = sample(model, tokens, mask, sp, seed=1, mesh=mesh8, return_logits=True)
    np.testing.assert_array_equal(same.tokens, ro.tokens)
    other = sample(model, tokens, mask, sp, seed=2, mesh=mesh8, return_logits=True)
    assert (other.tokens != ro.tokens).any()


class LetterTokenizer:
    """A stand-in byte-level tokenizer: token i is a 1-2 letter string, 127 is a special EOS."""

    eos_token_id = 127
    all_special_ids = [127]

    def __init__(self):
        self.pieces = [chr(97 + i % 26) + ("" if i < 26 else chr(96 + i // 26))
                       for i in range(VOCAB - 1)] + ["<eos>"]

    def __len__(self):
        return VOCAB

    def get_vocab(self):
        return {p: i for i, p in enumerate(self.pieces)}

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids
                       if not (skip_special_tokens and i in self.all_special_ids))

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(r, skip_special_tokens) for r in rows]


def test_stop_ids_and_stop_strings(hf_dir, torch_model, mesh1):
    model, _, _ = load_model(hf_dir, mesh1)
    tok = LetterTokenizer()
    tokens, mask = _prompts()
    m = 12
    greedy = _hf_greedy(torch_model, tokens, mask, m)
    # a stop string across a token boundary of row 1, a stop id from row 2
    stop_str = tok.pieces[greedy[1, 4]][-1] + tok.pieces[greedy[1, 5]][0]
    stop_id = int(greedy[2, 4])

    def expected(row):
        for k in range(1, m + 1):
            if row[k - 1] in (stop_id, tok.eos_token_id) or stop_str in tok.decode(row[:k]):
                return k, "stop"
        return m, "length"

    sp = SamplingParams(max_new_tokens=m, temperature=0.0, stop_token_ids=(stop_id,),
                        stop_strings=(stop_str,))
    ro = sample(model, tokens, mask, sp, seed=0, mesh=mesh1, tokenizer=tok)
    for r in range(3):
        k, reason = expected(greedy[r])
        assert ro.lengths[r] == k and ro.finish_reason[r] == reason, (r, k, reason)
        np.testing.assert_array_equal(ro.tokens[r, :k], greedy[r, :k])
        assert (ro.tokens[r, k:] == 0).all() and (ro.logprobs[r, k:] == 0).all()
        assert ro.mask[r].sum() == k
        text = tok.decode(greedy[r, :k], skip_special_tokens=True)
        assert ro.texts[r] == (text[:text.find(stop_str) + len(stop_str)]
                               if stop_str in text else text)
    assert ro.finish_reason[1] == "stop" and ro.texts[1].endswith(stop_str)
    assert ro.lengths[1] <= 6 and ro.lengths[2] <= 5


def test_stop_string_automaton_matches_brute_force():
    rs = np.random.RandomState(0)
    alphabet = b"ab<>/"
    pieces = [bytes(rs.choice(list(alphabet), rs.randint(0, 6))) for _ in range(300)]
    for pattern in (b"</a>", b"aab", b"abab", b"a"):
        table = stop_strings.transition_table(pieces, pattern)
        m = len(pattern)
        for v, piece in enumerate(pieces):
            for q in range(m + 1):
                text = pattern[:q] + piece
                if q == m or pattern in text:
                    want = m
                else:
                    want = max(j for j in range(m) if text.endswith(pattern[:j]))
                assert table[v, q] == want, (pattern, piece, q)


def test_stop_string_table_from_byte_level_pieces():
    tok = LetterTokenizer()
    tables = stop_strings.stop_string_tables(tok, 130, ("ba",))
    assert tables.shape == (1, 130, 3)
    b, a, eos = 1, 0, 127
    assert tables[0, b, 0] == 1 and tables[0, a, 1] == 2 and tables[0, eos, 1] == 1
    assert tables[0, 128, 1] == 1  # ids past the tokenizer add no text
    assert stop_strings.truncate_after("xx</answer> more", ("</answer>",)) == ("xx</answer>", True)


def _draws(logits, plan, temperature=1.0, top_p=1.0, rows=20000):
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (rows, len(logits)))
    steps, ids = jnp.full((rows,), 3, jnp.int32), jnp.arange(rows, dtype=jnp.int32)
    choose = jax.jit(lambda x, t, p: _choose(x, jax.random.key(0), steps, ids, t, p, plan)[0])
    return np.asarray(choose(batch, temperature, top_p))


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (0, 0.6, 1.0),
                                                      (5, 0.6, 0.5), (0, 0.9, 2.0)])
def test_top_k_top_p_frequencies(mesh1, top_k, top_p, temperature):
    probs = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
    logits = np.log(probs)[np.random.RandomState(1).permutation(8)]
    plan = Plan(n=1, max_new_tokens=1, greedy=False, top_k=top_k, use_top_p=top_p < 1,
                 stop_token_ids=(), num_stop_strings=0, mesh=mesh1)
    # the reference filter, written independently: sort, cut, renormalise
    p = np.exp(logits / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(8, bool)
    keep[order[:top_k or 8]] = True
    if top_p < 1:
        q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        mass_before = np.cumsum(q[order]) - q[order]
        keep[order[mass_before >= top_p]] = False
    want = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    rows = 20000
    got = np.bincount(_draws(logits, plan, temperature, top_p, rows), minlength=8) / rows
    assert (got[~keep] == 0).all(), (got, want)
    assert np.abs(got - want).max() < 4.5 * np.sqrt(want * (1 - want) / rows).max(), (got, want)
    assert keep.sum() < 8  # the case filters something


def test_row_randomness_is_independent_of_batch_size(mesh1):
    plan = Plan(n=1, max_new_tokens=1, greedy=False, top_k=0, use_top_p=False,
                 stop_token_ids=(), num_stop_strings=0, mesh=mesh1)
    logits = np.zeros(16)
    np.testing.assert_array_equal(_draws(logits, plan, rows=64)[:16],
                                  _draws(logits, plan, rows=16))


def test_filters_keep_crossing_token():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    assert np.isfinite(filters.top_p_filter(logits, 0.45)).tolist() == [[True, False, False]]
    assert np.isfinite(filters.top_p_filter(logits, 0.55)).tolist() == [[True, True, False]]
    assert np.isfinite(filters.top_k_filter(logits, 2)).tolist() == [[True, True, False]]
    assert np.isfinite(filters.top_k_filter(logits, 0)).all()


def test_bad_input_is_refused(hf_dir, mesh1):
    model, _, _ = load_model(hf_dir, mesh1)
    tokens, mask = _prompts()
    sp = SamplingParams(max_new_tokens=2)
    bad = mask.copy()
    bad[0, 3] = False
    with pytest.raises(ValueError, match="not left-padded"):
        sample(model, tokens, bad, sp, seed=0, mesh=mesh1)
    empty = mask.copy()
    empty[1] = False
    with pytest.raises(ValueError, match=r"prompts \[1\] have no tokens"):
        sample(model, tokens, empty, sp, seed=0, mesh=mesh1)
    with pytest.raises(ValueError, match="must be in"):
        sample(model, tokens + VOCAB, mask, sp, seed=0, mesh=mesh1)
    with pytest.raises(ValueError, match="need a tokenizer"):
        sample(model, tokens, mask, SamplingParams(max_new_tokens=2, stop_strings=("x",)),
               seed=0, mesh=mesh1)
    with pytest.raises(ValueError, match="same"):
        sample(model, tokens, mask[:, 1:], sp, seed=0, mesh=mesh1)
    for kw in (dict(max_new_tokens=0), dict(max_new_tokens=1, temperature=-1),
               dict(max_new_tokens=1, top_p=0), dict(max_new_tokens=1, top_k=-1),
               dict(max_new_tokens=1, n=0)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_draw_matches_weights_across_blocks():
    # 700 tokens span three blocks; weights of 0 (whole blocks and single tokens) are never drawn
    rs = np.random.RandomState(0)
    w = np.zeros(700, np.float32)
    live = np.concatenate([rs.choice(256, 5, replace=False), [511, 512, 699]])
    w[live] = rs.uniform(0.5, 2.0, len(live))
    rows = 40000
    u = 1.0 - jax.random.uniform(jax.random.key(1), (rows,))
    got = np.bincount(np.asarray(categorical.draw(jnp.broadcast_to(w, (rows, 700)), u)),
                      minlength=700) / rows
    want = w / w.sum()
    assert (got[w == 0] == 0).all()
    assert np.abs(got - want).max() < 4.5 * np.sqrt(want * (1 - want) / rows).max(), (got, want)


def test_draw_edges_and_rounding():
    w = jnp.asarray([[0.0, 1.0, 0.0, 3.0], [0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    # u = 1 picks the last positive token; u just above 0 the first one
    np.testing.assert_array_equal(categorical.draw(w, jnp.ones(3)), [3, 2, 3])
    np.testing.assert_array_equal(categorical.draw(w, jnp.full(3, 1e-7)), [1, 2, 0])
    # a target past every cumulative sum (rounding) still lands on a positive token
    big = jnp.asarray([[1.0, 1e-8, 0.0]])
    assert int(categorical.draw(big, jnp.ones(1) * (1 + 1e-6))[0]) in (0, 1)
    # a real vocabulary: one uniform per row, the token follows the cumulative weights
    v = 151_936
    wv = jnp.zeros((2, v)).at[0, 100_000].set(1.0).at[1, 7].set(1.0).at[1, v - 1].set(1.0)
    np.testing.assert_array_equal(categorical.draw(wv, jnp.asarray([0.3, 0.4])), [100_000, 7])
    np.testing.assert_array_equal(categorical.draw(wv, jnp.asarray([0.9, 0.6])), [100_000, v - 1])
