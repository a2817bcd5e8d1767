"""Rows of a data source by name (DataConfig.source): the built-in synthetic task, a JSONL file,
or a TFDS dataset of `data.builders`."""

from __future__ import annotations

import numpy as np


def load_rows(source: str, data_dir: str = "", *, split: str = "train", size: int = 0,
              seed: int = 0) -> list[dict]:
    """Rows {problem, answer}; `size` > 0 keeps a random `size` of them (seeded)."""
    if source == "synthetic":
        from r1zero_jax.data.synthetic import SyntheticTask

        return SyntheticTask().rows(split, size or None, seed)
    if source.startswith("jsonl:"):
        from r1zero_jax.data.builders import read_jsonl_rows

        rows = read_jsonl_rows(source[len("jsonl:"):])  # bad rows skipped and counted
    else:
        from r1zero_jax.data.builders import load_split

        rows = load_split(source, data_dir or None)
    if size:
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:size]]
    return rows
