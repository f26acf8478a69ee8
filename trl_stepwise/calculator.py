"""Calculator tool for GSM8K-style ``<<expr=result>>result`` annotations written during generation.

The expression comes straight from a model being trained, so it is untrusted: nothing is ever ``eval``-ed (sympy's
``parse_expr`` calls ``eval`` internally, so it is not used either). The text is whitelisted to digits and arithmetic
operators, parsed with ``ast.parse`` (parsing only, no execution) and folded over exact ``Fraction``s. Powers are
size-checked before they are computed because one huge ``int.__pow__`` cannot be interrupted by any timeout.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

from trl_stepwise._timeout import Timeout, time_limit

__all__ = ["CALC_CLOSE", "CALC_OPEN", "CalcResult", "completion_for", "evaluate_expression", "pending_calculation"]

CALC_OPEN = "<<"
CALC_CLOSE = ">>"

MAX_EXPRESSION_CHARS = 200
MAX_RESULT_DIGITS = 1_000  # intermediate values: anything bigger is not a grade-school answer, and slow to format
MAX_INSERTED_DIGITS = 20  # a result is inserted as tokens: bigger ones are refused ("too_large"), never inserted
DECIMAL_PLACES = 4

_UNICODE_OPERATORS = str.maketrans({"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "^": "**"})
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+|\))\s*%")
_ALLOWED = re.compile(r"[\d.+\-*/() ]*")
_LETTER = re.compile(r"[^\W\d]", re.UNICODE)  # letters or underscore: names, attributes, calls

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b),  # GSM8K train has a couple of `560//10` annotations
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


@dataclass(frozen=True)
class CalcResult:
    """Outcome of one calculation: ``value`` is the formatted result, or None with ``error`` saying why."""

    expression: str
    value: str | None
    error: str | None  # syntax, unsafe, too_long, too_large, timeout, division_by_zero, complex


class _CalcError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _preprocess(expr: str) -> str:
    """Map the notations models write (``×``, ``÷``, ``^``, ``1,000``, ``50%``) onto plain Python arithmetic."""
    text = _THOUSANDS_COMMA.sub("", expr.strip().translate(_UNICODE_OPERATORS))
    text = _PERCENT.sub(lambda m: f"{m.group(1)}/100" if m.group(1) == ")" else f"({m.group(1)}/100)", text)
    if _LETTER.search(text):
        raise _CalcError("unsafe")
    if not _ALLOWED.fullmatch(text):
        raise _CalcError("syntax")
    return text


def _check_size(value: Fraction) -> Fraction:
    limit_bits = int(MAX_RESULT_DIGITS * math.log2(10))
    if value.numerator.bit_length() > limit_bits or value.denominator.bit_length() > limit_bits:
        raise _CalcError("too_large")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    """``base ** exponent``, refusing results too large to compute before computing them."""
    if exponent.denominator == 1:
        digits = max(len(str(abs(base.numerator))), len(str(base.denominator)))
        if base not in (0, 1, -1) and abs(exponent.numerator) * (digits - 1) > MAX_RESULT_DIGITS:
            raise _CalcError("too_large")
        if abs(exponent.numerator) > 10 * MAX_RESULT_DIGITS and base not in (0, 1, -1):
            raise _CalcError("too_large")  # e.g. 2 ** 100000: one-digit bases slip through the estimate above
        if base == 0 and exponent < 0:
            raise _CalcError("division_by_zero")
        return _check_size(base ** int(exponent))
    if base < 0:
        raise _CalcError("complex")  # (-8) ** (1/3) has no real principal value
    try:
        return _check_size(Fraction(float(base) ** float(exponent)))
    except OverflowError:
        raise _CalcError("too_large") from None


def _fold(node: ast.AST, source: str) -> Fraction:
    """Evaluate a whitelisted AST over exact rationals; any other node type is refused."""
    if isinstance(node, ast.Expression):
        return _fold(node.body, source)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(ast.get_source_segment(source, node))  # from the text: 0.1 stays exactly 1/10
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_fold(node.operand, source))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_fold(node.left, source), _fold(node.right, source))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _fold(node.left, source), _fold(node.right, source)
        if isinstance(node.op, (ast.Div, ast.FloorDiv)) and right == 0:
            raise _CalcError("division_by_zero")
        return _check_size(_BINARY[type(node.op)](left, right))
    raise _CalcError("syntax")


def _format_value(value: Fraction) -> str:
    """Integers as plain ints; other rationals rounded half-up to 4 decimals with trailing zeros stripped."""
    scale = 10**DECIMAL_PLACES
    scaled = (abs(value) * scale * 2 + 1) // 2  # round half away from zero
    if scaled == 0:
        return "0"
    whole, frac = divmod(int(scaled), scale)
    text = f"{whole}.{frac:0{DECIMAL_PLACES}d}".rstrip("0").rstrip(".")
    return f"-{text}" if value < 0 else text


def evaluate_expression(expr: str, timeout_s: float = 1.0) -> CalcResult:
    """Safely evaluate an arithmetic expression written by the model. Never raises."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        return CalcResult(expr, None, "too_long")
    try:
        with time_limit(timeout_s):
            source = _preprocess(expr)
            try:
                tree = ast.parse(source, mode="eval")
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                raise _CalcError("syntax") from None
            value = _fold(tree, source)
            if abs(value) >= 10**MAX_INSERTED_DIGITS:
                raise _CalcError("too_large")
            return CalcResult(expr, _format_value(value), None)
    except _CalcError as exc:
        return CalcResult(expr, None, exc.kind)
    except Timeout:
        return CalcResult(expr, None, "timeout")
    except (ArithmeticError, ValueError, RecursionError):
        return CalcResult(expr, None, "syntax")


def pending_calculation(text: str) -> tuple[str, str] | None:
    """``(expr, trigger)`` if ``text`` ends with an open calculation: ``...<<expr=`` or ``...<<expr>>``; else None.

    Only the last ``<<`` counts, and its expression must not already contain ``=`` (the calculation was completed) or a
    newline (a calculation never spans lines; a stray ``<<`` far back is not one).
    """
    start = text.rfind(CALC_OPEN)
    if start < 0:
        return None
    body = text[start + len(CALC_OPEN) :]
    for trigger in ("=", CALC_CLOSE):
        if body.endswith(trigger):
            expr = body[: -len(trigger)]
            if expr.strip() and "=" not in expr and CALC_CLOSE not in expr and "\n" not in expr:
                return expr, trigger
            return None
    return None


def stop_strings(step_text: str) -> tuple[str, ...]:
    """Where generation must pause for the calculator, given the step so far.

    No calculation open: at ``<<``. One open (``<<`` with no ``=``, ``>>`` or newline after it): at ``=`` or ``>>``,
    the two endings ``pending_calculation`` answers. An engine that stops only there lets the calculator act at
    exactly the token where a token-by-token loop would.
    """
    start = step_text.rfind(CALC_OPEN)
    if start >= 0:
        body = step_text[start + len(CALC_OPEN) :]
        if "=" not in body and CALC_CLOSE not in body and "\n" not in body:
            return ("=", CALC_CLOSE)
    return (CALC_OPEN,)


def completion_for(text: str, timeout_s: float = 1.0) -> tuple[str | None, CalcResult | None]:
    """The text to append to ``text`` to finish its pending calculation.

    ``"=" -> "{value}>>{value}"``, ``">>" -> "{value}"``; ``(None, None)`` when nothing is pending and
    ``(None, result)`` when the expression fails, so the caller can leave the text alone and count the failure.
    """
    pending = pending_calculation(text)
    if pending is None:
        return None, None
    expr, trigger = pending
    result = evaluate_expression(expr, timeout_s)
    if result.value is None:
        return None, result
    if trigger == "=":
        return f"{result.value}{CALC_CLOSE}{result.value}", result
    return result.value, result
