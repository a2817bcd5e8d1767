"""TFDS builders for the paper's training sets and evaluation suite, usable without TensorFlow.

Each dataset is an array_record TFDS dataset with two text features: `problem`, and `answer`
holding the reference answer as JSON, so a list of accepted answers stays a list and AMC's float
answers (142.0) come back as the same float. Rows keep their source order.

Sources: in the real world each builder downloads the paper authors' release (Hugging Face
`save_to_disk` Arrow files in github.com/sail-sg/understand-r1-zero; GSM8K from OpenAI's
grade-school-math repository); TFDS checks the downloads against `checksums.tsv` next to this file
once it is recorded (`prepare(..., register_checksums=True)` on a machine with internet).
Offline, each builds from a local directory holding `<name>.jsonl` (rows with `problem` and
`answer`), directly or under `evaluation_suite/` or `train/`, like `../shared/data`.

Build with one process per data_dir: TFDS writes into a temporary folder and renames it, but two
processes building the same dataset at once race.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils.py_utils import classproperty

log = logging.getLogger(__name__)

BENCHMARKS = ("aime24", "amc23", "math500", "minerva_math", "olympiad_bench")
TRAIN_SETS = ("math_lvl3to5_8k", "gsm8k")

_PAPER_REPO = "https://github.com/sail-sg/understand-r1-zero/raw/main/datasets"
_GSM8K_REPO = (
    "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
)
_ARROW = "data-00000-of-00001.arrow"

# name -> (split, download URLs, source format, row count in the paper's release)
SOURCES: dict[str, tuple[str, tuple[str, ...], str, int]] = {
    "math_lvl3to5_8k": (
        "train", (f"{_PAPER_REPO}/train/math_lvl3to5_8k/train/{_ARROW}",), "hf_arrow", 8523),
    "gsm8k": ("train", (f"{_GSM8K_REPO}/train.jsonl", f"{_GSM8K_REPO}/test.jsonl"), "gsm8k", 8792),
    "aime24": ("test", (f"{_PAPER_REPO}/evaluation_suite/aime/{_ARROW}",), "hf_arrow", 30),
    "amc23": ("test", (f"{_PAPER_REPO}/evaluation_suite/amc/{_ARROW}",), "hf_arrow", 83),
    "math500": ("test", (f"{_PAPER_REPO}/evaluation_suite/math/{_ARROW}",), "hf_arrow", 500),
    "minerva_math": (
        "test", (f"{_PAPER_REPO}/evaluation_suite/minerva/{_ARROW}",), "hf_arrow", 272),
    "olympiad_bench": (
        "test", (f"{_PAPER_REPO}/evaluation_suite/olympiad_bench/{_ARROW}",), "hf_arrow", 675),
}

_LOCAL_SUBDIRS = ("", "evaluation_suite", "train")
_MAX_REASONS_LOGGED = 5


def validate_row(row: Any) -> str | None:
    """Why `row` is not a usable {problem, answer} row, or None when it is."""
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    problem, answer = row.get("problem"), row.get("answer")
    if not isinstance(problem, str) or not problem.strip():
        return "missing or empty 'problem' string"
    if answer is None:
        return "missing 'answer'"
    answers = answer if isinstance(answer, list) else [answer]
    if not answers:
        return "empty 'answer' list"
    for a in answers:
        # bool is an int subclass, and a true/false reference answer is a data error.
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            return f"'answer' of type {type(a).__name__} (want string, number or a list of them)"
        if isinstance(a, float) and not math.isfinite(a):
            return f"'answer' {a} is not a finite number"
    return None


def clean_rows(rows: Iterator[Any], source: str, counts: dict | None = None) -> Iterator[dict]:
    """Yields the valid {problem, answer} rows; logs how many were skipped, and why, and puts
    `kept` / `skipped` into `counts` once done."""
    kept, reasons = 0, []
    for i, row in enumerate(rows):
        why = row if isinstance(row, _BadLine) else validate_row(row)
        if why is None:
            kept += 1
            yield {"problem": row["problem"], "answer": row["answer"]}
        else:
            reasons.append(f"row {i + 1}: {why}")
    if reasons:
        shown = "; ".join(reasons[:_MAX_REASONS_LOGGED])
        more = len(reasons) - _MAX_REASONS_LOGGED
        log.warning("%s: skipped %d bad rows, kept %d: %s%s", source, len(reasons), kept,
                    shown, f" (and {more} more)" if more > 0 else "")
    if counts is not None:
        counts.update(kept=kept, skipped=len(reasons))


class _BadLine(str):
    """Why a source line is unusable (bad JSON, no GSM8K '####'), carried to `clean_rows`."""


def read_jsonl(path: str) -> Iterator[Any]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield _BadLine(f"invalid JSON ({e.msg})")


def read_jsonl_rows(path: str) -> list[dict]:
    """The valid {problem, answer} rows of a JSONL file; bad rows are skipped and logged."""
    return list(clean_rows(read_jsonl(path), path))


def read_hf_arrow(path: str) -> Iterator[dict]:
    """Rows of a Hugging Face `save_to_disk` Arrow file (an Arrow IPC stream)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    missing = {"problem", "answer"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)} among {table.column_names}")
    yield from table.select(["problem", "answer"]).to_pylist()


def read_gsm8k(path: str) -> Iterator[Any]:
    """GSM8K rows: the final answer follows '####' in the worked solution, kept as written."""
    for row in read_jsonl(path):
        solution = row.get("answer") if isinstance(row, dict) else None
        if isinstance(solution, str) and "####" in solution:
            yield {"problem": row.get("question"), "answer": solution.split("####")[-1].strip()}
        else:
            yield row if isinstance(row, _BadLine) else _BadLine("no 'question' / '#### answer'")


_READERS = {"hf_arrow": read_hf_arrow, "gsm8k": read_gsm8k}


def find_local_file(source_dir: str, name: str) -> str:
    """`<name>.jsonl` in `source_dir` or its `evaluation_suite/` or `train/` folders."""
    tried = [os.path.join(source_dir, sub, f"{name}.jsonl") for sub in _LOCAL_SUBDIRS]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no source file for {name!r}; looked for: {', '.join(tried)}")


class MathBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: rows {problem: text, answer: JSON text}, source order kept."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "problem + JSON answer, from the paper's release or local JSONL."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: a directory holding <name>.jsonl (rows with 'problem' and 'answer'), directly "
        "or under evaluation_suite/ or train/; without it the builder downloads its source."
    )

    # TFDS's own lookup (for checksums.tsv) imports `importlib_resources`, which TFDS installs
    # only for Python < 3.9, and so fails for a builder inside a package.
    @classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        split, urls, _, count = SOURCES[self.name]
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.name}: {count} problems ({split}) in the paper's release.",
            features=tfds.features.FeaturesDict(
                {"problem": tfds.features.Text(), "answer": tfds.features.Text()}
            ),
            homepage=urls[0],
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        split, urls, fmt, _ = SOURCES[self.name]
        try:
            local_dir = str(dl_manager.manual_dir)
        except AssertionError:  # no manual dir given, or it is empty: download instead
            local_dir = None
        if local_dir is not None:
            path = find_local_file(local_dir, self.name)
            raw = read_jsonl(path)
            source = path
        else:
            paths = dl_manager.download(list(urls))
            raw = (row for p in paths for row in _READERS[fmt](p))
            source = ", ".join(urls)
        return {split: self._generate_examples(raw, source)}

    def _generate_examples(self, raw, source):
        counts = {}
        for i, row in enumerate(clean_rows(raw, f"{self.name} ({source})", counts)):
            yield i, {"problem": row["problem"], "answer": encode_answer(row["answer"])}
        expected = SOURCES[self.name][3]
        if counts["kept"] != expected:
            log.warning("%s: %d rows, the paper's release has %d", self.name, counts["kept"],
                        expected)
        self.info.metadata.update(source=source, skipped_rows=counts["skipped"])


def encode_answer(answer: Any) -> str:
    return json.dumps(answer, ensure_ascii=False)


def _builder_class(name: str) -> type[MathBuilder]:
    return type(name, (MathBuilder,), {"name": name, "__module__": __name__},
                skip_registration=True)


BUILDERS: dict[str, type[MathBuilder]] = {name: _builder_class(name) for name in SOURCES}


def get_builder(name: str, data_dir: str | None = None) -> MathBuilder:
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](data_dir=data_dir, file_format="array_record")


def prepare(name: str, data_dir: str | None = None, source_dir: str | None = None,
            register_checksums: bool = False) -> MathBuilder:
    """Builds dataset `name` under `data_dir` (TFDS default when None) unless already built:
    from `source_dir`'s JSONL when given, else by downloading its source."""
    builder = get_builder(name, data_dir)
    if source_dir is not None:
        find_local_file(source_dir, name)  # fail here, clearly, not inside TFDS
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=source_dir, register_checksums=register_checksums
        )
    )
    return builder


def read_split(builder: MathBuilder) -> list[dict]:
    """All rows of the builder's only split, as {problem: str, answer: as given}."""
    (split,) = builder.info.splits.keys()
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(range(len(source)))
    return [
        {"problem": ex["problem"].decode("utf-8"), "answer": json.loads(ex["answer"])}
        for ex in examples
    ]


def load_split(name: str, data_dir: str | None = None,
               source_dir: str | None = None) -> list[dict]:
    """Rows {problem, answer} of dataset `name` (a benchmark or a training set), built first
    when needed; `source_dir` is a local JSONL directory to build from instead of downloading."""
    return read_split(prepare(name, data_dir, source_dir))
