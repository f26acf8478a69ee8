"""Countdown as an environment: the policy writes operations with the calculator, then ``The answer is: <expr>``.

The standard small-model RL task beyond grade-school math. The environment reads the expression after "The answer
is:" and checks it exactly (``trl_stepwise.countdown.check_countdown``): only the given numbers, each at most once,
and an exact (rational) value equal to the target. Without a row it draws the generated problem numbered by ``seed``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trl_stepwise.countdown import SPLIT_SEEDS, check_countdown, countdown_question, generate_countdown
from trl_stepwise.envs.core import Env, StepResult, register
from trl_stepwise.envs.tools import CalculatorTool
from trl_stepwise.flavours import ANSWER_IS_PATTERN

__all__ = ["CountdownEnv"]

_ANSWER = re.compile(r"(?i)\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b[ \t]*:?[ \t]*([^\n]*)")


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
        question = row.get("question") or countdown_question(self.numbers, self.target)
        return question, {"row": {**row, "question": question, "answer": str(self.target)}}

    def step(self, action: str) -> StepResult:
        if not self._answer_line.search(action):
            return "", 0.0, False, False, {}
        expression = _ANSWER.search(action).group(1)
        correct, reason = check_countdown(expression, self.numbers, self.target)
        info = {"correct": correct, "final_answer": expression.strip(), "reason": reason}
        return "", float(correct), True, False, info


register("countdown", CountdownEnv)
