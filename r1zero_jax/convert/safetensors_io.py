"""Tensor-by-tensor safetensors reading (memory-mapped) and writing, bf16 included.

The format is an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then raw little-endian bytes. Reading through np.memmap
keeps peak host memory near one tensor, and needs neither torch nor an accelerator.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsFile:
    """Lazy reader: `names()`, `shape(name)`, `get(name)` -> a read-only memory-mapped array."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > os.path.getsize(path):
                    raise ValueError("header length beyond end of file")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a valid safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._header, self._data_start = header, 8 + n

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> str:
        """The header's dtype name ("F32", "BF16", "I32", ...)."""
        return self._header[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor {name} byte size does not match its "
                             f"shape {shape}")
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start,
                         shape=shape)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write `tensors` (name -> array) in the safetensors format, in name order."""
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    write_safetensors_streamed(path, {n: (a.shape, a.dtype) for n, a in arrays.items()},
                               arrays.__getitem__, metadata)


def write_safetensors_streamed(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                               produce: Callable[[str], np.ndarray],
                               metadata: dict | None = None) -> None:
    """Write tensors known by (shape, dtype) ahead, each made by `produce(name)` only when its
    turn comes and dropped after: one tensor in memory at a time."""
    header, offset = {}, 0
    for name in sorted(specs):
        shape, dtype = tuple(specs[name][0]), np.dtype(specs[name][1])
        if dtype not in _NAMES:
            raise ValueError(f"cannot write {name}: dtype {dtype} has no safetensors name")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(specs):
            a = np.ascontiguousarray(produce(name))
            want = header[name]
            if list(a.shape) != want["shape"] or _NAMES.get(a.dtype) != want["dtype"]:
                raise ValueError(f"{name}: produced {a.dtype}{list(a.shape)}, declared "
                                 f"{want['dtype']}{want['shape']}")
            f.write(a.reshape(-1).view(np.uint8).data)
