"""Datasets (TFDS builders, no TensorFlow needed) and the prompt pipeline."""

from r1zero_jax.data.builders import BENCHMARKS, TRAIN_SETS, load_split, prepare
from r1zero_jax.data.pipeline import PipelineConfig, PromptPipeline, left_pad

__all__ = ["BENCHMARKS", "TRAIN_SETS", "load_split", "prepare", "PipelineConfig",
           "PromptPipeline", "left_pad"]
