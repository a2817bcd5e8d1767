"""Answer equivalence: normalised strings, then structure (tuples, intervals, sets, matrices,
equations, \\pm pairs), then numeric/symbolic equality of each scalar through the safe LaTeX parser.

Numbers follow the rule documented in `normalize` (exact for exact references, a reference decimal
at its own precision). A bare list in the prediction (commas, "or", "and", \\pm) against a single
reference is a hedge: it scores only when every candidate equals the reference.

No time bound here: size guards keep ordinary calls fast, and `GraderPool` runs this in worker
processes with a CPU-time bound.
"""

import cmath
import re
from fractions import Fraction
from functools import lru_cache

import sympy
from sympy.core.evalf import PrecisionExhausted

from r1zero_jax.rewards.latex_parse import MAX_RESULT_DIGITS, ParseError, Parsed, parse_latex
from r1zero_jax.rewards.normalize import (
    MAX_ANSWER_CHARS, choice_letter, normalize, numbers_equal, plain_number, quick_verdict,
)

MAX_ITEMS = 32  # elements of a tuple/set/matrix compared
# Exact references: two closed forms that agree to this many digits are equal. Parsed values reach
# 10^{-MAX_RESULT_DIGITS}, so a real difference is seen, even e^{\pi\sqrt{163}} - 262537412640768744
# (about -7.5e-13, relative 3e-30), which a fixed-precision comparison takes for 0.
_ZERO_TEST_DIGITS = MAX_RESULT_DIGITS + 100
_ZERO_TEST_STEPS = (15, 60, 300, _ZERO_TEST_DIGITS)  # most unequal pairs part at 15 digits
# Expressions in free symbols are compared at sample points, at 30 digits: rounding noise, not a
# difference, below these (\sin^2 x + \cos^2 x - 1 evaluates to about 1e-31, not 0).
_SYMBOLIC_TOL = Fraction(1, 10**12)
_SYMBOLIC_FLOOR = 1e-20
_WORD = re.compile(r"[a-zA-Z]+(?: [a-zA-Z]+)*")  # a text answer: compared case-insensitively
_PM = ("\\pm", "\\mp")
_SIMPLE_LHS = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\w+|_\{\w+\})?(?:\([a-zA-Z,]*\))?")
_MATRIX = re.compile(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}")
_OPENERS = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}
# Points where expressions with free symbols are compared (positive, away from common poles).
_POINTS = ((1.3721, 0.4), (2.1183, 0.3), (0.6517, 0.7))


def _depth_steps(s: str):
    """(index, char, depth before char) over s; \\{ and \\} count as brackets."""
    depth, i = 0, 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            yield i, s[i : i + 2], depth
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        yield i, ch, depth
        depth += _OPENERS.get(ch, 0)
        i += 1


def split_top(s: str, sep: str) -> list[str]:
    """s split at `sep` outside brackets (a command separator such as \\in does not match
    \\infty)."""
    parts, last = [], 0
    for i, _, depth in _depth_steps(s):
        end = i + len(sep)
        if (depth == 0 and s.startswith(sep, i) and i >= last
                and not (sep[-1].isalpha() and s[end : end + 1].isalpha())):
            parts.append(s[last:i])
            last = end
    parts.append(s[last:])
    return parts


def _wrapped(s: str) -> bool:
    """True when the bracket opening s closes at its last character."""
    for i, ch, depth in _depth_steps(s):
        if depth == 1 and ch in (")", "]", "}", "\\}") and i + len(ch) < len(s):
            return False
    return True


def _plus_minus(s: str):
    """A scalar, or for one \\pm / \\mp its two values as ('pm', [a, b]), flattened into a list."""
    signs = [c for c in _PM if c in s]
    if len(signs) != 1 or s.count(signs[0]) != 1:
        return ("scalar", s)
    first, second = ("+", "-") if signs[0] == "\\pm" else ("-", "+")
    return ("pm", [("scalar", s.replace(signs[0], op).replace("+-", "-").replace("(+", "(")
                    .lstrip("+")) for op in (first, second)])


def _items(parts: list[str]) -> list:
    out = []
    for p in parts:
        t = structure(p)
        out.extend(t[1] if t[0] == "pm" else [t])
    return out


def structure(s: str):
    """Tree of a normalised answer: ('scalar', text) | ('seq', open, close, items) |
    ('set', items) | ('matrix', rows) | ('eq', lhs, rhs) | ('pm', [plus, minus])."""
    eq = split_top(s, "=")
    if len(eq) == 2:
        lhs, rhs = eq
        if _SIMPLE_LHS.fullmatch(lhs):
            return structure(rhs)
        return ("eq", lhs, rhs)
    inside = split_top(s, "\\in")
    if len(inside) == 2 and _SIMPLE_LHS.fullmatch(inside[0]):
        return structure(inside[1])
    union = split_top(s, "\\cup")
    if len(union) > 1:
        return ("set", [structure(p) for p in union])
    m = _MATRIX.fullmatch(s)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r]
        return ("matrix", [[structure(c) for c in r.split("&")] for r in rows])
    if s.startswith("\\{") and s.endswith("\\}") and _wrapped(s):
        return ("set", _items(split_top(s[2:-2], ",")))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _wrapped(s):
        items = split_top(s[1:-1], ",")
        if len(items) > 1:
            return ("seq", s[0], s[-1], [structure(p) for p in items])
        if s[0] == "(" and s[-1] == ")":
            return structure(s[1:-1])
    items = split_top(s, ",")
    if len(items) > 1:
        return ("set", _items(items))
    return _plus_minus(s)


@lru_cache(maxsize=16_384)
def _parse(text: str) -> Parsed | None:
    try:
        return parse_latex(text)
    except (ParseError, RecursionError, MemoryError, ValueError, TypeError, OverflowError):
        return None


def _close(vx: sympy.Expr, vy: sympy.Expr, tol: Fraction, floor: float = 0.0) -> bool:
    """|x - y| < tol * |y| (or <= floor) for two evaluated numbers; past float range, through
    their ratio."""
    x, y, tol = complex(vx), complex(vy), float(tol)
    if cmath.isnan(x) or cmath.isnan(y):
        return False
    if cmath.isfinite(x) and cmath.isfinite(y):
        return abs(x - y) < tol * abs(y) or abs(x - y) <= floor
    if vy == 0:
        return False
    ratio = complex((vx / vy).evalf(30))
    return cmath.isfinite(ratio) and abs(ratio - 1) < tol


def _exactly_equal(x: sympy.Expr, y: sympy.Expr) -> bool:
    """x == y for closed-form numbers: each side evaluated to n correct digits, n rising to
    _ZERO_TEST_DIGITS, and no n tells them apart. A side that cannot be evaluated (even a
    roundabout 0, like (\\sqrt2+\\sqrt3)^2-5-2\\sqrt6, whose digits never settle) equals nothing:
    a miss, never a false match. (Asking sympy for the digits of x - y instead takes a failure to
    evaluate \\sin(10^{1999}) - \\frac12 for a 0.)"""
    for n in _ZERO_TEST_STEPS:
        try:
            vx, vy = (side.evalf(n, maxn=_ZERO_TEST_DIGITS + n, strict=True) for side in (x, y))
        except PrecisionExhausted:
            return False
        if not (vx.is_number and vy.is_number):
            return False
        if abs(vx - vy) > max(abs(vx), abs(vy)) * sympy.Float(10, n) ** (3 - n):
            return False
    return True


def _exprs_equal(pred: sympy.Expr, ref: sympy.Expr, ref_tol: Fraction) -> bool:
    """The numeric rule of `normalize`: exact unless the reference has decimals (then ref_tol)."""
    if pred == ref:
        return True
    if pred.is_Rational and ref.is_Rational:  # exactly, also at a decimal's half-unit boundary
        return abs(pred - ref) < sympy.Rational(ref_tol.numerator, ref_tol.denominator) * abs(ref)
    bad = (sympy.nan, sympy.zoo)
    if any(e.has(*bad, sympy.oo, -sympy.oo) for e in (pred, ref)):
        return False  # infinities only match structurally (pred == ref above)
    syms = sorted(pred.free_symbols | ref.free_symbols, key=lambda s: s.name)
    try:
        if not syms:
            if ref_tol:
                return _close(pred.evalf(30), ref.evalf(30), ref_tol)
            return _exactly_equal(pred, ref)
        for base, step in _POINTS:
            pt = {s: sympy.Float(base + step * k, 30) for k, s in enumerate(syms)}
            tol = max(ref_tol, _SYMBOLIC_TOL)
            if not _close(pred.evalf(30, subs=pt), ref.evalf(30, subs=pt), tol, _SYMBOLIC_FLOOR):
                return False
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return False
    return True


def _is_word(text: str) -> bool:
    return len(text) >= 3 and _WORD.fullmatch(text) is not None


def _scalar_equiv(p: str, r: str, p_pct: bool, r_pct: bool) -> bool:
    if p == r or (_is_word(r) and p.lower() == r.lower()):
        return True
    if re.fullmatch(r"[A-E]", r):
        return choice_letter(p) == r
    pv, rv = _parse(p), _parse(r)
    if pv is None or rv is None:
        return False
    preds = [pv.expr] + ([pv.expr / 100] if p_pct and not r_pct else [])
    refs = [rv.expr] + ([rv.expr / 100] if r_pct and not p_pct else [])
    return any(_exprs_equal(a, b, rv.rel_tol) for a in preds for b in refs)


def _matched(preds: list, refs: list, p_pct: bool, r_pct: bool) -> bool:
    """Unordered comparison: every reference item matched by a distinct prediction item."""
    if len(preds) != len(refs) or len(refs) > MAX_ITEMS:
        return False
    left = list(preds)
    for r in refs:
        hit = next((k for k, p in enumerate(left) if _tree_equiv(p, r, p_pct, r_pct)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _tree_equiv(p, r, p_pct: bool, r_pct: bool) -> bool:
    p, r = (("set", t[1]) if t[0] == "pm" else t for t in (p, r))
    if p[0] == "set" and r[0] == "scalar":
        # A hedge names several candidates: it scores only if they are all the reference.
        return len(p[1]) <= MAX_ITEMS and all(_tree_equiv(a, r, p_pct, r_pct) for a in p[1])
    if p[0] != r[0]:
        return False
    kind = r[0]
    if kind == "scalar":
        return _scalar_equiv(p[1], r[1], p_pct, r_pct)
    if kind == "seq":
        return (p[1:3] == r[1:3] and len(p[3]) == len(r[3]) <= MAX_ITEMS
                and all(_tree_equiv(a, b, p_pct, r_pct) for a, b in zip(p[3], r[3], strict=False)))
    if kind == "set":
        return _matched(p[1], r[1], p_pct, r_pct)
    if kind == "matrix":
        return (len(p[1]) == len(r[1])
                and all(len(a) == len(b) for a, b in zip(p[1], r[1], strict=False))
                and sum(len(a) for a in r[1]) <= MAX_ITEMS
                and all(_tree_equiv(x, y, p_pct, r_pct)
                        for a, b in zip(p[1], r[1], strict=False)
                        for x, y in zip(a, b, strict=False)))
    # equations: same relation up to sign when both sides parse
    if p[1] == r[1] and p[2] == r[2]:
        return True
    parts = [_parse(t) for t in (*p[1:], *r[1:])]
    if any(v is None for v in parts):
        return False
    tol = max(parts[2].rel_tol, parts[3].rel_tol)
    dp, dr = parts[0].expr - parts[1].expr, parts[2].expr - parts[3].expr
    return _exprs_equal(dp, dr, tol) or _exprs_equal(dp, -dr, tol)


def _equiv_one(pred: str, ref: str) -> bool:
    p, r = normalize(pred), normalize(ref)
    if p.text == r.text or (_is_word(r.text) and p.text.lower() == r.text.lower()):
        return True
    pn, rn = plain_number(p.text), plain_number(r.text)
    if pn is not None and rn is not None:
        a, b = pn[0], rn[0]
        return (numbers_equal(a, b, rn[1])
                or (p.percent and not r.percent and numbers_equal(a / 100, b, rn[1]))
                or (r.percent and not p.percent and numbers_equal(a, b / 100, rn[1])))
    return _tree_equiv(structure(p.text), structure(r.text), p.percent, r.percent)


def _refs(ref: str | list[str]) -> list[str]:
    return [str(ref)] if isinstance(ref, (str, int, float)) else [str(r) for r in ref]


def is_equiv(pred: str, ref: str | list[str]) -> bool:
    """True when `pred` matches the reference answer (or any of a list of them)."""
    refs = _refs(ref)
    verdict = quick_verdict(pred, refs)
    if verdict is not None:
        return verdict
    for r in refs:
        try:
            if _equiv_one(pred, r):
                return True
        except (RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError,
                AttributeError):
            continue
    return False


def judge(pred: str, ref: str | list[str]) -> tuple[bool, str]:
    """`is_equiv` with the reason: "equal", "hedge" (several candidates for a single-valued
    reference) or "not equal"."""
    if is_equiv(pred, ref):
        return True, "equal"
    text = normalize(pred).text
    if len(text) <= MAX_ANSWER_CHARS and structure(text)[0] in ("set", "pm") and not any(
            structure(normalize(r).text)[0] in ("set", "pm") for r in _refs(ref)):
        return False, "hedge"
    return False, "not equal"


MATH_REWARD = f"{__name__}:reward"  # the import spec grader workers load (plugins.py)


def reward(response: str, answer, template: str = "qwen_math") -> tuple[float, str | None, str]:
    """The math task's reward function (run in a grader worker): 1.0 when the answer extracted
    from `response` under `template` equals a reference (`answer`: one or a list), else 0.0;
    with the extracted answer and the reason."""
    from r1zero_jax.rewards.extract import extract_answer

    extracted = extract_answer(response, template)
    if extracted is None:
        return 0.0, None, "no answer"
    ok, reason = judge(extracted, answer)
    return float(ok), extracted, reason
