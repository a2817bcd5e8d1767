"""Answer extraction per template: last boxed with balanced braces, the r1 strict format, limits."""

import time

import pytest

from r1zero_jax.rewards import apply_template, extract_answer
from r1zero_jax.rewards.extract import MAX_RESPONSE_CHARS, last_boxed


@pytest.mark.parametrize("text, want", [
    ("so $\\boxed{4}$.", "4"),
    ("first \\boxed{3} then \\boxed{4}", "4"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{\\left\\{ 1 \\right.}", "\\left\\{ 1 \\right."),  # escaped brace does not count
    ("\\fbox{12}", "12"),
    ("\\boxed{1} and \\fbox{2}", "2"),
    ("The answer is $\\boxed 5$.", "5"),
    ("\\boxed{\\frac{1}{2}", None),  # truncated
    ("no box here: 5", None),
    ("\\boxed5", None),
    ("\\boxedx{3}", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


def test_empty_box_is_no_answer():
    assert extract_answer("put your final answer within \\boxed{}", "qwen_math") is None
    assert extract_answer("\\boxed{   }", "no") is None


@pytest.mark.parametrize("resp, want", [
    (" 2+2 </think> <answer> 4 </answer>", "4"),
    (" x </think> <answer> so \\boxed{\\frac12} </answer>", "\\frac12"),
    (" a </think> <answer> 3 </answer> b </think> <answer> 4 </answer>", "4"),
    (" x </think><answer> 4 </answer>", None),  # the format needs "</think> <answer>"
    (" x </think> <answer> 4", None),  # no closing tag
    (" x \\boxed{4}", None),
])
def test_r1_strict_format(resp, want):
    assert extract_answer(resp, "r1") == want


def test_qwen_template_ignores_answer_tags():
    assert extract_answer(" x </think> <answer> 4 </answer>", "qwen_math") is None


def test_unknown_template_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown template 'qwen'"):
        extract_answer("\\boxed{1}", "qwen")


def test_templates_keep_question_braces():
    q = "Find $\\{x\\}$ with {question} literally"
    assert apply_template("no", q) == q
    assert apply_template("r1", q).endswith(f"User: {q}\nAssistant: <think>")
    assert apply_template("qwen_math", q).endswith(f"user\n{q}<|im_end|>\n<|im_start|>assistant\n")


def test_oversized_and_deep_inputs_are_linear_and_bounded():
    t = time.perf_counter()
    assert extract_answer("x" * (MAX_RESPONSE_CHARS + 1) + "\\boxed{1}", "qwen_math") is None
    deep = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    assert extract_answer(deep, "qwen_math") == "{" * 10_000 + "1" + "}" * 10_000
    five_mb = "a" * 5_000_000
    assert extract_answer(five_mb, "qwen_math") is None
    assert time.perf_counter() - t < 1.0
