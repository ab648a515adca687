"""A small, safe parser for linear contrast expressions such as ``group.patient - group.control``.

No ``eval``: a tokenizer and a recursive-descent parser over the grammar

.. code-block:: text

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := ("+" | "-") factor | NUMBER | NAME | "(" expr ")"

where ``NAME`` is ``[A-Za-z_][A-Za-z0-9_.]*`` (pybids column names such as ``group.patient`` or
``subject.01``). Every sub-expression is kept as a linear form ``sum_i w_i * name_i + c``; a
product of two non-constant forms, or a division by one, is rejected as non-linear.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_.]*"
_TOKENS = re.compile(
    rf"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>{NAME_PATTERN})"
    r"|(?P<op>[-+*/()]))"
)


class ExpressionError(ValueError):
    """The expression is malformed or not linear. The message says where."""


@dataclass(frozen=True)
class LinearForm:
    """``sum(coefs[name] * name) + constant``, names in order of first appearance."""

    coefs: dict[str, float] = field(default_factory=dict)
    constant: float = 0.0

    def is_constant(self) -> bool:
        return not any(self.coefs.values())

    def scaled(self, factor: float) -> LinearForm:
        return LinearForm({k: v * factor for k, v in self.coefs.items()}, self.constant * factor)

    def plus(self, other: LinearForm) -> LinearForm:
        coefs = dict(self.coefs)
        for name, value in other.coefs.items():
            coefs[name] = coefs.get(name, 0.0) + value
        return LinearForm(coefs, self.constant + other.constant)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    """Split ``text`` into (kind, value, position) tokens; kind is number, name or op."""
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKENS.match(text, pos)
        if match is None or match.end() == pos:
            bad = text[pos:].lstrip()[:1]
            col = len(text) - len(text[pos:].lstrip())
            raise ExpressionError(f"unexpected character {bad!r} at position {col + 1} in {text!r}")
        kind = match.lastgroup or "op"
        tokens.append((kind, match.group(kind), match.start(kind)))
        pos = match.end()
    return tokens


class _Parser:
    """Recursive-descent parser; one instance per expression (it keeps a cursor)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _fail(self, what: str) -> ExpressionError:
        token = self._peek()
        where = f"at position {token[2] + 1}" if token else "at the end"
        return ExpressionError(f"{what} {where} in {self.text!r}")

    def parse(self) -> LinearForm:
        if not self.tokens:
            raise ExpressionError("the expression is empty")
        form = self._expr()
        if self._peek() is not None:
            raise self._fail(f"unexpected {self._peek()[1]!r}")  # type: ignore[index]
        if not all(math.isfinite(v) for v in (form.constant, *form.coefs.values())):
            raise ExpressionError(f"{self.text!r} overflows: its numbers are too large")
        return form

    def _expr(self) -> LinearForm:
        form = self._term()
        while (token := self._peek()) is not None and token[1] in "+-" and token[0] == "op":
            self.index += 1
            right = self._term()
            form = form.plus(right if token[1] == "+" else right.scaled(-1.0))
        return form

    def _term(self) -> LinearForm:
        form = self._factor()
        while (token := self._peek()) is not None and token[1] in "*/" and token[0] == "op":
            self.index += 1
            right = self._factor()
            if token[1] == "*":
                if form.is_constant():
                    form = right.scaled(form.constant)
                elif right.is_constant():
                    form = form.scaled(right.constant)
                else:
                    raise ExpressionError(
                        f"{self.text!r} is not linear: it multiplies two column names "
                        f"(at position {token[2] + 1})"
                    )
            else:
                if not right.is_constant():
                    raise ExpressionError(
                        f"{self.text!r} is not linear: it divides by a column name "
                        f"(at position {token[2] + 1})"
                    )
                if right.constant == 0:
                    raise ExpressionError(f"{self.text!r} divides by zero")
                form = form.scaled(1.0 / right.constant)
        return form

    def _factor(self) -> LinearForm:
        token = self._peek()
        if token is None:
            raise self._fail("expected a number, a column name or '('")
        kind, value, _ = token
        self.index += 1
        if kind == "number":
            if not math.isfinite(float(value)):
                raise ExpressionError(f"the number {value} in {self.text!r} is too large")
            return LinearForm({}, float(value))
        if kind == "name":
            return LinearForm({value: 1.0}, 0.0)
        if value in "+-":
            inner = self._factor()
            return inner if value == "+" else inner.scaled(-1.0)
        if value == "(":
            inner = self._expr()
            closing = self._peek()
            if closing is None or closing[1] != ")":
                raise self._fail("expected ')'")
            self.index += 1
            return inner
        self.index -= 1
        raise self._fail(f"unexpected {value!r}")


def parse_linear(text: str) -> LinearForm:
    """Parse a linear expression over column names.

    Parameters
    ----------
    text : str
        e.g. ``"group.patient - group.control"``, ``"(a + b)/2 - c"``, ``"-1/3"``.

    Returns
    -------
    LinearForm
        Coefficients per name (names in order of first appearance, zero terms kept) and the
        constant term.

    Raises
    ------
    ExpressionError
        Syntax error, product of two names, division by a name or by zero.

    Examples
    --------
    >>> parse_linear("group.patient - group.control").coefs
    {'group.patient': 1.0, 'group.control': -1.0}
    >>> parse_linear("(a + b)/2 - 2*c").coefs
    {'a': 0.5, 'b': 0.5, 'c': -2.0}
    >>> parse_linear("-1/4").constant
    -0.25
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected a string expression, got {type(text).__name__}")
    return _Parser(text).parse()


def parse_constant(text: str) -> float | None:
    """Value of an expression without column names (``"1/3"`` -> 0.333...), else None.

    Raises ExpressionError when the text is not a valid expression at all.
    """
    form = parse_linear(text)
    return form.constant if form.is_constant() and not form.coefs else None
