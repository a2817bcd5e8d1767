"""Llama 3.x: the shared decoder without biases, with Llama 3's RoPE scaling (3.1 and later)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from r1zero_jax.models.family import DecoderConfig, RopeScaling


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    rope_theta: float = 500_000.0
    rms_norm_eps: float = 1e-5

    @classmethod
    def _family_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        # Llama's attention_bias puts a bias on o_proj too; no Llama 3 checkpoint has either.
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config.json sets {flag}: true; the Llama family here has no "
                                 "biases")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        return {}

    def _family_hf_fields(self) -> dict[str, Any]:
        return {"attention_bias": False, "mlp_bias": False}

    # -- presets (published config.json values) --------------------------------------------
    PRESETS: ClassVar[dict[str, str]] = {
        "llama-3.2-1b": "llama3_2_1b", "llama-3.2-3b": "llama3_2_3b",
        "llama-3.1-8b": "llama3_1_8b",
    }

    @classmethod
    def _llama3(cls, hidden, inter, layers, heads, tie, factor):
        return cls(vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
                   num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=hidden // heads,
                   tie_word_embeddings=tie, max_position_embeddings=131072,
                   rope_scaling=RopeScaling(factor=factor, low_freq_factor=1.0,
                                            high_freq_factor=4.0,
                                            original_max_position_embeddings=8192))

    @classmethod
    def llama3_2_1b(cls):
        return cls._llama3(2048, 8192, 16, 32, True, 32.0)

    @classmethod
    def llama3_2_3b(cls):
        return cls._llama3(3072, 8192, 28, 24, True, 32.0)

    @classmethod
    def llama3_1_8b(cls):
        return cls._llama3(4096, 14336, 32, 32, False, 8.0)
