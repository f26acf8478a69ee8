"""The math environments (GSM8K, MATH, arithmetic) on the gymnasium-shaped API, registered by flavour name.

``MathEnv`` runs a ``StepwiseMathEnv`` (the grader and its end conditions), so episodes end and score exactly as
before; the calculator is offered as a tool. ``reset(options=row)`` plays a dataset row; the arithmetic flavour
with no row draws the generated problem numbered by ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trl_stepwise.arithmetic import generate_problems
from trl_stepwise.envs.base import EndReason
from trl_stepwise.envs.core import Env, StepResult, register
from trl_stepwise.envs.math_env import StepwiseMathEnv
from trl_stepwise.envs.tools import CalculatorTool, Tool

__all__ = ["MathEnv"]


class MathEnv(Env):
    """One math problem per episode, graded at the end; ``info`` carries the verdict and reward components."""

    def __init__(self, flavour: str = "gsm8k", *, level: int = 1, split: str = "train", **kwargs: Any) -> None:
        self.core = kwargs.pop("core", None) or StepwiseMathEnv(flavour=flavour, **kwargs)
        self.level, self.split = level, split
        self._next_problem = 0

    @classmethod
    def wrap(cls, core: StepwiseMathEnv) -> MathEnv:
        """The gym-shaped view of an existing ``StepwiseMathEnv``."""
        return cls(core=core)

    @property
    def tools(self) -> Sequence[Tool]:
        return (CalculatorTool(self.core.calc_timeout_s),) if self.core.calculator else ()

    @property
    def max_steps(self) -> int:
        return self.core.max_steps

    @property
    def max_episode_tokens(self) -> int | None:
        return self.core.max_episode_tokens

    @property
    def step_delimiter(self) -> str:
        return self.core.step_delimiter

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        row = dict(options or {})
        if "question" not in row:
            if self.core.flavour != "arithmetic":
                raise ValueError(f"the {self.core.flavour!r} environment needs options={{'question', 'answer'}}")
            number = self._next_problem if seed is None else seed
            (row,) = generate_problems(self.level, self.split, 1, start=number)
            self._next_problem = number + 1
        if "answer" not in row:
            raise ValueError("reset() got a question without an answer: pass both in options")
        question, answer = row.pop("question"), row.pop("answer")
        self.core.reset(question, answer, **row)
        return question, {"answer": answer, "row": self.core.episode.row}

    def step(self, action: str) -> StepResult:
        _, reward, done, info = self.core.step(
            str(action),
            eos=getattr(action, "eos", False),
            num_tokens=getattr(action, "num_tokens", None),
            segments=getattr(action, "segments", None),
        )
        terminated = done and info["end_reason"] == EndReason.ANSWER
        if done:
            info["correct"] = bool(info["verdict"] and info["verdict"].correct)
        return "", reward, terminated, done and not terminated, info


for _flavour in ("gsm8k", "math", "arithmetic"):
    register(_flavour, MathEnv, flavour=_flavour)
