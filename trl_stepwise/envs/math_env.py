"""The math environments (GSM8K, MATH, arithmetic): the policy writes one reasoning step per ``step()`` and the
solution is graded when the episode ends. Registered by flavour name: ``make("gsm8k")``, ``make("math")``,
``make("arithmetic")``.

The environment works on text alone (token counts come with the action), so a scripted list of step strings can drive
it (``trl_stepwise.envs.session.play_scripted``). ``reset(options=row)`` plays a dataset row; the arithmetic flavour
with no row draws the generated problem numbered by ``seed`` (else the next one). The calculator is offered as a tool.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trl_stepwise import grading
from trl_stepwise.arithmetic import generate_problems
from trl_stepwise.envs.base import EndReason, Segment
from trl_stepwise.envs.core import Env, StepResult, register
from trl_stepwise.envs.tools import CalculatorTool, Tool
from trl_stepwise.flavours import ANSWER_IS_PATTERN, BOXED_PATTERN, FLAVOURS, Flavour, get_flavour, register_flavour
from trl_stepwise.rewards import RewardFunc, combine_rewards, format_reward, unique_name

__all__ = [
    "ANSWER_IS_PATTERN",
    "BOXED_PATTERN",
    "FLAVOURS",
    "Flavour",
    "MathEnv",
    "StepRewardFn",
    "register_flavour",
]

StepRewardFn = Callable[[str, list[str], str], float]


class MathEnv(Env):
    """One math problem per episode; ends on a final answer, EOS, the token budget or the step limit.

    End conditions, checked after every step in this order: a final answer (an answer pattern of the flavour matches
    the step), the end of the policy's turn (``action.eos``), the token budget (``max_episode_tokens``, counted from
    ``action.num_tokens``) and ``max_steps``. Only a final answer ends the episode as ``terminated``; the others
    truncate it. The completion is graded either way (``grading.grade_solution``).

    Rewards: every step gets ``step_reward_fn(question, previous_steps, step_text)`` (0 without one). The final step
    additionally gets correctness (1/0) + ``format_reward_weight`` * format - ``step_penalty`` * number of steps +
    the weighted user reward functions, so the rewards returned by ``step()`` sum to the episode's return;
    ``info["step_reward"]`` and ``info["final_reward"]`` tell the two parts apart.

    Arguments left as None take the flavour's default (``trl_stepwise.flavours``). ``level``, ``split`` and ``start``
    choose the generated problems the arithmetic flavour draws when ``reset`` gets no question.
    """

    n_few_shot = 4  # worked examples of the flavour before each problem, unless the config says otherwise
    required_columns = ("question", "answer")

    def __init__(
        self,
        flavour: str = "gsm8k",
        *,
        step_delimiter: str = "\n",
        answer_patterns: Sequence[str] | None = None,
        max_steps: int | None = None,
        max_episode_tokens: int | None = None,
        calculator: bool | None = None,
        reward_funcs: Sequence[RewardFunc] | None = None,
        reward_weights: Sequence[float] | None = None,
        format_reward_weight: float = 0.0,
        step_penalty: float = 0.0,
        step_reward_fn: StepRewardFn | None = None,
        grade_timeout_s: float = 2.0,
        calc_timeout_s: float = 1.0,
        level: int = 1,
        split: str = "train",
        start: int = 0,
    ) -> None:
        defaults = get_flavour(flavour)
        self.flavour = flavour
        self.step_delimiter = step_delimiter
        patterns = defaults.answer_patterns if answer_patterns is None else tuple(answer_patterns)
        self.answer_patterns = [re.compile(p) for p in patterns]
        self.max_steps = defaults.max_steps if max_steps is None else max_steps
        self.max_episode_tokens = max_episode_tokens
        self.calculator = defaults.calculator if calculator is None else calculator
        self.reward_funcs = list(reward_funcs or [])
        self.reward_weights = [1.0] * len(self.reward_funcs) if reward_weights is None else list(reward_weights)
        self.format_reward_weight = format_reward_weight
        self.step_penalty = step_penalty
        self.step_reward_fn = step_reward_fn
        self.grade_timeout_s = grade_timeout_s
        self.calc_timeout_s = calc_timeout_s
        self.level, self.split = level, split
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if max_episode_tokens is not None and max_episode_tokens < 1:
            raise ValueError(f"max_episode_tokens must be >= 1 or None, got {max_episode_tokens}")
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"got {len(self.reward_funcs)} reward_funcs but {len(self.reward_weights)} reward_weights"
            )
        self._tools: tuple[Tool, ...] | None = None
        self._next_problem = start
        self._row: dict[str, Any] | None = None
        self._steps: list[str] = []
        self._num_tokens = 0
        self._end_reason: EndReason | None = None

    @property
    def tools(self) -> Sequence[Tool]:
        """The calculator (``<<expr=`` -> ``value>>value``) when it is on; assign to offer other tools instead."""
        if self._tools is not None:
            return self._tools
        return (CalculatorTool(self.calc_timeout_s),) if self.calculator else ()

    @tools.setter
    def tools(self, tools: Sequence[Tool]) -> None:
        self._tools = tuple(tools)

    # -- the environment API --------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        """Start an episode on the row ``options`` (``question``, ``answer`` and any other columns, which reward
        functions receive); returns ``(question, {"answer": ..., "row": ...})``."""
        super().reset(seed=seed)
        row = dict(options or {})
        if "question" not in row:
            if self.flavour != "arithmetic":
                raise ValueError(f"the {self.flavour!r} environment needs options={{'question', 'answer'}}")
            number = self._next_problem if seed is None else seed
            (row,) = generate_problems(self.level, self.split, 1, start=number)
            self._next_problem = number + 1
        if "answer" not in row:
            raise ValueError("reset() got a question without an answer: pass both in options")
        question, answer = row.pop("question"), row.pop("answer")
        self._row = {"question": question, "answer": answer, **row}
        self._steps, self._num_tokens, self._end_reason = [], 0, None
        return question, {"answer": answer, "row": dict(self._row)}

    def step(self, action: str) -> StepResult:
        """Take one step's text; ``action.eos``, ``action.num_tokens`` and ``action.segments`` (a ``StepText``) say
        whether the turn ended there, how many tokens it took and which parts the policy wrote.

        ``info["step_truncated"]`` flags a step that goes on without the delimiter (cut by a per-step token limit);
        once the episode ends, ``info`` carries ``end_reason``, ``final_answer``, ``verdict``, ``correct`` and the
        ``reward_components``.
        """
        row = self._require_row()
        if self._end_reason is not None:
            raise RuntimeError(
                f"step() called on a finished episode (end_reason={self._end_reason.value}); call reset() first"
            )
        step_text = str(action)
        eos = bool(getattr(action, "eos", False))
        num_tokens = getattr(action, "num_tokens", None)
        self._check_segments(step_text, getattr(action, "segments", None))
        step_reward = 0.0
        if self.step_reward_fn is not None:
            step_reward = float(self.step_reward_fn(row["question"], list(self._steps), step_text))
        self._steps.append(step_text)
        self._num_tokens += num_tokens or 0

        end_reason = self._end_reason_of(step_text, eos=eos)
        info: dict[str, Any] = {
            "end_reason": end_reason,
            "final_answer": None,
            "verdict": None,
            "reward_components": {},
            "final_reward": 0.0,
            "step_reward": step_reward,
            "step_truncated": end_reason is None and not step_text.endswith(self.step_delimiter),
            "num_steps": len(self._steps),
            "num_tokens": self._num_tokens,
        }
        if end_reason is None:
            return "", step_reward, False, False, info
        self._end_reason = end_reason
        final = self._grade(info)
        terminated = end_reason == EndReason.ANSWER
        return "", step_reward + final, terminated, not terminated, info

    # -- internals ------------------------------------------------------------------------------------------------

    def _require_row(self) -> dict[str, Any]:
        if self._row is None:
            raise RuntimeError("no episode yet: call reset(options={'question': ..., 'answer': ...}) first")
        return self._row

    @staticmethod
    def _check_segments(step_text: str, segments: list[Segment] | None) -> None:
        if segments is None:
            return
        joined = "".join(s.text for s in segments)
        if joined != step_text:
            raise ValueError(f"segments join to {joined!r}, which differs from the step's text {step_text!r}")

    def _end_reason_of(self, step_text: str, *, eos: bool) -> EndReason | None:
        """Priority: answer > eos > token_budget > max_steps."""
        if any(p.search(step_text) for p in self.answer_patterns):
            return EndReason.ANSWER
        if eos:
            return EndReason.EOS
        if self.max_episode_tokens is not None and self._num_tokens >= self.max_episode_tokens:
            return EndReason.TOKEN_BUDGET
        if len(self._steps) >= self.max_steps:
            return EndReason.MAX_STEPS
        return None

    def _grade(self, info: dict[str, Any]) -> float:
        """Grade the completion, fill the final fields of ``info`` and return the final reward."""
        row = self._require_row()
        completion = "".join(self._steps)
        verdict = grading.grade_solution(completion, str(row["answer"]), timeout_s=self.grade_timeout_s)
        components = {
            "correctness_reward": float(verdict.correct),
            "format_reward": float(format_reward([completion])[0] or 0.0),
            "step_penalty": -self.step_penalty * len(self._steps),
        }
        total = components["correctness_reward"] + self.format_reward_weight * components["format_reward"]
        total += components["step_penalty"]
        if self.reward_funcs:
            user_totals, user_components = combine_rewards(
                self.reward_funcs, self.reward_weights, [completion], [row], prompts=[row["question"]]
            )
            total += user_totals[0]
            for name, value in user_components[0].items():
                components[unique_name(name, components)] = value
        info.update(
            final_answer=verdict.prediction,
            verdict=verdict,
            correct=bool(verdict.correct),
            reward_components=components,
            final_reward=total,
        )
        return total


for _flavour in ("gsm8k", "math", "arithmetic"):
    register(_flavour, MathEnv, flavour=_flavour)
