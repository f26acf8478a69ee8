"""Math with feedback: after a wrong final answer the environment says so and the policy may try again.

A real multi-turn environment: the reply ("That is not right. Check each step and answer again.") is appended to the
context as tokens the policy did not write, and the policy gets up to ``max_retries`` more attempts. The reward is
``discount ** wrong_attempts`` for a correct answer and 0 when every attempt failed, so per-step credit tells the
steps of a failed attempt from those of the attempt that fixed it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trl_stepwise import grading
from trl_stepwise.arithmetic import generate_problems
from trl_stepwise.envs.core import Env, StepResult, register
from trl_stepwise.envs.tools import CalculatorTool
from trl_stepwise.flavours import ANSWER_IS_PATTERN

__all__ = ["FEEDBACK", "MathFeedbackEnv"]

FEEDBACK = "That is not right. Check each step and answer again.\n"


class MathFeedbackEnv(Env):
    """A word problem (a dataset row, or the generated arithmetic problem of ``seed``), retried on wrong answers."""

    n_few_shot = 4
    required_columns = ("question", "answer")

    def __init__(
        self,
        max_retries: int = 2,
        discount: float = 0.5,
        feedback: str = FEEDBACK,
        max_steps: int = 16,
        level: int = 1,
        split: str = "train",
        calculator: bool = True,
        grade_timeout_s: float = 2.0,
    ) -> None:
        if max_retries < 0 or not 0 < discount <= 1:
            raise ValueError(f"need max_retries >= 0 and 0 < discount <= 1, got {max_retries} and {discount}")
        self.max_retries, self.discount, self.feedback, self.max_steps = max_retries, discount, feedback, max_steps
        self.level, self.split, self.grade_timeout_s = level, split, grade_timeout_s
        self.tools = (CalculatorTool(),) if calculator else ()
        self._answer_line = re.compile(ANSWER_IS_PATTERN)
        self._next = 0

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        row = dict(options or {})
        if "question" not in row:
            number = self._next if seed is None else seed
            (row,) = generate_problems(self.level, self.split, 1, start=number)
            self._next = number + 1
        self.question, self.answer = str(row["question"]), str(row["answer"])
        self.wrong_attempts = 0
        return self.question, {"row": row}

    def step(self, action: str) -> StepResult:
        if not self._answer_line.search(action):
            return "", 0.0, False, False, {}
        verdict = grading.grade_solution(str(action), self.answer, timeout_s=self.grade_timeout_s)
        info = {"attempt": self.wrong_attempts + 1, "verdict": verdict, "final_answer": verdict.prediction}
        if verdict.correct:
            return "", self.discount**self.wrong_attempts, True, False, info
        self.wrong_attempts += 1
        if self.wrong_attempts > self.max_retries:
            return "", 0.0, True, False, info
        return self.feedback, 0.0, False, False, {}


register("math_feedback", MathFeedbackEnv)
