"""Qwen2 / Qwen2.5: the shared decoder with q/k/v biases; Qwen3: with per-head q/k norms."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from r1zero_jax.models.family import DecoderConfig


@dataclasses.dataclass(frozen=True)
class QwenConfig(DecoderConfig):
    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    qkv_bias: bool = True

    def _family_hf_fields(self) -> dict[str, Any]:
        return {"use_sliding_window": False}

    # -- presets (published config.json values) --------------------------------------------
    PRESETS: ClassVar[dict[str, str]] = {
        "qwen2.5-0.5b": "qwen2_5_0_5b", "qwen2.5-1.5b": "qwen2_5_1_5b", "qwen2.5-3b": "qwen2_5_3b",
        "qwen2.5-7b": "qwen2_5_7b", "qwen2.5-14b": "qwen2_5_14b", "qwen2.5-32b": "qwen2_5_32b",
        "qwen2.5-72b": "qwen2_5_72b", "qwen2.5-math-1.5b": "qwen2_5_math_1_5b",
        "qwen2.5-math-7b": "qwen2_5_math_7b",
    }

    @classmethod
    def _qwen(cls, hidden, inter, layers, heads, kv, tie, vocab=151936, eps=1e-6, theta=1e6,
              max_pos=32768):
        return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                   num_heads=heads, num_kv_heads=kv, rope_theta=theta, rms_norm_eps=eps,
                   tie_word_embeddings=tie, max_position_embeddings=max_pos)

    @classmethod
    def qwen2_5_0_5b(cls):
        return cls._qwen(896, 4864, 24, 14, 2, True)

    @classmethod
    def qwen2_5_1_5b(cls):
        return cls._qwen(1536, 8960, 28, 12, 2, True, max_pos=131072)

    @classmethod
    def qwen2_5_3b(cls):
        return cls._qwen(2048, 11008, 36, 16, 2, True)

    @classmethod
    def qwen2_5_7b(cls):
        return cls._qwen(3584, 18944, 28, 28, 4, False, vocab=152064, max_pos=131072)

    @classmethod
    def qwen2_5_14b(cls):
        return cls._qwen(5120, 13824, 48, 40, 8, False, vocab=152064, eps=1e-5, max_pos=131072)

    @classmethod
    def qwen2_5_32b(cls):
        return cls._qwen(5120, 27648, 64, 40, 8, False, vocab=152064, eps=1e-5, max_pos=131072)

    @classmethod
    def qwen2_5_72b(cls):
        return cls._qwen(8192, 29568, 80, 64, 8, False, vocab=152064, eps=1e-5, max_pos=131072)

    @classmethod
    def qwen2_5_math_1_5b(cls):
        return cls._qwen(1536, 8960, 28, 12, 2, True, theta=10000.0, max_pos=4096)

    @classmethod
    def qwen2_5_math_7b(cls):
        return cls._qwen(3584, 18944, 28, 28, 4, False, vocab=152064, theta=10000.0, max_pos=4096)


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"
    qk_norm: bool = True

    @classmethod
    def _family_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("attention_bias"):  # a bias on o_proj too, which the decoder lacks
            raise ValueError("config.json sets attention_bias: true; not supported for qwen3")
        if d.get("use_sliding_window"):
            raise ValueError("config.json sets use_sliding_window: true; sliding-window "
                             "attention is not supported")
        return {}

    def _family_hf_fields(self) -> dict[str, Any]:
        return {"attention_bias": False, "use_sliding_window": False}
