"""Answer equivalence: normalised strings, then structure (tuples, intervals, sets, matrices,
equations), then numeric/symbolic equality of each scalar through the safe LaTeX parser.

No wall-clock bound here: size guards keep ordinary calls fast, and `GraderPool` runs this in
killable worker processes for the hard bound.
"""

import cmath
import re
from functools import lru_cache

import sympy

from r1zero_jax.rewards.latex_parse import ParseError, Parsed, parse_latex
from r1zero_jax.rewards.normalize import (
    REL_TOL, choice_letter, normalize, numbers_equal, plain_number, quick_verdict,
)

MAX_ITEMS = 32  # elements of a tuple/set/matrix compared
_EXACT_TOL = 1e-12
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
    """s split at `sep` outside brackets (a command separator such as \\in does not match \\infty)."""
    parts, last = [], 0
    for i, ch, depth in _depth_steps(s):
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


def structure(s: str):
    """Tree of a normalised answer: ('scalar', text) | ('seq', open, close, items) |
    ('set', items) | ('matrix', rows) | ('eq', lhs, rhs)."""
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
        return ("set", [structure(p) for p in split_top(s[2:-2], ",")])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _wrapped(s):
        items = split_top(s[1:-1], ",")
        if len(items) > 1:
            return ("seq", s[0], s[-1], [structure(p) for p in items])
        if s[0] == "(" and s[-1] == ")":
            return structure(s[1:-1])
    items = split_top(s, ",")
    if len(items) > 1:
        return ("set", [structure(p) for p in items])
    return ("scalar", s)


@lru_cache(maxsize=16_384)
def _parse(text: str) -> Parsed | None:
    try:
        return parse_latex(text)
    except (ParseError, RecursionError, MemoryError, ValueError, TypeError, OverflowError):
        return None


def _close(vx: sympy.Expr, vy: sympy.Expr, tol: float) -> bool:
    """Relative closeness of two evaluated numbers; past float range, through their ratio."""
    x, y = complex(vx), complex(vy)
    if cmath.isnan(x) or cmath.isnan(y):
        return False
    if cmath.isfinite(x) and cmath.isfinite(y):
        return abs(x - y) <= max(tol * max(abs(x), abs(y)), 0.0 if tol > _EXACT_TOL else 1e-20)
    if vy == 0:
        return False
    ratio = complex((vx / vy).evalf(30))
    return cmath.isfinite(ratio) and abs(ratio - 1) <= tol


def _exprs_equal(x: sympy.Expr, y: sympy.Expr, inexact: bool) -> bool:
    if x == y:
        return True
    if x.is_Rational and y.is_Rational and not inexact:
        return False  # exact numbers are equal only when identical (10^{1500}+1 is not 10^{1500})
    bad = (sympy.nan, sympy.zoo)
    if any(e.has(*bad) for e in (x, y)) or x.has(sympy.oo, -sympy.oo) or y.has(sympy.oo, -sympy.oo):
        return False  # infinities only match structurally (x == y above)
    tol = REL_TOL if inexact else _EXACT_TOL
    syms = sorted(x.free_symbols | y.free_symbols, key=lambda s: s.name)
    points = [{}] if not syms else [
        {s: sympy.Float(base + step * k, 30) for k, s in enumerate(syms)} for base, step in _POINTS
    ]
    for pt in points:
        try:
            if not _close(x.evalf(30, subs=pt), y.evalf(30, subs=pt), tol):
                return False
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return False
    return True


def _scalar_equiv(p: str, r: str, p_pct: bool, r_pct: bool) -> bool:
    if p == r:
        return True
    if re.fullmatch(r"[A-E]", r):
        return choice_letter(p) == r
    pv, rv = _parse(p), _parse(r)
    if pv is None or rv is None:
        return False
    inexact = pv.inexact or rv.inexact
    preds = [pv.expr] + ([pv.expr / 100] if p_pct and not r_pct else [])
    refs = [rv.expr] + ([rv.expr / 100] if r_pct and not p_pct else [])
    return any(_exprs_equal(a, b, inexact) for a in preds for b in refs)


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
    if p[0] != r[0]:
        return False
    kind = r[0]
    if kind == "scalar":
        return _scalar_equiv(p[1], r[1], p_pct, r_pct)
    if kind == "seq":
        return (p[1:3] == r[1:3] and len(p[3]) == len(r[3]) <= MAX_ITEMS
                and all(_tree_equiv(a, b, p_pct, r_pct) for a, b in zip(p[3], r[3])))
    if kind == "set":
        return _matched(p[1], r[1], p_pct, r_pct)
    if kind == "matrix":
        return (len(p[1]) == len(r[1]) and all(len(a) == len(b) for a, b in zip(p[1], r[1]))
                and sum(len(a) for a in r[1]) <= MAX_ITEMS
                and all(_tree_equiv(x, y, p_pct, r_pct)
                        for a, b in zip(p[1], r[1]) for x, y in zip(a, b)))
    # equations: same relation up to sign when both sides parse
    if p[1] == r[1] and p[2] == r[2]:
        return True
    parts = [_parse(t) for t in (*p[1:], *r[1:])]
    if any(v is None for v in parts):
        return False
    inexact = any(v.inexact for v in parts)
    dp, dr = parts[0].expr - parts[1].expr, parts[2].expr - parts[3].expr
    return _exprs_equal(dp, dr, inexact) or _exprs_equal(dp, -dr, inexact)


def _equiv_one(pred: str, ref: str) -> bool:
    p, r = normalize(pred), normalize(ref)
    if p.text == r.text:
        return True
    pn, rn = plain_number(p.text), plain_number(r.text)
    if pn is not None and rn is not None:
        inexact = pn[1] or rn[1]
        a, b = pn[0], rn[0]
        return (numbers_equal(a, b, inexact)
                or (p.percent and not r.percent and numbers_equal(a / 100, b, inexact))
                or (r.percent and not p.percent and numbers_equal(a, b / 100, inexact)))
    return _tree_equiv(structure(p.text), structure(r.text), p.percent, r.percent)


def is_equiv(pred: str, ref: str | list[str]) -> bool:
    """True when `pred` matches the reference answer (or any of a list of them)."""
    refs = [str(ref)] if isinstance(ref, (str, int, float)) else [str(r) for r in ref]
    verdict = quick_verdict(pred, refs)
    if verdict is not None:
        return verdict
    for r in refs:
        try:
            if _equiv_one(pred, r):
                return True
        except (RecursionError, MemoryError, ValueError, TypeError, ZeroDivisionError,
                OverflowError, AttributeError):
            continue
    return False
