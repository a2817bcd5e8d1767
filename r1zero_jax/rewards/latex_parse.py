"""A small LaTeX-math parser that builds sympy objects directly.

Model output is untrusted: sympy's `sympify`/`parse_expr` run Python's `eval`, so they never see
it. This parser only recognises a fixed token set and calls sympy constructors on validated
pieces (ints from digit strings, named symbols, a fixed function table). Size guards refuse inputs
whose value would be huge (exponent towers, big factorials) before sympy evaluates them.
"""

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import sympy

from r1zero_jax.rewards.normalize import MAX_EXPONENT as MAX_LITERAL_EXPONENT, decimal_tolerance

MAX_TOKENS = 400
MAX_DEPTH = 60  # bracket nesting; deeper input is refused before recursion
MAX_DIGITS = 200  # digits in one literal
MAX_RESULT_DIGITS = 2_000  # decimal digits of a numeric power / factorial result
MAX_EXPONENT = 10_000
MAX_TOWER = 2  # a^{b^{x}} is accepted, a^{b^{c^{x}}} is not: evaluating taller towers can hang


class ParseError(ValueError):
    """The text is not math this parser accepts (the caller falls back to string comparison)."""


class TooBig(ParseError):
    """The expression would evaluate to something too large to compare safely."""


@dataclass(frozen=True)
class Parsed:
    expr: sympy.Expr
    rel_tol: Fraction  # as a reference: its least precise decimal literal's tolerance (0: exact)


_TOKEN = re.compile(
    r"(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
    r"|(?P<cmd>\\[a-zA-Z]+|\\[{}|])"
    r"|(?P<letter>[a-zA-Z])"
    r"|(?P<op>[-+*/^_()\[\]{}|!,=])"
    r"|(?P<space>\s+)"
)

_FUNCS = {
    "\\sin": sympy.sin, "\\cos": sympy.cos, "\\tan": sympy.tan, "\\sec": sympy.sec,
    "\\csc": sympy.csc, "\\cot": sympy.cot, "\\arcsin": sympy.asin, "\\arccos": sympy.acos,
    "\\arctan": sympy.atan, "\\sinh": sympy.sinh, "\\cosh": sympy.cosh, "\\tanh": sympy.tanh,
    "\\exp": sympy.exp, "\\ln": sympy.log, "\\log": sympy.log,
}
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
    "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi",
    "Omega",
}
_MUL = {"*", "\\cdot", "\\times", "\\ast"}
_DIV = {"/", "\\div"}
_OPEN = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}


def tokenize(text: str) -> list[tuple[str, str]]:
    out, pos, depth = [], 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "space":
            continue
        val = m.group()
        if val in _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                raise TooBig("nesting too deep")
        elif val in (")", "]", "}", "\\}"):
            depth -= 1
        out.append((kind, val))
        if len(out) > MAX_TOKENS:
            raise TooBig("expression too long")
    return out


def _number(text: str) -> tuple[sympy.Expr, bool, Fraction]:
    """Exact rational value of a decimal literal, whether it had a decimal point/exponent, and the
    relative tolerance it allows as a reference."""
    mant, _, exp = text.lower().partition("e")
    whole, _, frac = mant.partition(".")
    if len(whole) + len(frac) > MAX_DIGITS:
        raise TooBig("literal too long")
    e = int(exp) if exp else 0
    if abs(e) > MAX_LITERAL_EXPONENT:
        raise TooBig("literal exponent too large")
    value = sympy.Rational(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
    value = value * sympy.Rational(10) ** e
    return value, bool(frac or exp or "." in mant), decimal_tolerance(whole, frac)


def _tower(e: sympy.Expr) -> int:
    """Height of the tallest tower of symbolic exponents in e (x^2 is 0, 2^x is 1, 2^{2^x} is 2)."""
    if e.is_Pow or isinstance(e, sympy.exp):
        top = e.exp if e.is_Pow else e.args[0]
        return 0 if top.is_Number else 1 + _tower(top)
    return max((_tower(a) for a in e.args), default=0)


def _check_pow(base: sympy.Expr, exp: sympy.Expr) -> None:
    if exp.is_Number and abs(float(exp)) > MAX_EXPONENT:
        raise TooBig("exponent too large")
    if base.is_Number and exp.is_Number and base != 0:
        b = abs(float(base)) if abs(base) < 10**300 else 10.0**300
        if b != 1 and abs(float(exp) * math.log10(b)) > MAX_RESULT_DIGITS:
            raise TooBig("power too large")
    if not exp.is_Number and 1 + _tower(exp) > MAX_TOWER:
        raise TooBig("exponent tower")


class _Parser:
    def __init__(self, tokens):
        self.toks = tokens
        self.i = 0
        self.rel_tol = Fraction(0)
        self.abs_depth = 0

    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else (None, None)

    def next(self):
        tok = self.peek()
        if tok[0] is None:
            raise ParseError("unexpected end")
        self.i += 1
        return tok

    def expect(self, val):
        if self.next()[1] != val:
            raise ParseError(f"expected {val!r}")

    def parse(self) -> sympy.Expr:
        e = self.expr()
        if self.i != len(self.toks):
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return e

    def expr(self):
        left = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.next()[1]
            right = self.term()
            left = left + right if op == "+" else left - right
        return left

    def _starts_primary(self):
        kind, val = self.peek()
        if kind in ("num", "letter"):
            return True
        if kind == "cmd":
            return val not in _MUL | _DIV and val not in ("\\}", "\\|")
        if val == "|":
            return self.abs_depth == 0
        return val in ("(", "[", "{")

    def term(self):
        left = self.unary()
        while True:
            val = self.peek()[1]
            if val in _MUL:
                self.next()
                left = left * self.unary()
            elif val in _DIV:
                self.next()
                left = left / self.unary()
            elif self._starts_primary():
                left = left * self.power()
            else:
                return left

    def unary(self):
        val = self.peek()[1]
        if val == "-":
            self.next()
            return -self.unary()
        if val == "+":
            self.next()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek()[1] == "^":
            self.next()
            exp = self.script()
            _check_pow(base, exp)
            return sympy.Pow(base, exp)
        return base

    def script(self):
        """A super/subscript or \\frac argument: a braced group or one token."""
        kind, val = self.peek()
        if val == "{":
            self.next()
            e = self.expr()
            self.expect("}")
            return e
        if val in ("-", "+"):
            self.next()
            e = self.script()
            return -e if val == "-" else e
        if kind == "num" and len(val) > 1 and val[1].isdigit():
            # x^23 is x^2 * 3 in LaTeX: take one digit, leave the rest as a number token.
            self.toks[self.i] = ("num", val[1:])
            self.toks.insert(self.i, ("num", val[0]))
        return self.postfix()

    def postfix(self):
        e = self.primary()
        while self.peek()[1] == "!":
            self.next()
            if not (e.is_Integer and 0 <= e <= 500):
                raise TooBig("factorial argument")
            e = sympy.factorial(e)
        return e

    def group(self, close):
        e = self.expr()
        self.expect(close)
        return e

    def primary(self):
        kind, val = self.next()
        if kind == "num":
            value, decimal, tol = _number(val)
            self.rel_tol = max(self.rel_tol, tol)
            if not decimal and self.peek()[1] == "\\frac" and self._mixed_fraction_ahead():
                self.next()
                return value + self.script() / self.script()  # mixed number 2\frac{1}{2}
            return value
        if kind == "letter":
            return self.subscripted(val)
        if val in ("(", "[", "{"):
            return self.group({"(": ")", "[": "]", "{": "}"}[val])
        if val == "|":
            self.abs_depth += 1
            e = self.group("|")
            self.abs_depth -= 1
            return sympy.Abs(e)
        if kind == "cmd":
            return self.command(val)
        raise ParseError(f"unexpected {val!r}")

    def _mixed_fraction_ahead(self):
        t = [self.peek(k)[1] for k in range(1, 7)]
        return (t[0] == "{" and t[2] == "}" and t[3] == "{" and t[5] == "}"
                and self.peek(2)[0] == "num" and self.peek(5)[0] == "num"
                and t[1].isdigit() and t[4].isdigit())

    def subscripted(self, name):
        if self.peek()[1] == "_":
            self.next()
            kind, val = self.peek()
            if val == "{":
                self.next()
                parts = []
                while self.peek()[1] != "}":
                    parts.append(self.next()[1])
                    if len(parts) > 8:
                        raise ParseError("long subscript")
                self.next()
                sub = "".join(parts)
            else:
                sub = self.next()[1]
            return sympy.Symbol(f"{name}_{sub}")
        if name == "e":
            return sympy.E
        if name == "i":
            return sympy.I
        return sympy.Symbol(name)

    def command(self, val):
        if val == "\\frac" or val == "\\cfrac":
            num = self.script()
            return num / self.script()
        if val == "\\sqrt":
            if self.peek()[1] == "[":
                self.next()
                n = self.group("]")
                x = self.script()
                _check_pow(x, 1 / n if n != 0 else sympy.zoo)
                return sympy.root(x, n)
            return sympy.sqrt(self.script())
        if val == "\\binom":
            n, k = self.script(), self.script()
            if not (n.is_Integer and k.is_Integer and 0 <= n <= 2000):
                raise TooBig("binomial arguments")
            return sympy.binomial(n, k)
        if val == "\\pi":
            return sympy.pi
        if val == "\\infty":
            return sympy.oo
        if val in ("\\lvert", "\\vert"):
            self.abs_depth += 1
            e = self.expr()
            if self.next()[1] not in ("\\rvert", "\\vert", "|"):
                raise ParseError("unclosed absolute value")
            self.abs_depth -= 1
            return sympy.Abs(e)
        if val in _FUNCS:
            return self.function(val)
        if val[1:] in _GREEK:
            return self.subscripted(val[1:])
        raise ParseError(f"unsupported command {val}")

    def function(self, name):
        base = None
        power = None
        if name == "\\log" and self.peek()[1] == "_":
            self.next()
            base = self.script()
        if self.peek()[1] == "^":
            self.next()
            power = self.script()
        if self.peek()[1] == "(":
            self.next()
            arg = self.group(")")
        else:
            arg = self.power()
        f = _FUNCS[name]
        if f is sympy.exp:
            _check_pow(sympy.E, arg)
        out = sympy.log(arg, base) if base is not None else f(arg)
        if power is not None:
            _check_pow(out, power)
            out = out**power
        return out


def parse_latex(text: str) -> Parsed:
    """sympy expression of a normalised answer string; raises ParseError/TooBig."""
    p = _Parser(tokenize(text))
    if not p.toks:
        raise ParseError("empty")
    try:
        expr = p.parse()
    except (ZeroDivisionError, OverflowError, RecursionError, TypeError) as e:
        raise ParseError(str(e)) from e
    return Parsed(expr, p.rel_tol)
