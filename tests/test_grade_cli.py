"""`r1zero-jax grade` input and output faults: named by file and 1-based line, found before any
grading starts (so no work is lost)."""

import json
import time

import pytest

from r1zero_jax import cli

GOOD = {"response": "so \\boxed{4}", "answer": "4"}


def _write(path, rows, raw_lines=()):
    with open(path, "wb") as f:
        for row in rows:
            f.write((json.dumps(row) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


@pytest.mark.parametrize("bad,message", [
    ({"response": "x", "answer": {"a": 1}},
     "`answer` must be a string, a number or a non-empty list"),
    ({"response": "x", "answer": []}, "`answer` must be"),
    ({"response": 3, "answer": "3"}, "`response` must be a string"),
    ({"response": "x", "answer": "3", "template": "chatml"}, "unknown template 'chatml'"),
])
def test_bad_row_named_by_its_file_line(tmp_path, capsys, bad, message):
    # Blank lines count: the reported number is the file's line, not the row's index.
    path = _write(tmp_path / "in.jsonl", [GOOD] * 1499,
                  raw_lines=[b""] + [json.dumps(bad).encode()])
    t0 = time.monotonic()
    assert cli.main(["grade", "--input", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1501: {message}" in err, err
    assert time.monotonic() - t0 < 10  # refused before grading 1,499 rows


def test_non_utf8_named_by_file_and_line(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", [GOOD, GOOD],
                  raw_lines=[b'{"response": "\xff", "answer": "1"}'])
    assert cli.main(["grade", "--input", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: not UTF-8 (byte 0xff at column 15)" in err, err


@pytest.mark.parametrize("where", ["is_a_directory", "under_a_file"])
def test_unwritable_output_refused_before_grading(tmp_path, capsys, where):
    path = _write(tmp_path / "in.jsonl", [GOOD] * 3)
    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path) if where == "is_a_directory" else str(tmp_path / "a_file" / "out.jsonl")
    t0 = time.monotonic()
    assert cli.main(["grade", "--input", path, "--output", out]) == 2
    err = capsys.readouterr()
    assert f"--output {out} is not writable" in err.err, err.err
    assert "graded" not in err.err and "accuracy" not in err.out  # nothing was graded
    assert time.monotonic() - t0 < 5


def test_good_file_still_grades(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", [GOOD, {"response": "\\boxed{5}", "answer": ["4", 4.0]}])
    out = tmp_path / "out.jsonl"
    assert cli.main(["grade", "--input", path, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.0]
    assert "accuracy: 1/2" in capsys.readouterr().out


def test_output_is_written_chunk_by_chunk(tmp_path, monkeypatch):
    """Rows graded before a failure are already in --output: the file is written per chunk."""
    from r1zero_jax.rewards import pool as pool_mod

    path = _write(tmp_path / "in.jsonl", [GOOD, {"response": "\\boxed{5}", "answer": "4"}] * 3)
    out = tmp_path / "out.jsonl"
    real, calls = pool_mod.GraderPool.grade, []

    def grade_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("grading stopped")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pool_mod.GraderPool, "grade", grade_then_fail)
    with pytest.raises(RuntimeError, match="grading stopped"):
        pool_mod.grade_file(path, str(out), workers=1, chunk=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.0, 1.0, 0.0]  # the first two chunks, in order
    assert rows[0]["response"] == GOOD["response"] and rows[0]["reason"]
