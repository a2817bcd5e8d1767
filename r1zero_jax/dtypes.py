"""The dtype names a config or command line may use, and what each means. Imports nothing
heavy: the CLI reads NAMES for its choices."""

from __future__ import annotations

# name -> bytes per element; the CLI's `choices`, config validation and the plan read this.
BYTES = {"float32": 4, "bfloat16": 2}
NAMES = tuple(BYTES)


def check(name: str, what: str = "dtype") -> str:
    if name not in BYTES:
        raise ValueError(f"{what}: expected one of {NAMES}, got {name!r}")
    return name


def numpy_dtype(name: str):
    """The numpy dtype (ml_dtypes' bfloat16, which JAX uses) of a dtype name."""
    import ml_dtypes
    import numpy as np

    check(name)
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
