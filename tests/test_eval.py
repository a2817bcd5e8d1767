"""`r1zero-jax eval`: pass@k, scores, Table 4 layout, re-grading, a tiny model end to end."""

import itertools
import json
import math
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest

from r1zero_jax import cli
from r1zero_jax.data.builders import BENCHMARKS
from r1zero_jax.eval import (format_table, ks_for, load_benchmarks, pass_at_k, read_responses,
                             score, summarize)

COLUMNS = ["AIME24", "AMC", "MATH500", "Minerva", "OlympiadBench", "Avg."]
# Small stand-ins for ../shared/data (answers as string, float, LaTeX, list).
FALLBACK_ROWS = {
    "aime24": [{"problem": "What is $1+1$?", "answer": "2"},
               {"problem": "What is $12 \\cdot 2$?", "answer": "024"}],
    "amc23": [{"problem": "What is $70 \\cdot 2 + 2$?", "answer": 142.0},
              {"problem": "What is $3^2$?", "answer": 9.0}],
    "math500": [{"problem": "Halve $1$.", "answer": "\\frac{1}{2}"},
                {"problem": "Solve $x^2 = 4$, $x > 0$.", "answer": "2"}],
    "minerva_math": [{"problem": "What is $3$ in decimal?", "answer": ["3", "3.0"]},
                     {"problem": "Name $\\pi$ to 2 places.", "answer": "3.14"}],
    "olympiad_bench": [{"problem": "Expand $(x+1)^2$.", "answer": "x^2+2x+1"},
                       {"problem": "Find the interval where $x^2 < 1$.", "answer": "(-1,1)"}],
}


@pytest.fixture(scope="module")
def benchmark_dir(request, tmp_path_factory):
    """../shared/data when present, else a small JSONL directory with all five benchmarks."""
    try:
        return request.getfixturevalue("shared_data_dir")
    except pytest.skip.Exception:
        path = tmp_path_factory.mktemp("bench")
        for name, rows in FALLBACK_ROWS.items():
            (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)


# ---------------------------------------------------------------------------------------------
# pass@k


def _pass_at_k_by_enumeration(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_hand_computed():
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # n=4, c=1, k=1 is the plain accuracy c/n.
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-12)
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 5, 4) == 1.0  # only 3 wrong: every 4-subset holds a correct one


@pytest.mark.parametrize("n", [1, 2, 3, 6, 9])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_by_enumeration(n, c, k)),
                                                       abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_stays_finite_and_bad_input_is_an_error():
    exact = 1 - Fraction(math.comb(1000 - 3, 64), math.comb(1000, 64))
    assert pass_at_k(1000, 3, 64) == pytest.approx(float(exact), rel=1e-12)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(*bad)


def test_ks_reported():
    assert ks_for(1) == [1]
    assert ks_for(4) == [1, 2, 4]
    assert ks_for(6) == [1, 2, 4, 6]


# ---------------------------------------------------------------------------------------------
# Scores and Table 4


def _record(index, correct, length, finish="stop", response="so \\boxed{1}", sample=0):
    return {"index": index, "sample": sample, "correct": correct, "length": length,
            "finish_reason": finish, "response": response, "extracted": "1"}


def test_score_with_samples_hand_computed():
    # Problem 0: 1 of 4 correct; problem 1: 4 of 4.
    recs = [_record(0, j == 2, 10 + j, sample=j) for j in range(4)]
    recs += [_record(1, True, 20, "length" if j == 0 else "stop",
                     "Let me recheck: \\boxed{1}" if j < 2 else "\\boxed{1}", sample=j)
             for j in range(4)]
    s = score(recs)
    assert (s["n"], s["responses"], s["samples_per_problem"], s["correct"]) == (2, 8, 4, 5)
    assert s["accuracy"] == pytest.approx(5 / 8)
    assert s["mean@4"] == pytest.approx((1 / 4 + 1) / 2)
    assert s["pass@1"] == pytest.approx((1 / 4 + 1) / 2)
    assert s["pass@2"] == pytest.approx(((1 - 3 / 6) + 1) / 2)  # 1 - C(3,2)/C(4,2) for problem 0
    assert s["pass@4"] == pytest.approx(1.0)
    assert s["mean_response_length"] == pytest.approx((10 + 11 + 12 + 13 + 80) / 8)
    assert s["truncation_rate"] == pytest.approx(1 / 8)
    sr = s["self_reflection"]
    assert (sr["questions_with_reflection"], sr["responses_with_reflection"]) == (1, 2)
    lc = s["length_by_correctness"]
    assert (lc["num_correct"], lc["num_incorrect"]) == (5, 3)
    assert lc["mean_correct"] == pytest.approx((12 + 80) / 5)
    assert lc["mean_incorrect"] == pytest.approx((10 + 11 + 13) / 3)


def test_average_is_unweighted_and_table_has_the_papers_columns():
    records = {
        "aime24": [_record(0, True, 5)],
        "amc23": [_record(i, False, 7, "length") for i in range(3)],
        "math500": [_record(0, True, 9), _record(1, False, 9)],
        "minerva_math": [_record(0, False, 4)],
        "olympiad_bench": [_record(0, True, 2)],
    }
    results = summarize(records)
    accs = [1.0, 0.0, 0.5, 0.0, 1.0]
    assert results["average"] == pytest.approx(np.mean(accs))  # 0.5, not the pooled 4/8
    assert results["average_metrics"]["truncation_rate"] == pytest.approx(1 / 5)
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    table = format_table(results, label="my-model").splitlines()
    assert table[0].split() == ["Model"] + COLUMNS
    assert table[2].split() == ["my-model", "100.0", "0.0", "50.0", "0.0", "100.0", "50.0"]
    assert table[3].split()[-6:] == ["5", "7", "9", "4", "2", "5"]
    assert table[4].split()[-6:] == ["0.0", "100.0", "0.0", "0.0", "0.0", "20.0"]


# ---------------------------------------------------------------------------------------------
# Benchmark rows, --responses


def test_jsonl_dir_and_tfds_give_the_same_rows(tmp_path):
    src = tmp_path / "src" / "evaluation_suite"
    src.mkdir(parents=True)
    for name in ("amc23", "minerva_math"):
        (src / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in FALLBACK_ROWS[name]))
    names = ["amc23", "minerva_math"]
    direct = load_benchmarks(names, data_dir=str(tmp_path / "src"))
    built = load_benchmarks(names, data_dir=str(tmp_path / "tfds"),
                            source_dir=str(tmp_path / "src"))
    assert direct == built == {n: FALLBACK_ROWS[n] for n in names}
    assert os.path.isdir(tmp_path / "tfds" / "amc23")  # built through TFDS
    assert load_benchmarks(names, data_dir=str(tmp_path / "src"), limit=1) == {
        n: FALLBACK_ROWS[n][:1] for n in names}


def _boxed_reference_file(path, rows_by_benchmark):
    with open(path, "w") as f:
        for name, rows in rows_by_benchmark.items():
            for i, r in enumerate(rows):
                ans = r["answer"][0] if isinstance(r["answer"], list) else r["answer"]
                f.write(json.dumps({"benchmark": name, "index": i, "answer": r["answer"],
                                    "response": f"The answer is $\\boxed{{{ans}}}$."}) + "\n")


def test_responses_with_boxed_references_score_100_on_every_benchmark(benchmark_dir, tmp_path,
                                                                      capsys):
    rows = load_benchmarks(BENCHMARKS, data_dir=benchmark_dir)
    _boxed_reference_file(tmp_path / "refs.jsonl", rows)
    out = tmp_path / "out"
    assert cli.main(["eval", "--responses", str(tmp_path / "refs.jsonl"),
                     "--output-dir", str(out), "--workers", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    for name, b in results["benchmarks"].items():
        assert (b["accuracy"], b["n"], b["correct"]) == (1.0, len(rows[name]), len(rows[name]))
    assert results["average"] == 1.0
    regraded = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(regraded) == sum(map(len, rows.values())) and all(r["correct"] for r in regraded)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["Model"] + COLUMNS
    assert table[2].split()[1:] == ["100.0"] * 6


def test_responses_regrade_a_grader_verdict_and_keep_samples(tmp_path, capsys):
    path = tmp_path / "gen.jsonl"
    rows = [{"benchmark": "math500", "index": 0, "sample": j, "answer": "\\frac{1}{2}",
             "response": f"\\boxed{{{r}}}", "correct": True, "length": 3,
             "finish_reason": "stop"} for j, r in enumerate(["0.5", "1/2", "2", "7"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["eval", "--responses", str(path), "--output-dir",
                     str(tmp_path / "out")]) == 0
    b = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["math500"]
    # The saved `correct` flags (all True) are replaced by the grader's verdicts.
    assert (b["n"], b["samples_per_problem"], b["correct"]) == (1, 4, 2)
    assert b["pass@1"] == pytest.approx(0.5) and b["pass@4"] == 1.0
    assert b["pass@2"] == pytest.approx(1 - 1 / 6)
    assert "pass@2" in capsys.readouterr().out


def test_responses_benchmarks_and_limit_select_rows(tmp_path):
    path = tmp_path / "gen.jsonl"
    rows = [{"benchmark": b, "index": i, "answer": "1", "response": f"\\boxed{{{i}}}"}
            for b in ("heldout", "aime24") for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["eval", "--responses", str(path), "--benchmarks", "heldout", "--limit", "2",
                     "--output-dir", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["benchmarks"]) == ["heldout"]
    assert results["benchmarks"]["heldout"]["n"] == 2
    assert results["average"] == pytest.approx(0.5)  # index 1 answers 1, index 0 does not
    assert format_table(results).splitlines()[0].split() == ["Model", "heldout", "Avg."]


@pytest.mark.parametrize("content,message", [
    ('{"benchmark": "aime24", "answer": "1"}\n', "needs \\['response'\\]"),
    ('{"benchmark": "aime24", "answer": "1", "response": "x"}\nnot json\n', ":2: not JSON"),
    ("", "no generations"),
    ('{"benchmark": "aime24", "answer": null, "response": "x"}\n', ":1: missing 'answer'"),
    ('{"benchmark": "aime24", "answer": [], "response": "x"}\n', ":1: empty 'answer' list"),
])
def test_bad_responses_file_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert cli.main(["eval", "--responses", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "r1zero-jax eval: error:" in err
    with pytest.raises(ValueError, match=message):
        read_responses(str(path))


def test_bad_settings_are_clear_errors(tmp_path, capsys, benchmark_dir):
    assert cli.main(["eval", "--model", str(tmp_path), "--benchmarks", "aime24,gsm9k",
                     "--data-dir", benchmark_dir]) == 2
    assert "unknown benchmark(s) ['gsm9k']" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--data-dir", benchmark_dir,
                     "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --model and --responses exclude each other
        cli.main(["eval", "--model", "m", "--responses", "r"])


# ---------------------------------------------------------------------------------------------
# A tiny random model end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A random 1-layer HF Qwen2 with the full Qwen2.5 vocabulary (151,665 ids, ~2.5M params)
    and the real tokenizer in the same directory; returns (dir, torch model)."""
    from hf_models import make_hf_model

    path = str(tmp_path_factory.mktemp("tiny_qwen"))
    torch_model = make_hf_model(path, vocab=151680, hidden=16, inter=32, layers=1, heads=2,
                                kv_heads=1, tie=True)
    for f in os.listdir(qwen_tokenizer_dir):
        shutil.copy(os.path.join(qwen_tokenizer_dir, f), path)
    return path, torch_model


def test_tiny_model_eval_over_all_five_benchmarks(tiny_model_dir, benchmark_dir, tmp_path,
                                                  capsys):
    import torch
    from transformers import AutoTokenizer

    model_dir, torch_model = tiny_model_dir
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", model_dir, "--data-dir", benchmark_dir, "--limit", "2",
                     "--max-new-tokens", "4", "--dtype", "float32", "--batch-size", "2",
                     "--output-dir", str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split() == ["Model"] + COLUMNS
    assert table[2].split()[0] == os.path.basename(model_dir)
    assert "ETA" in captured.err

    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    for b in results["benchmarks"].values():
        assert b["n"] == 2 and b["samples_per_problem"] == 1
        assert 1 <= b["mean_response_length"] <= 4
        assert 0 <= b["accuracy"] <= 1
    assert results["average"] == pytest.approx(
        np.mean([b["accuracy"] for b in results["benchmarks"].values()]))
    assert results["analysis"]["self_reflection"]["num_responses"] == 10

    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["benchmark"], g["index"]) for g in gens] == [(b, i) for b in BENCHMARKS
                                                            for i in range(2)]
    # Greedy responses are what transformers' own greedy decoding of the templated prompt gives.
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = load_benchmarks(BENCHMARKS, data_dir=benchmark_dir, limit=2)
    for g in gens:
        assert g["problem"] == rows[g["benchmark"]][g["index"]]["problem"]
        prompt = tok(apply_qwen_math(g["problem"]), return_tensors="pt")
        with torch.no_grad():
            ref = torch_model.generate(**prompt, max_new_tokens=4, do_sample=False,
                                       eos_token_id=[151643, 151645],
                                       pad_token_id=tok.pad_token_id)
        new = ref[0, prompt["input_ids"].shape[1]:]
        assert g["response"] == tok.decode(new, skip_special_tokens=True)
        assert g["length"] == len(new)
        assert g["finish_reason"] == ("length" if len(new) == 4 and
                                      new[-1].item() not in (151643, 151645) else "stop")

    # Re-grading the saved generations reproduces the scores.
    assert cli.main(["eval", "--responses", str(out / "generations.jsonl"),
                     "--output-dir", str(tmp_path / "regraded")]) == 0
    again = json.loads((tmp_path / "regraded" / "results.json").read_text())
    assert again["benchmarks"] == results["benchmarks"]


def apply_qwen_math(problem):
    from r1zero_jax.rewards.templates import apply_template

    return apply_template("qwen_math", problem)


@pytest.mark.slow
def test_tiny_model_sampled_eval_reports_pass_at_k(tiny_model_dir, benchmark_dir, tmp_path,
                                                   capsys):
    model_dir, _ = tiny_model_dir
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", model_dir, "--data-dir", benchmark_dir, "--limit", "2",
                     "--benchmarks", "math500", "--max-new-tokens", "3", "--dtype", "float32",
                     "--temperature", "1.0", "--n", "3", "--output-dir", str(out)]) == 0
    assert "pass@3" in capsys.readouterr().out
    b = json.loads((out / "results.json").read_text())["benchmarks"]["math500"]
    assert (b["n"], b["responses"], b["samples_per_problem"]) == (2, 6, 3)
    assert {"pass@1", "pass@2", "pass@3", "mean@3"} <= set(b)
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["index"], g["sample"]) for g in gens] == [(i, j) for i in range(2)
                                                         for j in range(3)]
    # Three samples of a random model over 151k tokens differ.
    assert len({g["response"] for g in gens if g["index"] == 0}) == 3


def test_continuous_and_paged_eval_give_the_static_calls_generations(tiny_model_dir,
                                                                     benchmark_dir, tmp_path,
                                                                     capsys):
    """--decode-slots (one continuous batch per benchmark) on a paged cache: the same greedy
    responses and scores as static calls of --batch-size, with progress lines."""
    model_dir, _ = tiny_model_dir
    base = ["eval", "--model", model_dir, "--data-dir", benchmark_dir, "--limit", "3",
            "--benchmarks", "amc23,math500", "--max-new-tokens", "6", "--dtype", "float32",
            "--workers", "1"]
    assert cli.main(base + ["--batch-size", "2", "--output-dir", str(tmp_path / "static")]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--decode-slots", "2", "--page-size", "4",
                            "--output-dir", str(tmp_path / "paged")]) == 0
    assert "ETA" in capsys.readouterr().err
    read = lambda d: [json.loads(line) for line in  # noqa: E731
                      (tmp_path / d / "generations.jsonl").read_text().splitlines()]
    assert read("paged") == read("static")
    paged = json.loads((tmp_path / "paged" / "results.json").read_text())
    assert paged["benchmarks"] == json.loads(
        (tmp_path / "static" / "results.json").read_text())["benchmarks"]
    assert paged["sampling"]["decode_slots"] == 2 and paged["sampling"]["page_size"] == 4
    assert cli.main(base + ["--page-size", "4", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "set --decode-slots too" in capsys.readouterr().err
