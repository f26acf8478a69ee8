"""State types shared by environments, the rollout loop and the trainer: how an episode is recorded.

``EnvSession`` fills an ``Episode`` as it plays any environment; nothing here knows about models or tokens' ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trl_stepwise.grading import Verdict


class EndReason(str, Enum):
    """Why an episode ended; `str` so it logs and compares as plain text."""

    ANSWER = "answer"
    EOS = "eos"
    MAX_STEPS = "max_steps"
    TOKEN_BUDGET = "token_budget"
    CONTEXT_LIMIT = "context_limit"  # the engine's context (max model length) is full: truncated, not an EOS


@dataclass
class Segment:
    """A piece of a step; calculator-inserted text has `from_policy=False` so the loss can skip it."""

    text: str
    from_policy: bool


@dataclass
class StepRecord:
    """One step as the policy (plus any calculator inserts) wrote it."""

    text: str
    segments: list[Segment]
    num_tokens: int | None = None
    reward: float = 0.0
    calc_calls: int = 0
    calc_errors: int = 0


@dataclass
class Episode:
    """The record of one episode: what the trainer trains on and evaluation reports."""

    episode_id: int
    group_id: int | None
    row: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    end_reason: EndReason | None = None
    final_answer: str | None = None
    verdict: Verdict | None = None
    final_reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    num_tokens: int = 0

    @property
    def completion(self) -> str:
        """The full solution text, exactly as the steps concatenate."""
        return "".join(step.text for step in self.steps)

    @property
    def step_rewards(self) -> list[float]:
        """Per-step (process) rewards; the final reward is kept apart in `final_reward`."""
        return [step.reward for step in self.steps]

    @property
    def done(self) -> bool:
        return self.end_reason is not None

    @property
    def truncated(self) -> bool:
        """Cut for room (the token budget or the model's context), not ended by the policy or the environment:
        what TRL's ``mask_truncated_completions`` leaves out of the loss."""
        return self.end_reason in (EndReason.TOKEN_BUDGET, EndReason.CONTEXT_LIMIT)

    @property
    def correct(self) -> bool:
        """Graded correct (an episode not graded yet, or one that gave no answer, is not)."""
        return self.verdict is not None and bool(self.verdict.correct)
