"""Strict reading of user-given JSONL files (generations, grading input, prompts).

Each bad line is an error naming the file and line: these files are the user's own input, unlike
dataset sources, whose bad rows are skipped and counted (`data.builders`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from r1zero_jax import paths


def read_objects(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-empty line of a local or gs:// JSONL file."""
    try:
        f = paths.open_file(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    with f:
        # Bytes, decoded line by line, so that a bad byte is reported with its line.
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 (byte {raw[e.start]:#04x} at "
                                 f"column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: not a JSON object")
            yield line_no, row


def check_writable(path: str, flag: str = "--output") -> None:
    """Raises ValueError now if `path` (local) cannot be written, rather than after the work
    whose results it was meant to hold. Leaves an existing file's content alone."""
    if paths.is_gcs(path):
        return
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable: {e.strerror}") from None
