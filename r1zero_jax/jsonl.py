"""Strict reading of user-given JSONL files (generations, grading input, prompts).

Each bad line is an error naming the file and line: these files are the user's own input, unlike
dataset sources, whose bad rows are skipped and counted (`data.builders`).
"""

from __future__ import annotations

import json
from typing import Iterator

from r1zero_jax import paths


def read_objects(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-empty line of a local or gs:// JSONL file."""
    try:
        f = paths.open_file(path, "r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: not a JSON object")
            yield line_no, row
