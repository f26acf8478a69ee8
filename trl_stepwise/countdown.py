"""Countdown problems: reach a target number with some given numbers and + - * /, each number used at most once.

Problems are generated from a seed (the generator builds a random expression and keeps its value as the target, so
every problem has a solution), with a worked solution of one operation per line in the calculator's notation.
``check_countdown`` grades an expression exactly. The environment that plays them is ``trl_stepwise.envs.countdown``;
this module is data (``load_math_dataset("countdown:n=...")`` reads it) and imports no environment.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from trl_stepwise import calculator

__all__ = ["SPLIT_SEEDS", "check_countdown", "countdown_dataset", "countdown_question", "generate_countdown"]

SPLIT_SEEDS = {"train": 0, "fewshot": 5_000_000, "test": 9_000_000}  # disjoint seed ranges: splits never overlap
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPS = ("+", "-", "*", "/")


def countdown_question(numbers: list[int], target: int) -> str:
    listed = ", ".join(str(n) for n in numbers)
    return (
        f"Using the numbers {listed} (each at most once) and + - * /, write an expression equal to {target}. "
        "End with 'The answer is: <expression>'."
    )


def generate_countdown(seed: int, num_numbers: int = 3, max_number: int = 12, max_target: int = 200) -> dict:
    """One problem drawn from ``seed``: numbers, a reachable target and a worked solution (one operation a line)."""
    rng = random.Random(seed)
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        order = rng.sample(range(num_numbers), rng.randint(2, num_numbers))
        value, expr, lines = Fraction(numbers[order[0]]), str(numbers[order[0]]), []
        for index in order[1:]:
            op = rng.choice(_OPS)
            operand = numbers[index]
            new = {"+": value + operand, "-": value - operand, "*": value * operand, "/": value / operand}[op]
            if new.denominator != 1 or new <= 0:
                break
            shown = str(value)
            lines.append(f"{shown}{op}{operand} = <<{shown}{op}{operand}={new}>>{new}")
            expr = f"({expr}){op}{operand}" if op in "*/" and any(o in expr for o in "+-") else f"{expr}{op}{operand}"
            value = new
        else:
            if 1 <= value <= max_target and value not in numbers:
                target = int(value)
                solution = "\n".join(lines) + f"\n#### {expr}"
                return {
                    "question": countdown_question(numbers, target),
                    "answer": str(target),
                    "solution": solution,
                    "numbers": numbers,
                    "target": target,
                    "seed": seed,
                    "env": "countdown",
                }


def countdown_dataset(split: str = "train", n: int = 1000, start: int = 0, num_numbers: int = 3):
    """``n`` generated problems of one split as a ``datasets.Dataset`` (columns question, answer, solution, ...)."""
    import datasets

    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown countdown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    rows = [generate_countdown(SPLIT_SEEDS[split] + start + i, num_numbers) for i in range(n)]
    return datasets.Dataset.from_list(rows)


def check_countdown(expression: str, numbers: list[int], target: int) -> tuple[bool, str]:
    """``(correct, reason)``: only given numbers, each at most once, and an exact value equal to ``target``."""
    expression = expression.strip().rstrip(".").strip()
    if not expression:
        return False, "no_answer"
    used = _NUMBER.findall(expression)
    if any("." in u for u in used):
        return False, "not_a_given_number"
    if Counter(int(u) for u in used) - Counter(numbers):
        return False, "not_a_given_number"
    if not set(expression) <= set("0123456789+-*/() "):
        return False, "syntax"
    result = calculator.evaluate_expression(expression)
    if result.value is None:
        return False, result.error or "syntax"
    return (Fraction(result.value) == target, "equal" if Fraction(result.value) == target else "wrong_value")
