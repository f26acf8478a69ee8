"""One episode of any ``Env`` as the rollout loop plays it, recorded into an ``Episode``.

The session owns what every environment shares: the step and token limits (an episode that reaches them is ended as
truncated), the tools (their calls counted per step), environment replies kept in the record as text the policy did
not write, and the split of the rewards into per-step rewards and the final reward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trl_stepwise.envs.base import EndReason, Episode, Segment, StepRecord
from trl_stepwise.envs.core import Env, StepText
from trl_stepwise.grading import Verdict

__all__ = ["EnvSession", "as_env"]


def as_env(env: Any) -> Env:
    """A gym-shaped environment; a TRL ``environment_factory`` object (``reset`` and tool methods, no ``step``) is
    played as a tool-calling chat (``ToolChatEnv``)."""
    from trl_stepwise.envs.chat_env import ToolChatEnv, is_trl_environment

    if is_trl_environment(env):
        return ToolChatEnv(env)
    if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
        raise TypeError(f"{type(env).__name__} is not an environment: it needs reset() and step()")
    return env


class EnvSession:
    """Reset ``env`` on a dataset row (``options=row``, ``seed=row.get("seed")``) and record the episode."""

    def __init__(
        self, env: Any, row: Mapping[str, Any], episode_id: int = 0, group_id: int | None = None, tools: bool = True
    ) -> None:
        self.env = as_env(env)
        seed = row.get("seed")
        problem, info = self.env.reset(seed=seed if isinstance(seed, int) else None, options=dict(row))
        self.problem = problem
        self.prompt_messages: list[dict] | None = info.get("prompt_messages")  # a chat environment's prompt
        record_row = dict(info.get("row") or row)
        record_row.setdefault("question", problem)
        self.episode = Episode(episode_id=episode_id, group_id=group_id, row=record_row)
        self.tools = list(getattr(self.env, "tools", ())) if tools else []
        self.max_steps: int = getattr(self.env, "max_steps", None) or 10**9
        self.max_episode_tokens: int | None = getattr(self.env, "max_episode_tokens", None)
        self._calls = self._errors = 0

    @property
    def done(self) -> bool:
        return self.episode.done

    # -- tools ------------------------------------------------------------------------------------------------------
    def stop_strings(self, step_text: str) -> tuple[str, ...]:
        """Every string at which some tool needs generation to pause."""
        stops: list[str] = []
        for tool in self.tools:
            stops.extend(s for s in tool.stop_strings(step_text) if s not in stops)
        return tuple(stops)

    def tool_insert(self, step_text: str) -> tuple[str | None, bool]:
        """``(text, checked)``: what to append when the step ends with a complete tool call (the first tool that
        answers; None: nothing) and whether the policy may write it itself (``Tool.checked``); counts calls."""
        if self.done:
            raise RuntimeError("tool_insert() called on a finished episode")
        for tool in self.tools:
            result = tool.insert(step_text)
            if result is None:
                continue
            self._calls += 1
            self._errors += result.error is not None
            return result.text or None, tool.checked
        return None, False

    # -- steps ------------------------------------------------------------------------------------------------------
    def step(
        self,
        text: str,
        *,
        eos: bool = False,
        num_tokens: int | None = None,
        segments: list[Segment] | None = None,
        context_full: bool = False,
        turn: Any = None,
    ) -> tuple[str | list[dict], bool]:
        """Hand one step to the environment; returns ``(reply, done)`` (the reply is empty once the episode ended).

        ``context_full``: the engine cannot extend the sequence any further; the episode ends there (the environment
        sees it as an end of turn) and is recorded as cut by the context limit unless the environment ended it.
        ``turn``: a chat environment's whole turn, read at its end. A chat environment that answers an end of turn
        (tool results, a user message) keeps the episode going, within the token budget."""
        episode = self.episode
        if episode.done:
            raise RuntimeError(f"step() on a finished episode (end_reason={episode.end_reason.value})")
        segments = list(segments) if segments is not None else ([Segment(text, True)] if text else [])
        record = StepRecord(text, segments, num_tokens, 0.0, self._calls, self._errors)
        self._calls = self._errors = 0
        episode.steps.append(record)
        episode.num_tokens += num_tokens or 0
        action = StepText(text, eos=eos or context_full, num_tokens=num_tokens, segments=segments, turn=turn)
        reply, reward, terminated, truncated, info = self.env.step(action)
        end = info.get("end_reason")
        if not (terminated or truncated):
            new_turn = eos and bool(reply) and getattr(self.env, "chat", False)
            if context_full:
                end = EndReason.CONTEXT_LIMIT
            elif eos and not new_turn:
                end = EndReason.EOS
            elif self.max_episode_tokens is not None and episode.num_tokens >= self.max_episode_tokens:
                end = EndReason.TOKEN_BUDGET
            elif len(episode.steps) >= self.max_steps:
                end = EndReason.MAX_STEPS
            if end is None:
                record.reward = float(reward)
                return reply or "", False
        elif context_full and end == EndReason.EOS:
            end = EndReason.CONTEXT_LIMIT  # the environment saw an end of turn; the engine had no room left
        final = float(info.get("final_reward", reward))
        record.reward = float(info.get("step_reward", float(reward) - final))
        self._finish(end or (EndReason.ANSWER if terminated else EndReason.MAX_STEPS), final, info)
        return "", True

    @property
    def chat(self) -> bool:
        """Whether the episode is a chat: its prompt is messages and its turns end at the end-of-turn token."""
        return self.prompt_messages is not None

    def add_reply(self, text: str, num_tokens: int) -> None:
        """Record the environment's reply (as the rollout inserted it) at the end of the last step."""
        record = self.episode.steps[-1]
        record.segments.append(Segment(text, from_policy=False))
        record.text += text
        self.episode.num_tokens += num_tokens

    def _finish(self, end: EndReason, final: float, info: Mapping[str, Any]) -> None:
        episode = self.episode
        verdict = info.get("verdict")
        if verdict is None and "correct" in info:
            answer = info.get("final_answer")
            verdict = Verdict(bool(info["correct"]), answer, None, "environment")
        episode.end_reason = EndReason(end)
        episode.verdict = verdict
        episode.final_answer = info.get("final_answer", verdict.prediction if verdict else None)
        episode.final_reward = final
        episode.reward_components = dict(info.get("reward_components") or {"environment_reward": final})


def play_scripted(
    make_env: Callable[[], Any], row: Mapping[str, Any], steps: list[str], eos_at_end: bool = True
) -> EnvSession:
    """Play ``steps`` (a scripted policy) in one episode, replies included in the record; for tests and checks."""
    session = EnvSession(make_env(), row)
    for text in steps:
        if session.done:
            break
        reply, _ = session.step(text)
        if reply:
            session.add_reply(reply, 0)
    if not session.done and eos_at_end:
        session.step("", eos=True)
    return session
