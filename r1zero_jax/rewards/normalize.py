"""String normalisation of answers, and the cheap verdict for plain numbers (no sympy).

Runs in the grader worker like every step that reads model text; the patterns are still linear-time
so that hostile text costs microseconds, not the row's CPU budget.
"""

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

# a longer extracted answer only matches a reference character for character
MAX_ANSWER_CHARS = 2_000
MAX_REPEAT_DIGITS = 30  # digits of a repeating decimal turned into a fraction
MAX_EXPONENT = 400  # of a plain e-notation number compared exactly (the parser refuses larger too)

# Numeric equality (shared by the plain-number path here and the sympy path in math_grader):
#
# - An exact reference (integer, fraction, radical, pi form, ...) accepts only a prediction of the
#   same exact value. A decimal in the prediction is read as the exact rational it spells, so 0.25
#   matches \frac14 and 2.0 matches 2, but 4.667 never matches \frac{14}{3}, 3.1416 never matches
#   \pi, and 13536.0 never matches 13535.
# - A reference written with decimals is matched at its own precision: the prediction must lie
#   less than half a unit of the reference's last digit away (0.7071 accepts \frac{\sqrt2}{2}, 3.14
#   accepts \pi and 3.14159 but not 3.1, 0.2 does not accept \frac14), relative to the least
#   precise decimal in the reference. A decimal whose digits after the point are all zeros (AMC
#   references stored as floats, "142.0") is exact.
#
# The paper's grader, for comparison (Liu et al. 2025 train with `understand_r1_zero.math_grader`,
# "fast" mode by default; read here in its published copy, sail-sg/oat-zero
# `analysis/math_grader.py`): Hendrycks' normalised string match, else per tuple element: two
# simple fractions only by identical text; integer-ness (float within 1e-7 of an integer) must
# agree, so 13536.0 vs 13535 and 0.99999 vs 1 fail; otherwise sympy.simplify(ref - pred) == 0 on
# the parsed text, an exact test, so 0.25 == 1/4 and 4.667 != 14/3 there too. It lower-cases text
# and turns " or " / " and " into commas. Its slow mode also asks HF math-verify. A helper with a
# relative 1e-4 tolerance exists in that file but is not on the fast path. Where we differ: a
# decimal reference is matched at its printed precision, not by exact equality.

_TEXT_CMDS = ("\\text", "\\textbf", "\\textrm", "\\textit", "\\mathrm", "\\mathbf", "\\mbox",
              "\\textnormal", "\\mathit", "\\operatorname")
_UNITS = (
    "cm", "mm", "km", "m", "meters", "meter", "centimeters", "inches", "inch", "in", "feet", "foot",
    "ft", "yards", "yard", "miles", "mile", "mph", "units", "unit", "degrees", "degree", "dollars",
    "dollar", "cents", "cent", "hours", "hour", "minutes", "minute", "seconds", "second", "sec",
    "s", "days", "day", "weeks", "years", "kg", "g", "grams", "pounds", "lbs", "ounces", "liters",
    "mL", "ml", "sq", "square", "cubic", "people", "students", "ways", "points", "times", "pages",
    "eV", "J", "K", "Hz", "nm", "pc", "Mpc", "kpc", "AU", "W", "N", "Pa", "atm", "V",
)
# Each unit word is preceded by whitespace, so the repetition cannot split a word (no backtracking
# blow-up on hostile text).
_UNIT_RE = re.compile(r"(?<=[\d}])(?:\s+(?:" + "|".join(_UNITS) + r")\b(?:\^?\{?[23]\}?)?)+\s*$")
_SPACES = re.compile(r"(?<!\\)\\[,;:! ]|~|\\quad|\\qquad")
_DROP = ("\\left", "\\right", "\\displaystyle", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\big",
         "\\Big")
_DEGREE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree|\\circ")
_PERCENT = re.compile(r"\\%|%")
_FRAC_CMD = re.compile(r"\\[dtc]frac")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_SHORT2 = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\d)")
_SINGLE_SCRIPT = re.compile(r"([\^_])\{(\w)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_SIMPLE_FRAC = re.compile(r"([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}|([-+]?\d+)/(\d+)")
_CHOICE = re.compile(r"\(?([A-E])\)?(?:$|[\s.:)])")
_SPACE_RUN = re.compile(r"\s+")
# A trailing \text{...} is a unit only when it is words (no connective) and at most a power follows.
_UNIT_WORDS = re.compile(r"\s*[a-zA-Z]+(?:\s*[/^]\s*\{?[a-zA-Z0-9]+\}?|\s+[a-zA-Z]+)*\s*")
_CONNECTIVE = re.compile(r"(?<![a-zA-Z\\])(?:or|and)(?![a-zA-Z])")
_UNIT_TAIL = re.compile(r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*\.?\s*")
_HEDGE_SEP = re.compile(r"\s*(?:\\lor|\\vee|;|(?<![a-zA-Z\\])(?:or|and)(?![a-zA-Z]))\s*")
_PLUS_MINUS = re.compile(r"±|\\pm(?![a-zA-Z])")
_MINUS_PLUS = re.compile(r"∓|\\mp(?![a-zA-Z])")
_REPEATING = re.compile(rf"(?<!\d)(\d{{0,{MAX_REPEAT_DIGITS}}})\.(\d{{0,{MAX_REPEAT_DIGITS}}})"
                        rf"\\(?:overline|bar|dot)\{{?(\d{{1,{MAX_REPEAT_DIGITS}}})\}}?")
_INNER_SPACE = re.compile(r"(?<![a-zA-Z]) | (?![a-zA-Z])")


@dataclass(frozen=True)
class Norm:
    text: str
    percent: bool  # a % sign was removed


def _unwrap_text(s: str) -> str:
    """Replace \\text{X} (and friends) by X; a trailing one of plain words after a value is a unit
    (or a noun such as "apples"): dropped. Anything else (digits, "or", "and") stays."""
    for _ in range(20):  # bounded: one wrapper per pass
        hit = min(((s.find(c + "{"), c) for c in _TEXT_CMDS if s.find(c + "{") >= 0), default=None)
        if hit is None:
            return s
        start, cmd = hit
        depth, j = 0, start + len(cmd)
        while j < len(s):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        else:
            return s
        inner, rest = s[start + len(cmd) + 1 : j], s[j + 1 :]
        before = s[:start]
        trailing_unit = (re.search(r"[\d}a-zA-Z)]\s*$", before) and _UNIT_TAIL.fullmatch(rest)
                         and _UNIT_WORDS.fullmatch(inner) and not _CONNECTIVE.search(inner)
                         and not re.fullmatch(r"\s*\(?[A-E]\)?\s*", inner))
        s = before if trailing_unit else before + inner + rest
    return s


def _repeating_to_fraction(m: re.Match) -> str:
    """0.1\\overline{6} -> exact fraction text: a.b(c) = (abc - ab) / (10^|b| (10^|c| - 1))."""
    whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
    num = int(whole + fixed + rep) - int(whole + fixed)
    den = 10 ** len(fixed) * (10 ** len(rep) - 1)
    return f"\\frac{{{num}}}{{{den}}}"


@lru_cache(maxsize=65_536)
def normalize(answer: str) -> Norm:
    """Canonical spelling of an answer for string comparison (and for the parser). Hedge words
    ("or", "and", ";", \\lor) become commas: a hedge is a list, never equal to a single value."""
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return Norm(s, False)
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    s = s.replace("\\dollar", "")
    s = _SPACES.sub(" ", s)
    for d in _DROP:
        s = s.replace(d, "")
    s = s.replace("\\{.", "\\{").replace(".\\}", "\\}")  # \left. \right. remnants
    s = _unwrap_text(s)
    s = _DEGREE.sub("", s)
    percent = bool(_PERCENT.search(s))
    s = _PERCENT.sub("", s)
    s = _FRAC_CMD.sub(r"\\frac", s)
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_SHORT2.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = _REPEATING.sub(_repeating_to_fraction, s)
    s = _PLUS_MINUS.sub(r"\\pm ", s)
    s = _MINUS_PLUS.sub(r"\\mp ", s)
    s = _UNIT_RE.sub("", s)
    s = _SPACE_RUN.sub(" ", s).strip()
    s = s.rstrip(".;:, ")
    s = _HEDGE_SEP.sub(", ", s)
    listed = bool(re.search(r",\s", s))  # "9, 300" is two answers, "9,300" one number
    s = _INNER_SPACE.sub("", s)
    s = _SINGLE_SCRIPT.sub(r"\1\2", s)
    s = s.replace("{,}", ",")
    if _THOUSANDS.fullmatch(s) and not listed:
        s = s.replace(",", "")
    s = re.sub(r"^\\?\(([A-E])\\?\)$", r"\1", s)  # (C) -> C
    return Norm(s, percent)


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter a normalised prediction starts with, e.g. '(C) 12' -> 'C'."""
    m = _CHOICE.match(text)
    return m.group(1) if m else None


def decimal_tolerance(whole: str, frac: str) -> Fraction:
    """Relative tolerance a reference decimal literal allows: half a unit of its last digit over its
    value; 0 for an exact literal (no digits after the point, or only zeros there)."""
    if not frac.strip("0"):
        return Fraction(0)
    value = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac), 10 ** len(frac))
    return Fraction(0) if value == 0 else Fraction(1, 2 * 10 ** len(frac)) / value


def plain_number(text: str) -> tuple[Fraction, Fraction] | None:
    """Exact value of an integer/decimal/simple fraction, and the relative tolerance it allows as a
    reference (0 when exact; see the rule at the top of this module)."""
    if len(text) > 60:
        return None
    if _NUMBER.fullmatch(text):
        mant, _, exp = text.lstrip("+-").lower().partition("e")
        if exp and abs(int(exp)) > MAX_EXPONENT:
            return None  # 1e9999999: building the Fraction alone would take seconds
        whole, _, frac = mant.partition(".")
        try:
            return Fraction(text), decimal_tolerance(whole, frac)
        except (ValueError, ZeroDivisionError):
            return None
    m = _SIMPLE_FRAC.fullmatch(text)
    if m:
        sign, a, b = ((m.group(1), m.group(2), m.group(3)) if m.group(2)
                      else ("", m.group(4), m.group(5)))
        if int(b) == 0:
            return None
        v = Fraction(int(a), int(b))
        return (-v if sign == "-" else v), Fraction(0)
    return None


def numbers_equal(pred: Fraction, ref: Fraction, ref_tol: Fraction) -> bool:
    """The numeric rule above: exact unless the reference is a decimal (then at its precision)."""
    return pred == ref or abs(pred - ref) < ref_tol * abs(ref)


def quick_verdict(pred: str, refs: list[str]) -> bool | None:
    """True/False when string or plain-number comparison settles it, else None (needs sympy)."""
    if len(pred) > MAX_ANSWER_CHARS:
        return any(pred.strip() == r.strip() for r in refs)
    p = normalize(pred)
    undecided = False
    for ref in refs:
        r = normalize(ref)
        if p.text == r.text:
            return True
        pn, rn = plain_number(p.text), plain_number(r.text)
        if pn is None or rn is None or p.percent != r.percent:
            undecided = True
            continue
        if numbers_equal(pn[0], rn[0], rn[1]):
            return True
    return None if undecided else False
