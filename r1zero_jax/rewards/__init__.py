"""Math reward: templates, answer extraction, equivalence and the bounded grader pool (no JAX)."""

from r1zero_jax.rewards.extract import extract_answer
from r1zero_jax.rewards.math_grader import is_equiv
from r1zero_jax.rewards.pool import GradeResult, GraderPool, compute_rewards, grade_file
from r1zero_jax.rewards.templates import STOP_STRINGS, TEMPLATES, apply_template, check_template

__all__ = [
    "GradeResult", "GraderPool", "STOP_STRINGS", "TEMPLATES", "apply_template", "check_template",
    "compute_rewards", "extract_answer", "grade_file", "is_equiv",
]
