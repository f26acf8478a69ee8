"""Calculator: safe arithmetic, result formatting, hostile input, trigger detection and the GSM8K annotations."""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
from fractions import Fraction

import pytest

from trl_stepwise import calculator
from trl_stepwise.calculator import (
    CALC_CLOSE,
    CALC_OPEN,
    CalcResult,
    completion_for,
    evaluate_expression,
    pending_calculation,
)

DATA_DIR = pathlib.Path(os.environ.get("TRL_STEPWISE_DATA_DIR") or pathlib.Path(__file__).parents[1] / "data")
HANG_GUARD_S = 10.0  # generous: catches hangs, not a benchmark


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("48/2", "24"),
        ("3+4*2", "11"),
        ("(3+4)*2", "14"),
        ("10-25", "-15"),
        ("-3", "-3"),
        ("2.5*2", "5"),
        ("0.1+0.2", "0.3"),  # exact rationals: no 0.30000000000000004
        ("1.5+1.25", "2.75"),
        ("1/3", "0.3333"),
        ("2/3", "0.6667"),
        ("-2/3", "-0.6667"),
        ("1/8", "0.125"),
        ("5/2", "2.5"),
        ("2**10", "1024"),
        ("2^10", "1024"),
        ("2^3^2", "512"),  # right-associative, as in maths
        ("-2**2", "-4"),
        ("2**-2", "0.25"),
        ("4**0.5", "2"),
        ("2**0.5", "1.4142"),
        ("50%", "0.5"),
        ("20%*50", "10"),
        ("(3+2)%", "0.05"),
        ("3×4", "12"),
        ("12÷5", "2.4"),
        ("7−2", "5"),
        ("1,000*3", "3000"),
        ("1,000,000+1", "1000001"),
        ("1000*1000", "1000000"),
        (" 48 / 2 ", "24"),
        ("560//10", "56"),
        ("2.", "2"),
        (".5*4", "2"),
        ("0.00004", "0"),
        ("-0.00004", "0"),
        ("0.00005", "0.0001"),  # half away from zero
        ("2.99999", "3"),
        ("9" * 20, "9" * 20),  # the largest result that is inserted
    ],
)
def test_evaluate_expression(expr: str, value: str) -> None:
    assert evaluate_expression(expr) == CalcResult(expr, value, None)


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ("x+1", "unsafe"),
        ("__import__('os')", "unsafe"),
        ("__import__('os').system('echo hi')", "unsafe"),
        ("a.b", "unsafe"),
        ("(1).__class__", "unsafe"),
        ("abs(-1)", "unsafe"),
        ("1e3", "unsafe"),  # letters are refused outright, even e-notation
        ("1+", "syntax"),
        ("(1+2", "syntax"),
        ("", "syntax"),
        ("1,2", "syntax"),
        ("7%2", "syntax"),  # % is percent, never modulo
        ("[1]", "syntax"),
        ("1 < 2", "syntax"),
        ("1/0", "division_by_zero"),
        ("5/(3-3)", "division_by_zero"),
        ("0**-1", "division_by_zero"),
        ("(-8)**(1/3)", "complex"),
        ("9**9**9", "too_large"),
        ("10**100000", "too_large"),
        ("2**100000", "too_large"),
        ("(1/3)**5000", "too_large"),
        ("10**10**10", "too_large"),
        ("1" * 201, "too_long"),
        ("1" * 21, "too_large"),  # inserted results are capped at 20 digits: never hundreds of forced tokens
        ("9^1000", "too_large"),
        ("10**20", "too_large"),
    ],
)
def test_bad_expressions(expr: str, error: str) -> None:
    result = evaluate_expression(expr)
    assert result.value is None
    assert result.error == error


@pytest.mark.parametrize(
    "expr",
    ["9**9**9", "10**100000", "9^9^9^9", "(" * 99 + "1" + ")" * 99, "(" * 5_000 + "1" + ")" * 5_000, "-" * 199 + "1"]
    + ["9" * 10_000, "1+" * 5_000 + "1", "((2**100)**100)**100", "99**99**99"],
    ids=range(10),
)
def test_hostile_expressions_return_quickly(expr: str) -> None:
    start = time.perf_counter()
    result = evaluate_expression(expr)
    assert time.perf_counter() - start < HANG_GUARD_S
    assert result.expression == expr
    assert (result.value is None) != (result.error is None)


def test_deep_nesting_within_length_cap_still_evaluates() -> None:
    assert evaluate_expression("(" * 99 + "7" + ")" * 99).value == "7"
    assert evaluate_expression("-" * 199 + "1").value == "-1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48/2 = <<48/2=", ("48/2", "=")),
        ("She has <<3+4>>", ("3+4", ">>")),
        ("<<3+4>>", ("3+4", ">>")),
        ("<<48/2=24>>24", None),
        ("<<48/2=24>>", None),
        ("<<48/2=24>>24 clips. Then <<24*2=", ("24*2", "=")),
        ("<<48/2=24>>24 clips. Then 24*2 =", None),
        ("a = b", None),
        ("", None),
        ("<<=", None),
        ("<<  >>", None),
        ("<<48/2=2", None),
        ("<<48/2", None),
        ("<<1+1>>2 and x =", None),
        ("<<1+\n1=", None),
        ("Total: << 5 * 3 =", (" 5 * 3 ", "=")),
    ],
)
def test_pending_calculation(text: str, expected: tuple[str, str] | None) -> None:
    assert pending_calculation(text) == expected


def test_completion_for_both_triggers() -> None:
    insert, result = completion_for("Natalia sold 48/2 = <<48/2=")
    assert insert == "24>>24" and result == CalcResult("48/2", "24", None)
    insert, result = completion_for("so <<10/4>>")
    assert insert == "2.5" and result is not None and result.value == "2.5"
    text = "x = <<7*6="
    insert, _ = completion_for(text)
    assert text + insert == f"x = {CALC_OPEN}7*6=42{CALC_CLOSE}42"


def test_completion_for_nothing_pending_or_bad_expression() -> None:
    assert completion_for("48/2 = <<48/2=24>>24 clips") == (None, None)
    assert completion_for("no calculation here =") == (None, None)
    insert, result = completion_for("<<x+1=")
    assert insert is None and result == CalcResult("x+1", None, "unsafe")
    insert, result = completion_for("<<1/0>>")
    assert insert is None and result is not None and result.error == "division_by_zero"


def test_gsm8k_train_annotations_agree_with_calculator() -> None:
    path = DATA_DIR / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"bundled data not found: {path}")
    with path.open() as f:
        solutions = [json.loads(line)["answer"] for line in f]
    annotations = [m for s in solutions for m in re.findall(r"<<([^<>=]*)=([^<>=]*)>>", s)]
    assert len(annotations) > 20_000
    mismatches = []
    for expr, expected in annotations:
        value = evaluate_expression(expr).value
        if value is None or Fraction(value) != Fraction(expected.strip()):
            mismatches.append((expr, expected, value))
    share = 1 - len(mismatches) / len(annotations)
    print(f"GSM8K train annotations matched: {len(annotations) - len(mismatches)}/{len(annotations)} = {share:.4%}")
    assert share >= 0.98, mismatches[:20]


def test_stop_strings_pause_where_a_calculation_can_complete():
    """Without an open `<<` the engine pauses at `<<`; with one open, at `=` or `>>` (what completion_for answers)."""
    assert calculator.stop_strings("Ann has 4 pens") == ("<<",)
    assert calculator.stop_strings("4+5 = <<4+5") == ("=", ">>")
    assert calculator.stop_strings("4+5 = <<4+5=9>>9 and 2*3 = ") == ("<<",)
    assert calculator.stop_strings("<<x=") == ("<<",)  # a failed calculation cannot complete again
