"""What a model family is: a `DecoderConfig` subclass over the one shared decoder.

A family fixes the decoder's variant (q/k/v biases, RoPE scaling, tied head), reads and writes
its HF `config.json`, and names its published shapes (presets). No JAX here: configs are read
before JAX starts (the CLI, `plan`). The registry from HF `model_type` to family is
`r1zero_jax.models.FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (HF `rope_type: "llama3"`): wavelengths above
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those below
    ... / high_freq_factor are kept, and the band between is interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if not self.high_freq_factor > self.low_freq_factor > 0 or self.factor <= 0:
            raise ValueError(f"llama3 rope scaling needs factor > 0 and high_freq_factor > "
                             f"low_freq_factor > 0, got {self}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The shared decoder's shape and variant. Subclasses set `model_type`, `architecture` and
    their defaults (the variant flags: qkv_bias, qk_norm, rope_scaling); `eos_token_ids` are the
    checkpoint's end-of-sequence ids (its config.json and generation_config.json), which the
    sampler stops on."""

    model_type: ClassVar[str] = ""  # HF config.json `model_type`: the registry key
    architecture: ClassVar[str] = ""  # HF `architectures[0]`

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # hidden_size // num_heads when None
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim of each query and key head, before RoPE
    rope_scaling: RopeScaling | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        name = type(self).__name__
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"{name}.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                                 f"num_heads={self.num_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    # -- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        if d.get("model_type") != cls.model_type:
            raise ValueError(f"model_type is {d.get('model_type')!r}; {cls.__name__} reads "
                             f"{cls.model_type!r}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta", rope.get("rope_theta"))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if theta is None:
            missing.append("rope_theta (or rope_parameters.rope_theta)")
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            head_dim=d.get("head_dim"),
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            rope_scaling=_read_rope_scaling(rope),
            eos_token_ids=eos_ids(eos),
            **cls._family_fields(d),
        )

    @classmethod
    def _family_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The family's own fields from config.json (and its refusals of what it cannot run)."""
        return {}

    def _family_hf_fields(self) -> dict[str, Any]:
        return {}

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        scaling = {}
        if self.rope_scaling is not None:
            scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
            rope = {**scaling, "rope_theta": self.rope_theta}
        out = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # transformers 4.x reads this, 5.x the next
            "rope_parameters": rope,
            **({"rope_scaling": scaling} if scaling else {}),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            **self._family_hf_fields(),
            "use_cache": True,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }
        if self.eos_token_ids:
            ids = self.eos_token_ids
            out["eos_token_id"] = ids[0] if len(ids) == 1 else list(ids)
        return out

    # -- presets -----------------------------------------------------------------------------
    PRESETS: ClassVar[dict[str, str]] = {}  # HF-style name -> the classmethod building it

    @classmethod
    def preset(cls, name: str) -> DecoderConfig:
        """By HF-style name ('qwen2.5-math-1.5b') or method name ('qwen2_5_math_1_5b')."""
        method = cls.PRESETS.get(name.lower(), name)
        if method not in cls.PRESETS.values():
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(cls.PRESETS)} "
                             f"(or {sorted(cls.PRESETS.values())})")
        return getattr(cls, method)()


def eos_ids(value) -> tuple[int, ...]:
    """config.json / generation_config.json `eos_token_id` (absent, an int or a list) -> ids."""
    if value is None:
        return ()
    return tuple(int(i) for i in (value if isinstance(value, list) else [value]))


def _read_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise ValueError(f"rope scaling {rope!r} is not supported (only the default RoPE and "
                         "rope_type 'llama3')")
    try:
        return RopeScaling(**{f.name: rope[f.name] for f in dataclasses.fields(RopeScaling)})
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling {rope!r} lacks {e.args[0]}") from None
