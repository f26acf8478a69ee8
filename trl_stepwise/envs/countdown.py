"""Countdown: reach a target number with some given numbers and + - * /, each number used at most once.

The standard small-model RL task beyond grade-school math. Problems are generated from a seed (the generator builds
a random expression and keeps its value as the target, so every problem has a solution); the environment reads the
expression after "The answer is:" and checks it exactly: only the given numbers, each at most once, and an exact
(rational) value equal to the target. Worked solutions write one operation per line with the calculator.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from trl_stepwise import calculator
from trl_stepwise.envs.core import Env, StepResult, register
from trl_stepwise.envs.math_env import ANSWER_IS_PATTERN
from trl_stepwise.envs.tools import CalculatorTool

__all__ = ["CountdownEnv", "check_countdown", "countdown_dataset", "generate_countdown"]

SPLIT_SEEDS = {"train": 0, "fewshot": 5_000_000, "test": 9_000_000}  # disjoint seed ranges: splits never overlap
_ANSWER = re.compile(r"(?i)\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b[ \t]*:?[ \t]*([^\n]*)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPS = ("+", "-", "*", "/")


def _question(numbers: list[int], target: int) -> str:
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
                    "question": _question(numbers, target),
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


class CountdownEnv(Env):
    """One Countdown problem per episode; reward 1 for an exact expression, 0 otherwise. Calculator offered."""

    def __init__(self, split: str = "train", num_numbers: int = 3, max_steps: int = 6, calculator: bool = True):
        self.split, self.num_numbers, self.max_steps = split, num_numbers, max_steps
        self.tools = (CalculatorTool(),) if calculator else ()
        self._answer_line = re.compile(ANSWER_IS_PATTERN)
        self._next = 0

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        row = dict(options or {})
        if row.get("numbers") is None:
            number = self._next if seed is None else seed
            row = generate_countdown(SPLIT_SEEDS[self.split] + number, self.num_numbers)
            self._next = number + 1
        self.numbers, self.target = [int(n) for n in row["numbers"]], int(row["target"])
        question = row.get("question") or _question(self.numbers, self.target)
        return question, {"row": {**row, "question": question, "answer": str(self.target)}}

    def step(self, action: str) -> StepResult:
        if not self._answer_line.search(action):
            return "", 0.0, False, False, {}
        expression = _ANSWER.search(action).group(1)
        correct, reason = check_countdown(expression, self.numbers, self.target)
        info = {"correct": correct, "final_answer": expression.strip(), "reason": reason}
        return "", float(correct), True, False, info


register("countdown", CountdownEnv)
