"""Continuous batching (sampling/continuous.py): every row gets the tokens and log-probs of one big
static call, whatever the slot count and mesh; rollout.generate's two paths agree; the report."""

import numpy as np
import pytest

import jax

from r1zero_jax.models import QwenConfig
from r1zero_jax.models.decoder import init_model
from r1zero_jax.sampling.generation import generate
from r1zero_jax.sampling.continuous import sample_continuous
from r1zero_jax.sampling.sampler import SamplingParams, sample
from r1zero_jax.sharding import make_mesh
from test_sampling import LetterTokenizer

VOCAB = 128
CONFIG = QwenConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, rope_theta=5000.0)


def _prompts(b=5, width=9):
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, VOCAB, (b, width)).astype(np.int32)
    mask = np.ones((b, width), bool)
    mask[1 % b, :4] = mask[3 % b, :2] = mask[4 % b, :7] = False
    return np.where(mask, tokens, 0), mask


class PadTokenizer(LetterTokenizer):
    pad_token_id = 0


def _same(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.finish_reason, b.finish_reason)


def mixed_rows(spec, prompts):
    """A model on `spec` and its rows of varied lengths (stop ids, a stop string, the length
    limit) from one static call: (model, mesh, tokens, mask, params, tokenizer, reference)."""
    mesh = make_mesh(spec, jax.devices()[:1] if spec == "data=1" else None)
    model = init_model(CONFIG, mesh, seed=1)
    tokens, mask = _prompts(prompts)
    params = SamplingParams(max_new_tokens=14, n=3, stop_token_ids=(5, 17, 40, 61),
                            stop_strings=("ab",))
    tok = LetterTokenizer()
    ref = sample(model, tokens, mask, params, seed=3, mesh=mesh, tokenizer=tok)
    return model, mesh, tokens, mask, params, tok, ref


def generation_case():
    """Four prompts on one device for `generate`: (model, tokens, mask, token lists, params,
    keyword arguments)."""
    mesh = make_mesh("data=1", jax.devices()[:1])
    model = init_model(CONFIG, mesh, seed=1)
    tokens, mask = _prompts(b=4)
    prompts = [t[m].tolist() for t, m in zip(tokens, mask, strict=False)]
    params = SamplingParams(max_new_tokens=10, n=2, stop_token_ids=(5, 17, 40, 61))
    return model, tokens, mask, prompts, params, dict(
        tokenizer=PadTokenizer(), mesh=mesh, seed=jax.random.key(7))


@pytest.mark.parametrize("spec,prompts,slot_counts", [
    ("data=1", 5, (4, 15, 21)), ("data=4,tensor=2", 4, (12,)),
    pytest.param("data=4,tensor=2", 4, (4, 16), marks=pytest.mark.slow)])
def test_rows_match_one_static_call_for_any_slot_count(spec, prompts, slot_counts):
    """15 or 12 rows (5 or 4 prompts x 3) of varied lengths (stop ids, a stop string, the length
    limit): fewer, as many and more slots than rows give the static call's rows exactly; slots
    reused many times must reset their stop-string state and cache."""
    model, mesh, tokens, mask, params, tok, ref = mixed_rows(spec, prompts)
    lengths = set(ref.lengths.tolist())
    assert len(lengths) >= 3 and max(lengths) == 14 and "stop" in ref.finish_reason  # a mix
    for slots in slot_counts:
        out = sample_continuous(model, tokens, mask, params, seed=3, mesh=mesh, slots=slots,
                                tokenizer=tok)
        _same(out, ref)
        assert out.texts == ref.texts
        assert out.timings["slots"] == slots
        # every slot busy until the rows run out: at most one row-length of tail
        assert out.timings["decode_steps"] <= -(-ref.lengths.sum() // slots) + 14 + 1


def test_rollout_generate_static_calls_and_continuous_agree(monkeypatch):
    """The generation path: static calls of 2 prompts (rows keyed by their rollout index; one
    big call is the test above) and continuous batching with 3 slots give the same Rollout; the
    report's figures are the hand-computed ones."""
    model, tokens, mask, prompts, params, kw = generation_case()
    split = generate(model, prompts, params, prompts_per_call=2, **kw)
    cont = generate(model, prompts, params, decode_slots=3, **kw)
    np.testing.assert_array_equal(cont.tokens, split.tokens)
    np.testing.assert_allclose(cont.logprobs, split.logprobs, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(cont.lengths, split.lengths)
    assert cont.texts == split.texts
    total = int(split.lengths.sum())
    longest = [split.lengths[i:i + 4].max() for i in (0, 4)]  # per static call of 2 prompts
    assert split.report["generated_tokens"] == cont.report["generated_tokens"] == total
    assert split.report["decode_steps"] == sum(longest)
    assert split.report["slot_utilization"] == pytest.approx(total / (4 * sum(longest)))
    # 3 slots stay busy until the last row starts: under 10 decode steps of drain
    assert total / 3 <= cont.report["decode_steps"] < total / 3 + 10
    assert cont.report["slot_utilization"] == pytest.approx(
        total / (3 * cont.report["decode_steps"]))
    assert cont.report["tokens_per_s"] > 0
    # Progress from inside the loop (every 4 steps here): the same rollout, finished rows and
    # tokens growing to all
    from r1zero_jax.sampling import continuous

    monkeypatch.setattr(continuous, "PROGRESS_EVERY", 4)
    seen = []
    again = generate(model, prompts, params, decode_slots=3, **kw,
                     on_progress=lambda rows, tokens: seen.append((rows, tokens)))
    np.testing.assert_array_equal(again.tokens, cont.tokens)
    assert len(seen) >= cont.report["decode_steps"] // 4 and seen == sorted(seen)
    assert seen[0][0] < 8 and seen[-1] == (8, total)
    with pytest.raises(ValueError, match="decode slots must be >= 1"):
        sample_continuous(model, tokens, mask, params, seed=0, mesh=kw["mesh"], slots=0)
