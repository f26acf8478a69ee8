"""The stepwise math environment: the policy writes one reasoning step per `step()` and is graded at the end.

It works on text alone (token counts come from the caller), so a scripted list of step strings can drive it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trl_stepwise import calculator, grading
from trl_stepwise.envs.base import EndReason, Episode, Observation, Segment, StepRecord
from trl_stepwise.rewards import RewardFunc, combine_rewards, format_reward, unique_name

# The phrases grading.extract_final_answer reads, so an episode ends when (and only when) an answer is written.
ANSWER_IS_PATTERN = r"(?i)\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b[ \t]*:?[ \t]*(?:[^\s:.]|\.\d)"
BOXED_PATTERN = r"\\(?:boxed|fbox)\b[ \t]*\S"


@dataclass(frozen=True)
class Flavour:
    """Per-dataset defaults; `StepwiseMathEnv` arguments left as None take their value from here."""

    name: str
    answer_patterns: tuple[str, ...]
    max_steps: int
    calculator: bool


FLAVOURS: dict[str, Flavour] = {}


def register_flavour(flavour: Flavour, *, overwrite: bool = False) -> Flavour:
    """Add a flavour so `StepwiseMathEnv(flavour=name)` finds it; refuses to replace one silently."""
    if flavour.name in FLAVOURS and not overwrite:
        raise ValueError(f"flavour {flavour.name!r} is already registered (pass overwrite=True to replace it)")
    FLAVOURS[flavour.name] = flavour
    return flavour


register_flavour(Flavour("gsm8k", answer_patterns=(ANSWER_IS_PATTERN,), max_steps=10, calculator=True))
register_flavour(Flavour("arithmetic", answer_patterns=(ANSWER_IS_PATTERN,), max_steps=6, calculator=True))
register_flavour(Flavour("math", answer_patterns=(BOXED_PATTERN, ANSWER_IS_PATTERN), max_steps=15, calculator=False))

StepRewardFn = Callable[[str, list[str], str], float]


class StepwiseMathEnv:
    """One math problem per episode; ends on a final answer, EOS, the step limit or the token budget.

    Rewards: every step gets `step_reward_fn(question, previous_steps, step_text)` (0 without one). The final step
    additionally gets correctness (1/0) + `format_reward_weight` * format - `step_penalty` * number of steps +
    the weighted user reward functions, so the rewards returned by `step()` sum to the episode's return.
    """

    def __init__(
        self,
        flavour: str = "gsm8k",
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
    ) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {flavour!r}; registered: {sorted(FLAVOURS)}")
        defaults = FLAVOURS[flavour]
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
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if max_episode_tokens is not None and max_episode_tokens < 1:
            raise ValueError(f"max_episode_tokens must be >= 1 or None, got {max_episode_tokens}")
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"got {len(self.reward_funcs)} reward_funcs but {len(self.reward_weights)} reward_weights"
            )
        self._episode: Episode | None = None
        self._episodes_started = 0
        self._calc_calls = 0
        self._calc_errors = 0

    # -- gym-like API -------------------------------------------------------------------------------------------

    def reset(self, question: str, answer: str, **row: Any) -> Observation:
        """Start a new episode for one dataset row (TRL convention: `env.reset(**row)`)."""
        self._episode = Episode(
            episode_id=self._episodes_started,
            group_id=None,
            row={"question": question, "answer": answer, **row},
        )
        self._episodes_started += 1
        self._calc_calls = self._calc_errors = 0
        return self.observation()

    def step(
        self,
        step_text: str,
        *,
        eos: bool = False,
        num_tokens: int | None = None,
        segments: list[Segment] | None = None,
    ) -> tuple[Observation, float, bool, dict[str, Any]]:
        """Record one step; returns (observation, reward, done, info).

        `segments` split `step_text` into policy text and calculator inserts (default: all policy text). The text is
        recorded verbatim, so `episode.completion` stays equal to what the rollout engine decoded; a step that goes on
        without the delimiter (cut by a per-step token limit) is only flagged, as `info["step_truncated"]`.
        """
        episode = self._require_episode()
        if episode.done:
            raise RuntimeError(
                f"step() called on a finished episode (end_reason={episode.end_reason.value}); call reset() first"
            )
        segments = self._check_segments(step_text, segments)
        question = episode.row["question"]
        previous = [s.text for s in episode.steps]
        step_reward = float(self.step_reward_fn(question, previous, step_text)) if self.step_reward_fn else 0.0

        record = StepRecord(
            text=step_text,
            segments=segments,
            num_tokens=num_tokens,
            reward=step_reward,
            calc_calls=self._calc_calls,
            calc_errors=self._calc_errors,
        )
        episode.steps.append(record)
        episode.num_tokens += num_tokens or 0
        self._calc_calls = self._calc_errors = 0

        end_reason = self._end_reason(step_text, eos=eos)
        truncated = end_reason is None and not step_text.endswith(self.step_delimiter)

        reward = step_reward
        if end_reason is not None:
            reward += self._finish(end_reason)
        info = {
            "end_reason": episode.end_reason,
            "final_answer": episode.final_answer,
            "verdict": episode.verdict,
            "reward_components": dict(episode.reward_components),
            "final_reward": episode.final_reward,
            "step_reward": step_reward,
            "step_truncated": truncated,
            "calc_calls": record.calc_calls,
            "calc_errors": record.calc_errors,
            "num_steps": len(episode.steps),
            "num_tokens": episode.num_tokens,
        }
        return self.observation(), reward, episode.done, info

    def calculator_insert(self, partial_step: str) -> str | None:
        """Text to append when `partial_step` ends with a pending `<<expr=`; counts calls and errors for this step.

        Returns None when the calculator is off, nothing is pending, or the expression failed (counted as an error).
        """
        episode = self._require_episode()
        if episode.done:
            raise RuntimeError("calculator_insert() called on a finished episode; call reset() first")
        if not self.calculator:
            return None
        insert, result = calculator.completion_for(partial_step, timeout_s=self.calc_timeout_s)
        if result is None and insert is None:
            return None
        self._calc_calls += 1
        if insert is None:
            self._calc_errors += 1
        return insert

    def observation(self) -> Observation:
        """The current observation, without stepping."""
        episode = self._require_episode()
        return Observation(question=episode.row["question"], steps=[s.text for s in episode.steps], done=episode.done)

    @property
    def episode(self) -> Episode:
        return self._require_episode()

    @property
    def done(self) -> bool:
        return self._require_episode().done

    # -- internals ----------------------------------------------------------------------------------------------

    def _require_episode(self) -> Episode:
        if self._episode is None:
            raise RuntimeError("no episode yet: call reset(question=..., answer=...) first")
        return self._episode

    @staticmethod
    def _check_segments(step_text: str, segments: list[Segment] | None) -> list[Segment]:
        if segments is None:
            return [Segment(step_text, from_policy=True)] if step_text else []
        joined = "".join(s.text for s in segments)
        if joined != step_text:
            raise ValueError(f"segments join to {joined!r}, which differs from step_text {step_text!r}")
        return list(segments)

    def _end_reason(self, step_text: str, *, eos: bool) -> EndReason | None:
        """Priority: answer > eos > token_budget > max_steps."""
        episode = self._require_episode()
        if any(p.search(step_text) for p in self.answer_patterns):
            return EndReason.ANSWER
        if eos:
            return EndReason.EOS
        if self.max_episode_tokens is not None and episode.num_tokens >= self.max_episode_tokens:
            return EndReason.TOKEN_BUDGET
        if len(episode.steps) >= self.max_steps:
            return EndReason.MAX_STEPS
        return None

    def _finish(self, end_reason: EndReason) -> float:
        """Grade the completion, fill the episode's final fields and return the final reward."""
        episode = self._require_episode()
        completion = episode.completion
        verdict = grading.grade_solution(completion, str(episode.row["answer"]), timeout_s=self.grade_timeout_s)
        components = {
            "correctness_reward": float(verdict.correct),
            "format_reward": float(format_reward([completion])[0] or 0.0),
            "step_penalty": -self.step_penalty * len(episode.steps),
        }
        total = components["correctness_reward"] + self.format_reward_weight * components["format_reward"]
        total += components["step_penalty"]
        if self.reward_funcs:
            user_totals, user_components = combine_rewards(
                self.reward_funcs,
                self.reward_weights,
                [completion],
                [episode.row],
                prompts=[episode.row["question"]],
            )
            total += user_totals[0]
            for name, value in user_components[0].items():
                components[unique_name(name, components)] = value

        episode.end_reason = end_reason
        episode.verdict = verdict
        episode.final_answer = verdict.prediction
        episode.final_reward = total
        episode.reward_components = components
        return total
