"""String normalisation of answers, and the cheap numeric verdict the parent process can give.

Everything here is regex/str work with linear-time patterns, safe to run on untrusted text in the
trainer process; sympy is not imported.
"""

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

MAX_ANSWER_CHARS = 2_000  # a longer extracted answer only matches a reference character for character

# Loose comparison for answers written with a decimal point (as Qwen2.5-Math's grader does).
REL_TOL = 1e-4

_TEXT_CMDS = ("\\text", "\\textbf", "\\textrm", "\\textit", "\\mathrm", "\\mathbf", "\\mbox",
              "\\textnormal", "\\mathit", "\\operatorname")
_UNITS = (
    "cm", "mm", "km", "m", "meters", "meter", "centimeters", "inches", "inch", "in", "feet", "foot",
    "ft", "yards", "yard", "miles", "mile", "mph", "units", "unit", "degrees", "degree", "dollars",
    "dollar", "cents", "cent", "hours", "hour", "minutes", "minute", "seconds", "second", "sec", "s",
    "days", "day", "weeks", "years", "kg", "g", "grams", "pounds", "lbs", "ounces", "liters", "mL",
    "ml", "sq", "square", "cubic", "people", "students", "ways", "points", "times", "pages", "eV",
    "J", "K", "Hz", "nm", "pc", "Mpc", "kpc", "AU", "W", "N", "Pa", "atm", "V",
)
# Each unit word is preceded by whitespace, so the repetition cannot split a word (no backtracking
# blow-up on hostile text: this runs in the trainer process, where nothing can kill it).
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
_INNER_SPACE = re.compile(r"(?<![a-zA-Z]) | (?![a-zA-Z])")


@dataclass(frozen=True)
class Norm:
    text: str
    percent: bool  # a % sign was removed


def _unwrap_text(s: str) -> str:
    """Replace \\text{X} (and friends) by X; a trailing one after other content is a unit: dropped."""
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
        trailing_unit = (before.strip() and not rest.strip(" ^{}23.")
                         and re.search(r"[\d}a-zA-Z)]\s*$", before) and re.search(r"[a-zA-Z]", inner))
        if trailing_unit and not re.fullmatch(r"\s*\(?[A-E]\)?\s*", inner):
            s = before
        else:
            s = before + inner + rest
    return s


@lru_cache(maxsize=65_536)
def normalize(answer: str) -> Norm:
    """Canonical spelling of an answer for string comparison (and for the parser)."""
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
    s = _UNIT_RE.sub("", s)
    s = _SPACE_RUN.sub(" ", s).strip()
    s = s.rstrip(".;:, ")
    s = _INNER_SPACE.sub("", s)
    s = _SINGLE_SCRIPT.sub(r"\1\2", s)
    s = s.replace("{,}", ",")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"^\\?\(([A-E])\\?\)$", r"\1", s)  # (C) -> C
    return Norm(s, percent)


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter a normalised prediction starts with, e.g. '(C) 12' -> 'C'."""
    m = _CHOICE.match(text)
    return m.group(1) if m else None


def plain_number(text: str) -> tuple[Fraction, bool] | None:
    """Exact value of an integer/decimal/simple fraction, and whether it was written inexactly."""
    if len(text) > 60:
        return None
    if _NUMBER.fullmatch(text):
        try:
            return Fraction(text), ("." in text or "e" in text.lower())
        except (ValueError, ZeroDivisionError):
            return None
    m = _SIMPLE_FRAC.fullmatch(text)
    if m:
        sign, a, b = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        if int(b) == 0:
            return None
        v = Fraction(int(a), int(b))
        return (-v if sign == "-" else v), False
    return None


def numbers_equal(a: Fraction, b: Fraction, inexact: bool) -> bool:
    if a == b:
        return True
    return inexact and abs(a - b) <= REL_TOL * max(abs(a), abs(b))


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
        if numbers_equal(pn[0], rn[0], pn[1] or rn[1]):
            return True
    return None if undecided else False
