"""Model families: Llama 3.x through the shared decoder with the parity tests Qwen2 has (logits
and RoPE vs transformers, cache vs full forward, sharded, convert both ways), presets, the
model_type registry, and the checkpoint's stop ids."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1zero_jax import cli, models
from r1zero_jax.config import ModelConfig
from r1zero_jax.convert import hf as conv
from r1zero_jax.models import LlamaConfig, QwenConfig
from r1zero_jax.models.decoder import (KVCache, check_mesh_fits, num_params, positions_from_mask,
                                       rope_frequencies)
from r1zero_jax.sampling.sampler import SamplingParams, sample
from r1zero_jax.sharding import logical_to_spec, make_mesh
from hf_models import hf_logits, left_padded_batch, make_hf_model

# head_dim 8, theta 1e4: wavelengths 6.3, 63, 628 and 6283 positions fall in Llama 3's kept
# (< 128/4), interpolated and stretched (> 128/1) bands.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
# meta-llama/Llama-3.2-3B config.json (transformers 4.45 form), as published.
LLAMA_3_2_3B_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 24, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}


def _llama(path, family="llama", **kw):
    """A tiny Llama with Llama 3's RoPE scaling, or a tiny Qwen3 (qk-norm, default RoPE)."""
    scaling = LLAMA3_ROPE if family == "llama" else None
    return make_hf_model(path, family=family, theta=10000.0, rope_scaling=scaling, **kw)


def _mesh1():
    return make_mesh("data=1", jax.devices()[:1])


@nnx.jit
def _call(model, tokens, positions, mask, cache=None):
    return model(tokens, positions, mask, cache)  # compiled: op by op takes seconds


def _forward(model, tokens, mask):
    pos = positions_from_mask(jnp.asarray(mask))
    logits, _ = _call(model, jnp.asarray(tokens), pos, jnp.asarray(mask))
    return np.asarray(logits), np.asarray(pos)


@pytest.mark.parametrize("head_dim,theta,rope", [
    (8, 1e4, LLAMA3_ROPE),
    (128, 5e5, LLAMA_3_2_3B_JSON["rope_scaling"]),
    (64, 1e6, None),
])
def test_rope_frequencies_match_transformers(head_dim, theta, rope):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFLlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                       rope_theta=theta, **({"rope_scaling": rope} if rope else {}))
    if rope:
        want, factor = ROPE_INIT_FUNCTIONS["llama3"](hf)
        assert factor == 1.0  # llama3 scales no attention
    else:
        want = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    scaling = models.family._read_rope_scaling(rope or {})
    ours = np.asarray(rope_frequencies(head_dim, theta, scaling))
    np.testing.assert_allclose(ours, np.asarray(want), rtol=1e-6)
    if rope:  # all three bands occur, so a wrong band rule shows
        plain = np.asarray(rope_frequencies(head_dim, theta))
        assert (ours == plain).any() and (ours == plain / rope["factor"]).any()
        assert ((ours != plain) & (ours != plain / rope["factor"])).any()


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("qwen3", False)])
def test_llama_logits_match_transformers(tmp_path, family, tie):
    """Llama 3.2 (tied head) and 3.1 shapes; Qwen3 for the qk-norm option."""
    hf = _llama(tmp_path, family, tie=tie, heads=4, kv_heads=2)
    model, cfg, _ = conv.load_model(str(tmp_path), _mesh1())
    assert type(cfg) is models.FAMILIES[family] and cfg.tie_word_embeddings == tie
    assert not cfg.qkv_bias and not hasattr(model.layers[0].attn, "q_bias")
    assert cfg.qk_norm == hasattr(model.layers[0].attn, "q_norm") == (family == "qwen3")
    assert (cfg.rope_scaling is not None) == (family == "llama")
    for lengths in ([12, 12], [12, 5, 9, 1]):  # without and with left padding
        tokens, mask = left_padded_batch(cfg.vocab_size, lengths)
        ours, pos = _forward(model, tokens, mask)
        assert np.abs(ours - hf_logits(hf, tokens, mask, pos))[mask].max() <= 1e-4


def test_llama_cached_decode_and_sharded_forward(tmp_path):
    _llama(tmp_path, hidden=64, inter=96, heads=4, kv_heads=2, vocab=128)
    model, cfg, _ = conv.load_model(str(tmp_path), _mesh1())
    tokens, mask = left_padded_batch(cfg.vocab_size, [9, 4, 9, 2, 7, 9, 3, 6])
    full, pos = _forward(model, tokens, mask)
    cache = KVCache.init(cfg, 8, 12)
    logits, cache = _call(model, jnp.asarray(tokens[:, :5]), jnp.asarray(pos[:, :5]),
                          jnp.asarray(mask[:, :5]), cache)
    steps = [np.asarray(logits)]
    for t in range(5, tokens.shape[1]):
        logits, cache = _call(model, jnp.asarray(tokens[:, t:t + 1]),
                              jnp.asarray(pos[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, 1)[mask], full[mask], atol=1e-4)

    mesh = make_mesh("fsdp=4,tensor=2")
    sharded, _, _ = conv.load_model(str(tmp_path), mesh)
    attn = sharded.layers[0].attn
    assert attn.k_kernel[...].sharding.spec == logical_to_spec(("embed", "kv_heads", "head_dim"))
    assert sharded.embed[...].sharding.spec == logical_to_spec(("vocab", "vocab_embed"))
    np.testing.assert_allclose(_forward(sharded, tokens, mask)[0][mask], full[mask], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_llama_converts_both_ways_bit_identical(tmp_path, family):
    from transformers import AutoModelForCausalLM

    src, ours, back = tmp_path / "src", tmp_path / "ours", tmp_path / "back"
    _llama(src, family, tie=True)
    assert cli.main(["convert", "from-hf", str(src), str(ours)]) == 0
    assert cli.main(["convert", "to-hf", str(ours), str(back), "--dtype", "float32"]) == 0
    a, b = (conv._hf_tensor_files(str(p)) for p in (src, back))
    assert set(a) == set(b) and not any(n.endswith(".bias") for n in b)
    for name in a:
        np.testing.assert_array_equal(a[name].get(name), b[name].get(name), err_msg=name)
    assert ("model.layers.1.self_attn.k_norm.weight" in b) == (family == "qwen3")
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == family
    assert config["architectures"] == [{"llama": "LlamaForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM"}[family]]
    if family == "llama":
        assert config["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 10000.0}
    ref, loaded = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (src, back))
    tokens, mask = left_padded_batch(96, [6, 3])
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    np.testing.assert_array_equal(hf_logits(ref, tokens, mask, pos),
                                  hf_logits(loaded, tokens, mask, pos))


@pytest.mark.parametrize("name,expected", [
    ("llama-3.2-3b", 3_212_749_824),
    ("llama-3.1-8b", 8_030_261_248),
])
def test_llama_presets(name, expected):
    cfg = models.preset(name)
    assert num_params(cfg) == expected  # the published parameter counts
    check_mesh_fits(cfg, make_mesh("fsdp=4,tensor=2"))
    check_mesh_fits(cfg, make_mesh("tensor=8"))


def test_hf_config_json_to_family_and_back():
    cfg = models.config_from_hf(LLAMA_3_2_3B_JSON)
    assert cfg == dataclasses.replace(LlamaConfig.preset("llama-3.2-3b"), eos_token_ids=(128001,))
    assert models.config_from_hf(cfg.to_hf_dict()) == cfg  # transformers 5 form
    assert models.preset("Llama-3.2-3B") == models.preset("llama3_2_3b")
    assert type(models.config_from_hf(QwenConfig.qwen2_5_0_5b().to_hf_dict())) is QwenConfig
    with pytest.raises(ValueError, match="unknown model_type 'mistral'; supported: llama, qwen2"):
        models.config_from_hf({**LLAMA_3_2_3B_JSON, "model_type": "mistral"})
    with pytest.raises(ValueError, match="sets attention_bias: true"):
        models.config_from_hf({**LLAMA_3_2_3B_JSON, "attention_bias": True})
    with pytest.raises(ValueError, match="only the default RoPE and rope_type 'llama3'"):
        models.config_from_hf({**LLAMA_3_2_3B_JSON, "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="lacks original_max_position_embeddings"):
        models.config_from_hf({**LLAMA_3_2_3B_JSON, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0}})
    with pytest.raises(ValueError, match="unknown model preset 'llama-4'"):
        models.preset("llama-4")
    custom = models.config_from_run(ModelConfig(preset="custom", family="llama"), 100)
    assert type(custom) is LlamaConfig and custom.vocab_size == 128 and not custom.qkv_bias


def test_sampler_stops_on_the_checkpoint_eos_ids(tmp_path):
    """generation_config.json's eos ids join config.json's; the sampler stops on them."""
    _llama(tmp_path, eos=90)
    tokens, mask = left_padded_batch(96, [5, 3])
    free, _, _ = conv.load_model(str(tmp_path), _mesh1())
    greedy = sample(free, tokens, mask, SamplingParams(max_new_tokens=6, temperature=0.0),
                    seed=0, mesh=_mesh1())
    stop = int(greedy.tokens[0, 2])
    assert stop not in greedy.tokens[0, :2] and 90 not in greedy.tokens[0, :3]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [90, stop]}))
    model, cfg, _ = conv.load_model(str(tmp_path), _mesh1())
    assert cfg.eos_token_ids == (90, stop)
    ro = sample(model, tokens, mask, SamplingParams(max_new_tokens=6, temperature=0.0), seed=0,
                mesh=_mesh1())
    assert ro.lengths[0] == 3 and ro.finish_reason[0] == "stop"
    np.testing.assert_array_equal(ro.tokens[0, :3], greedy.tokens[0, :3])


def test_run_config_names_a_family_and_preset_that_exist():
    from r1zero_jax.config import load_config

    cfg = load_config("cpu_smoke", ["model.family=llama"])
    assert type(models.config_from_run(cfg.model, 30)) is LlamaConfig  # cpu_smoke is custom
    with pytest.raises(ValueError, match="model.family: unknown model_type 'gpt2'"):
        load_config("cpu_smoke", ["model.family=gpt2"])
    with pytest.raises(ValueError, match="model.preset: unknown model preset 'llama-4'"):
        load_config("cpu_smoke", ["model.preset=llama-4"])
    assert load_config("cpu_smoke", ["model.preset=llama-3.2-3b"]).model.preset == "llama-3.2-3b"


def test_prompts_start_with_the_tokenizers_bos():
    """A Llama 3 tokenizer prepends <|begin_of_text|> (its post-processor); prompts keep it."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from r1zero_jax.data.pipeline import make_encoder

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "one": 2, "plus": 3, "two": 4}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="<|end_of_text|>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>",
                                  eos_token="<|end_of_text|>")
    assert make_encoder(tok)(["one plus two", "two"]) == [[0, 2, 3, 4], [0, 4]]
