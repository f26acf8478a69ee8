"""TRL's ``environment_factory`` environments, accepted as they are, on the stepwise API.

A TRL environment has ``reset(**row) -> str | None`` (text appended to the problem), public methods the model calls as
tools, and optionally ``get_reward() -> float``. Here each public method becomes a ``FunctionTool``
(``<method>arguments</method>``), the episode ends at a final answer line or end of turn, and ``get_reward`` gives the
final reward.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from trl_stepwise.envs.core import Env, StepResult
from trl_stepwise.envs.tools import FunctionTool
from trl_stepwise.flavours import ANSWER_IS_PATTERN

__all__ = ["TRLEnvironment", "is_trl_environment"]


def is_trl_environment(obj: Any) -> bool:
    """TRL's convention: a ``reset`` method and no gym ``step``."""
    return callable(getattr(obj, "reset", None)) and not callable(getattr(obj, "step", None))


_NUMERIC = {int: int, float: float, "int": int, "float": float}


def _text_call(method: Callable[..., Any]) -> Callable[[str], Any]:
    """Call ``method`` with the text between the tags: one parameter gets it whole; several take a JSON object or
    comma-separated values. Values of parameters annotated int/float are converted."""
    params = list(inspect.signature(method).parameters.values())

    def convert(param: inspect.Parameter, value: str) -> Any:
        kind = _NUMERIC.get(param.annotation) if isinstance(param.annotation, (type, str)) else None
        return kind(value) if kind else value

    def call(arguments: str) -> Any:
        if not params:
            return method()
        if arguments.startswith("{"):
            return method(**json.loads(arguments))
        if len(params) == 1:
            return method(convert(params[0], arguments))
        values = [v.strip() for v in arguments.split(",")]
        return method(*(convert(p, v) for p, v in zip(params, values, strict=False)))

    return call


class TRLEnvironment(Env):
    """Wrap one instance of a TRL environment class."""

    def __init__(self, env: Any, max_steps: int = 10, answer_pattern: str = ANSWER_IS_PATTERN) -> None:
        self.env = env
        self.max_steps = max_steps
        self.answer_pattern = re.compile(answer_pattern)
        names = [n for n, _ in inspect.getmembers(type(env), inspect.isfunction) if not n.startswith("_")]
        self.tools = tuple(
            FunctionTool(_text_call(getattr(env, n)), name=n) for n in names if n not in ("reset", "get_reward")
        )

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        row = dict(options or {})
        extra = self.env.reset(**row)
        problem = str(row.get("question") or row.get("prompt") or "")
        if extra:
            problem = f"{problem}\n\n{extra}" if problem else str(extra)
        return problem, {}

    def step(self, action: str) -> StepResult:
        if not (getattr(action, "eos", False) or self.answer_pattern.search(action)):
            return "", 0.0, False, False, {}
        reward = float(self.env.get_reward()) if callable(getattr(self.env, "get_reward", None)) else 0.0
        return "", reward, True, False, {"final_reward": reward, "correct": reward > 0}
