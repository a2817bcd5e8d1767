"""Model families by HF `model_type`, and the one place a model config is built.

Every family is a `DecoderConfig` subclass run by the one decoder (`models/decoder.py`); adding
one is a subclass and a line in FAMILIES (see docs/architecture.md). No JAX imported here.
"""

from __future__ import annotations

from typing import Any

from r1zero_jax.models.family import DecoderConfig, RopeScaling, eos_ids
from r1zero_jax.models.llama import LlamaConfig
from r1zero_jax.models.qwen import Qwen3Config, QwenConfig

FAMILIES: dict[str, type[DecoderConfig]] = {
    c.model_type: c for c in (QwenConfig, Qwen3Config, LlamaConfig)}

__all__ = ["FAMILIES", "DecoderConfig", "LlamaConfig", "Qwen3Config", "QwenConfig", "RopeScaling",
           "config_from_hf", "config_from_run", "eos_ids", "family_for", "preset", "preset_names",
           "vocab_for_tokenizer"]


def family_for(model_type: str | None) -> type[DecoderConfig]:
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf(d: dict[str, Any]) -> DecoderConfig:
    """A family config from an HF config.json dict (or our checkpoint's copy of one)."""
    return family_for(d.get("model_type")).from_hf_dict(d)


def preset_names() -> list[str]:
    return sorted(name for family in FAMILIES.values() for name in family.PRESETS)


def preset(name: str) -> DecoderConfig:
    """A published shape by HF-style name ('llama-3.2-3b') or method name ('llama3_2_3b')."""
    for family in FAMILIES.values():
        if name.lower() in family.PRESETS or name in family.PRESETS.values():
            return family.preset(name)
    raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()} or 'custom'")


def vocab_for_tokenizer(size: int) -> int:
    """A custom model's vocabulary for a tokenizer of `size` tokens: rounded up to 64, so the
    vocab dimension shards evenly."""
    return -(-size // 64) * 64


def config_from_run(m, tokenizer_size: int | None = None) -> DecoderConfig:
    """The architecture a RunConfig's `model` section names (weights at `m.path` are not read).
    `tokenizer_size` sets a custom model's vocabulary when `m.vocab_size` is 0."""
    if m.preset != "custom":
        return preset(m.preset)
    vocab = m.vocab_size
    if not vocab:
        if tokenizer_size is None:
            raise ValueError("model.vocab_size=0 takes the tokenizer's size; none was given")
        vocab = vocab_for_tokenizer(tokenizer_size)
    return family_for(m.family)(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim, rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_word_embeddings,
        max_position_embeddings=m.max_position_embeddings)
