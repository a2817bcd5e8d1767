"""r1zero-jax: Dr. GRPO for Qwen2.5 math models in JAX."""

__version__ = "0.1.0"
