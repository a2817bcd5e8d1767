"""Qwen2 port: logit parity with transformers, sharding on the 8-device mesh, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1zero_jax.convert.hf import load_model
from r1zero_jax.models import QwenConfig
from r1zero_jax.models.decoder import KVCache, init_model, num_params, positions_from_mask
from r1zero_jax.sharding import LOGICAL_RULES, logical_to_spec, make_mesh
from hf_models import hf_logits, left_padded_batch, make_hf_model


def _forward(model, tokens, mask):
    pos = positions_from_mask(jnp.asarray(mask))
    logits, _ = model(jnp.asarray(tokens), pos, jnp.asarray(mask))
    return np.asarray(logits), np.asarray(pos)


@pytest.mark.parametrize("tie,heads,kv_heads,theta,eps", [
    (False, 4, 4, 5000.0, 1e-5),   # GQA ratio 1
    (True, 4, 2, 1e6, 1e-6),       # ratio 2, tied head
    (False, 8, 2, 123.0, 3e-4),    # ratio 4
])
def test_logits_match_transformers(tmp_path, tie, heads, kv_heads, theta, eps):
    hf = make_hf_model(tmp_path, heads=heads, kv_heads=kv_heads, theta=theta, eps=eps, tie=tie)
    model, cfg, _ = load_model(str(tmp_path), make_mesh("data=1", jax.devices()[:1]))
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (
        kv_heads, theta, eps, tie)
    for lengths in ([7, 7], [7, 3, 5, 1]):  # without and with left padding
        tokens, mask = left_padded_batch(cfg.vocab_size, lengths)
        ours, pos = _forward(model, tokens, mask)
        ref = hf_logits(hf, tokens, mask, pos)
        assert np.abs(ours - ref)[mask].max() <= 1e-4


def test_left_padding_does_not_change_a_row(tmp_path):
    make_hf_model(tmp_path)
    model, cfg, _ = load_model(str(tmp_path), make_mesh("data=1", jax.devices()[:1]))
    tokens, mask = left_padded_batch(cfg.vocab_size, [6, 3])
    padded, _ = _forward(model, tokens, mask)
    alone, _ = _forward(model, tokens[1:, 3:], mask[1:, 3:])
    np.testing.assert_allclose(padded[1, 3:], alone[0], atol=1e-5)


def test_cached_decode_equals_full_forward(tmp_path):
    make_hf_model(tmp_path, heads=4, kv_heads=2)
    model, cfg, _ = load_model(str(tmp_path), make_mesh("data=1", jax.devices()[:1]))
    tokens, mask = left_padded_batch(cfg.vocab_size, [9, 4])
    full, pos = _forward(model, tokens, mask)
    cache = KVCache.init(cfg, 2, 12)
    steps, t0 = [], 5
    logits, cache = model(jnp.asarray(tokens[:, :t0]), jnp.asarray(pos[:, :t0]),
                          jnp.asarray(mask[:, :t0]), cache)
    steps.append(np.asarray(logits))
    for t in range(t0, tokens.shape[1]):
        logits, cache = model(jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]),
                              jnp.asarray(mask[:, t:t + 1]), cache)
        steps.append(np.asarray(logits))
    assert int(cache.index) == tokens.shape[1]
    np.testing.assert_allclose(np.concatenate(steps, 1)[mask], full[mask], atol=1e-4)


@pytest.mark.parametrize("spec", ["data=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"])
def test_sharded_forward_equals_single_device(tmp_path_factory, spec):
    path = tmp_path_factory.getbasetemp() / "sharded_src"
    if not (path / "config.json").exists():
        make_hf_model(path, hidden=64, inter=96, heads=4, kv_heads=2, vocab=128)
    tokens, mask = left_padded_batch(128, [8, 5, 8, 2, 7, 8, 3, 6])
    single, _, _ = load_model(str(path), make_mesh("data=1", jax.devices()[:1]))
    ref, _ = _forward(single, tokens, mask)

    mesh = make_mesh(spec)
    model, _, _ = load_model(str(path), mesh)
    # The params carry exactly the shardings of the logical-axis table.
    attn = model.layers[0].attn
    assert attn.q_kernel[...].sharding.spec == logical_to_spec(("embed", "heads", "head_dim"))
    assert attn.k_kernel[...].sharding.spec == logical_to_spec(("embed", "kv_heads", "head_dim"))
    assert model.layers[1].mlp.down_kernel[...].sharding.spec == logical_to_spec(("mlp", "embed"))
    assert model.embed[...].sharding.spec == logical_to_spec(("vocab", "vocab_embed"))
    assert model.embed[...].sharding.mesh.shape == mesh.shape
    if mesh.shape["tensor"] > 1:  # really split, not replicated
        shard = model.layers[0].mlp.gate_kernel[...].addressable_shards[0].data
        assert shard.shape[1] == 96 // mesh.shape["tensor"]
    ours, _ = _forward(model, tokens, mask)
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-5)


def test_init_model_is_sharded_and_deterministic():
    cfg = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2)
    mesh = make_mesh("fsdp=4,tensor=2")
    a = init_model(cfg, mesh, seed=3)
    b = init_model(cfg, make_mesh("data=1", jax.devices()[:1]), seed=3)
    assert a.embed[...].sharding.spec == jax.sharding.PartitionSpec(
        LOGICAL_RULES["vocab"], LOGICAL_RULES["vocab_embed"])
    np.testing.assert_array_equal(np.asarray(a.embed[...]), np.asarray(b.embed[...]))


@pytest.mark.parametrize("preset,expected", [
    ("qwen2_5_math_7b", 7_615_616_512),
    ("qwen2_5_math_1_5b", 1_543_714_304),
    ("qwen2_5_0_5b", 494_032_768),
    ("qwen2_5_1_5b", 1_543_714_304),
    ("qwen2_5_3b", 3_085_938_688),
    ("qwen2_5_7b", 7_615_616_512),
    ("qwen2_5_14b", 14_770_033_664),
    ("qwen2_5_32b", 32_763_876_352),
    ("qwen2_5_72b", 72_706_203_648),
])
def test_preset_parameter_counts(preset, expected):
    assert num_params(getattr(QwenConfig, preset)()) == expected


def test_mesh_that_does_not_fit_is_refused():
    cfg = QwenConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=1,
                     num_heads=6, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"kv_heads=2 is not divisible by 4"):
        init_model(cfg, make_mesh("data=2,tensor=4"), seed=0)
    with pytest.raises(ValueError, match=r"needs 12 devices, but 8 are available"):
        make_mesh("data=3,tensor=4")
    with pytest.raises(ValueError, match=r"8 devices are not divisible by the fixed axes' 3"):
        make_mesh("data=-1,tensor=3")
    with pytest.raises(ValueError, match=r"unknown axis 'batch'"):
        make_mesh("batch=8")
    with pytest.raises(ValueError, match=r"AXIS=SIZE"):
        make_mesh("data")


def test_hf_config_forms_and_errors():
    base = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    assert QwenConfig.from_hf_dict({**base, "rope_theta": 7.0}).rope_theta == 7.0
    assert QwenConfig.from_hf_dict(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 9.0}}).rope_theta == 9.0
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        QwenConfig.from_hf_dict({**base, "model_type": "llama", "rope_theta": 1.0})
    with pytest.raises(ValueError, match="lacks hidden_size"):
        QwenConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"}
                                | {"rope_theta": 1.0})


def test_preset_by_either_name():
    assert QwenConfig.preset("Qwen2.5-Math-7B") == QwenConfig.preset("qwen2_5_math_7b")
    assert QwenConfig.preset("qwen2_5_math_7b").rope_theta == 10000.0
    with pytest.raises(ValueError, match="unknown model preset 'qwen3'"):
        QwenConfig.preset("qwen3")
