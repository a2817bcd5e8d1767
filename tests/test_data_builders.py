"""TFDS builders without TensorFlow: local JSONL, the shared data, and the download path."""

import functools
import http.server
import json
import logging
import os
import threading

import pytest

from r1zero_jax.data import builders

GOOD_ROWS = [
    {"problem": "What is $1+1$?", "answer": "2"},
    {"problem": "AMC-style: float answer", "answer": 142.0},
    {"problem": "a float given as a string", "answer": "142.0"},
    {"problem": "several accepted answers", "answer": ["$\\frac{1}{2}$", "0.5"]},
    {"problem": "an integer answer, ünïcödé and {braces}", "answer": 7},
    {"problem": "a one-item list stays a list", "answer": ["9.6\n"]},
]
BAD_LINES = [
    json.dumps({"answer": "3"}),  # no problem
    json.dumps({"problem": "no answer"}),
    json.dumps({"problem": "dict answer", "answer": {"x": 1}}),
    json.dumps({"problem": "bool answer", "answer": True}),
    json.dumps({"problem": "empty list", "answer": []}),
    json.dumps({"problem": "", "answer": "1"}),
    "{not json",
]


def _write_source(directory, name):
    lines = [json.dumps(r, ensure_ascii=False) for r in GOOD_ROWS]
    # Interleave the bad lines so a skip cannot shift the rows that follow it.
    mixed = ([x for pair in zip(lines, BAD_LINES, strict=False) for x in pair]
             + lines[len(BAD_LINES):])
    mixed += BAD_LINES[len(lines):]
    (directory / f"{name}.jsonl").write_text("\n".join(mixed) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name", list(builders.SOURCES))
def test_builds_from_local_jsonl_exact_rows_and_counts_bad_ones(name, tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    _write_source(src, name)
    with caplog.at_level(logging.WARNING, logger="r1zero_jax.data.builders"):
        rows = builders.load_split(name, str(tmp_path / "tfds"), str(src))
    assert json.dumps(rows) == json.dumps(GOOD_ROWS)  # values, order and types (142.0 vs "142.0")
    assert f"skipped {len(BAD_LINES)} bad rows, kept {len(GOOD_ROWS)}" in caplog.text
    assert "row 4: missing 'answer'" in caplog.text and "(and 2 more)" in caplog.text
    assert builders.get_builder(name, str(tmp_path / "tfds")).info.metadata["skipped_rows"] == 7
    # Built once: reading again needs no source.
    assert builders.load_split(name, str(tmp_path / "tfds")) == rows


@pytest.mark.parametrize("name,count", [
    ("aime24", 30), ("amc23", 83), ("math500", 500), ("minerva_math", 272),
    ("olympiad_bench", 675), ("gsm8k", 8792),
])
def test_shared_data_counts_and_answers_round_trip(name, count, shared_data_dir, tmp_path):
    rows = builders.load_split(name, str(tmp_path), shared_data_dir)
    sub = "train" if name in builders.TRAIN_SETS else "evaluation_suite"
    with open(os.path.join(shared_data_dir, sub, f"{name}.jsonl"), encoding="utf-8") as f:
        source = [json.loads(line) for line in f]
    assert len(rows) == count
    assert json.dumps(rows) == json.dumps(source)


def test_read_jsonl_rows_skips_bad_rows(tmp_path):
    _write_source(tmp_path, "mine")
    assert builders.read_jsonl_rows(str(tmp_path / "mine.jsonl")) == GOOD_ROWS


def test_benchmark_names_match_sources():
    assert builders.BENCHMARKS == ("aime24", "amc23", "math500", "minerva_math", "olympiad_bench")
    assert set(builders.SOURCES) == set(builders.BENCHMARKS) | set(builders.TRAIN_SETS)


def test_missing_source_file_and_unknown_name_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        builders.load_split("aime24", str(tmp_path / "tfds"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'aime25'"):
        builders.load_split("aime25", str(tmp_path / "tfds"), str(tmp_path))


@pytest.mark.parametrize("row,reason", [
    ({"problem": "p", "answer": "1"}, None),
    ({"problem": "p", "answer": [1, "2", 3.5]}, None),
    ({"problem": "p", "answer": [["nested"]]}, "type list"),
    ({"problem": "p", "answer": None}, "missing 'answer'"),
    ({"problem": "p", "answer": float("nan")}, "not a finite number"),
    ({"problem": 3, "answer": "1"}, "'problem'"),
    (["p", "1"], "not a JSON object"),
])
def test_validate_row(row, reason):
    got = builders.validate_row(row)
    assert got is None if reason is None else reason in got


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server standing in for GitHub (no internet here)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_path_reads_hf_arrow_and_gsm8k_sources(http_dir, tmp_path, monkeypatch):
    import pyarrow as pa

    served, url = http_dir
    table = pa.table({"problem": ["p1", "p2"], "answer": [["1", "2"], ["x"]], "level": [3, 5]})
    with pa.OSFile(str(served / "data.arrow"), "wb") as f, \
            pa.ipc.new_stream(f, table.schema) as writer:  # what `save_to_disk` writes
        writer.write_table(table)
    (served / "train.jsonl").write_text(
        json.dumps({"question": "q1", "answer": "3 * 4 = 12\n#### 1,200"}) + "\n"
        + json.dumps({"question": "q2", "answer": "no final answer"}) + "\n")
    (served / "test.jsonl").write_text(json.dumps({"question": "q3", "answer": "#### -5"}) + "\n")
    monkeypatch.setitem(builders.SOURCES, "aime24", ("test", (f"{url}/data.arrow",), "hf_arrow", 2))
    monkeypatch.setitem(builders.SOURCES, "gsm8k", (
        "train", (f"{url}/train.jsonl", f"{url}/test.jsonl"), "gsm8k", 2))
    data_dir = str(tmp_path / "tfds")
    assert builders.load_split("aime24", data_dir) == [
        {"problem": "p1", "answer": ["1", "2"]}, {"problem": "p2", "answer": ["x"]}]
    assert builders.load_split("gsm8k", data_dir) == [
        {"problem": "q1", "answer": "1,200"}, {"problem": "q3", "answer": "-5"}]
