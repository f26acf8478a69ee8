"""``ArithmeticWordProblemEnv``: the stepwise math environment over generated arithmetic word problems.

``reset()`` with no problem draws the next generated problem of its level and split (seeded, reproducible), so the
environment can be used on its own, gym-style; ``reset(**row)`` with a dataset row works like any flavour.
"""

from __future__ import annotations

from typing import Any

from trl_stepwise.arithmetic import generate_problems
from trl_stepwise.envs.base import Observation
from trl_stepwise.envs.math_env import StepwiseMathEnv


class ArithmeticWordProblemEnv(StepwiseMathEnv):
    """Generated problems of one difficulty level; training, few-shot and test splits never share a question."""

    def __init__(self, level: int = 1, split: str = "train", start: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("flavour", "arithmetic")
        super().__init__(**kwargs)
        self.level = level
        self.split = split
        self._cursor = start

    def reset(self, question: str | None = None, answer: str | None = None, **row: Any) -> Observation:
        if question is None:
            (row,) = generate_problems(self.level, self.split, 1, start=self._cursor)
            self._cursor += 1
            question, answer = row.pop("question"), row.pop("answer")
        if answer is None:
            raise ValueError("reset() got a question without an answer: pass both, or neither to draw a problem.")
        return super().reset(question, answer, **row)
