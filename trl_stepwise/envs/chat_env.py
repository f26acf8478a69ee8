"""TRL's tool-calling setups on the stepwise API: ``tools=`` callables and ``environment_factory`` objects, as chat.

A TRL environment has ``reset(**row) -> str | None`` (text appended to the last user message), public methods the
model calls as tools, and optionally ``get_reward() -> float``. ``ToolChatEnv`` plays one such episode as a chat: the
prompt is the row's messages with the tool schemas (rendered by the tokenizer's template, see
``trl_stepwise.chat_turns``); each assistant turn ends at the end-of-turn token; the calls it wrote in the template's
format are run (a turn's calls together, each bounded by ``tool_timeout_s``, see ``tool_runner``) and their
results come back as ``tool`` messages; a turn without calls, or ``max_tool_calling_iterations`` turns of calls,
ends the episode.

Steps inside a turn (lines, by default) are still steps: an environment that gives per-step rewards can give them,
and the algorithms see each turn as the steps it is made of. Bad calls (malformed JSON, an unknown tool, wrong
arguments, a tool that raises or hangs) come back to the model as the tool's error message; training goes on.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from trl_stepwise._awaitables import resolved
from trl_stepwise.envs.core import Env, StepResult
from trl_stepwise.envs.tool_calls import ToolCall
from trl_stepwise.envs.tool_runner import ToolOutcome, ToolRequest, ToolRunner, shared_runner

__all__ = ["AssistantTurn", "PendingToolMessages", "ToolChatEnv", "environment_tools", "is_trl_environment"]

_RESERVED = ("reset", "get_reward")


def is_trl_environment(obj: Any) -> bool:
    """TRL's convention: a ``reset`` method and no gym ``step``."""
    return callable(getattr(obj, "reset", None)) and not callable(getattr(obj, "step", None))


def environment_tools(env: Any) -> list[Callable[..., Any]]:
    """The public methods of a TRL environment, bound to it: its tools, listed on the class as TRL lists them (so that
    properties are not evaluated)."""
    names = [n for n, _ in inspect.getmembers(type(env), inspect.isfunction) if not n.startswith("_")]
    return [getattr(env, n) for n in names if n not in _RESERVED]


@dataclass
class AssistantTurn:
    """One assistant turn as the template's response format reads it: its text without the calls, and the calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        """The turn as a chat message, in transformers' tool-call form (what TRL's reward functions receive)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        calls = [c for c in self.tool_calls if c.error is None]
        if calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        return message


_background: ThreadPoolExecutor | None = None
_background_lock = threading.Lock()


def _background_pool() -> ThreadPoolExecutor:
    """Threads that wait on turns' tool calls (the calls themselves run on the tool runner)."""
    global _background
    with _background_lock:
        if _background is None:
            _background = ThreadPoolExecutor(max_workers=256, thread_name_prefix="tool-turn")
        return _background


class PendingToolMessages:
    """A turn's tool calls running in the background (``future``: their outcomes), so that the engine decodes other
    episodes meanwhile; ``messages()`` (on the rollout loop's thread) waits for them and records their messages."""

    def __init__(self, env: ToolChatEnv, calls: Sequence[ToolCall]) -> None:
        self.env, self.calls = env, list(calls)
        self.future: Future = _background_pool().submit(env.run_calls, self.calls)
        self._messages: list[dict[str, Any]] | None = None

    def messages(self) -> list[dict[str, Any]]:
        if self._messages is None:
            self._messages = self.env.tool_messages(self.calls, self.future.result())
        return self._messages


class ToolChatEnv(Env):
    """One episode of a tool-using chat: ``tools`` (plain or async callables) and/or a TRL environment instance.

    ``max_tool_calling_iterations`` (None: no limit) bounds the turns whose calls are run, as in TRL. The final
    reward is the environment's ``get_reward()`` when it has one (logged under its class name, as TRL logs it); the
    trainer's reward functions add theirs, and receive this episode's environment and messages.
    """

    chat = True  # the rollout loop renders the prompt from ``prompt_messages`` and reads each turn's tool calls
    defer_tool_calls = False  # set by a rollout loop whose engine decodes other episodes while the calls run
    max_steps = 10**9  # a chat is bounded by its token budget and its tool-calling turns, not by lines
    required_columns = ("prompt",)

    def __init__(
        self,
        env: Any = None,
        tools: Sequence[Callable[..., Any]] = (),
        max_tool_calling_iterations: int | None = None,
        max_episode_tokens: int | None = None,
        runner: ToolRunner | None = None,
    ) -> None:
        self.env = env
        self.standalone_tools = list(tools)
        self.max_tool_calling_iterations = max_tool_calling_iterations
        self.max_episode_tokens = max_episode_tokens
        self.runner = runner
        self.prompt_messages: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []  # the completion: assistant turns and tool results, as TRL has it
        self.tool_calls = self.tool_failures = 0

    @property
    def tool_functions(self) -> list[Callable[..., Any]]:
        """Every tool this episode offers, standalone tools first (as TRL orders them): their schemas go in the
        prompt."""
        methods = environment_tools(self.env) if self.env is not None else []
        return [*self.standalone_tools, *methods]

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        row = dict(options or {})
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = [dict(m) for m in (prompt or [{"role": "user", "content": str(row.get("question") or "")}])]
        if self.env is not None:
            reset_row = {k: v for k, v in row.items() if k != "environment"}
            observation = self.env.reset(**reset_row)
            if observation is not None:
                messages[-1] = {**messages[-1], "content": f"{messages[-1].get('content') or ''}{observation}"}
        self.prompt_messages = messages
        self.messages, self._turn, self._turns_with_calls = [], [], 0
        self.tool_calls = self.tool_failures = 0
        users = [m for m in messages if m.get("role") == "user"] or messages
        return str(users[-1].get("content") or ""), {"prompt_messages": messages}

    def step(self, action: str) -> StepResult:
        self._turn.append(str(action))
        if not getattr(action, "eos", False):
            return "", 0.0, False, False, {}
        turn = getattr(action, "turn", None) or AssistantTurn("".join(self._turn).strip())
        self._turn = []
        self.messages.append(turn.message())
        limit = self.max_tool_calling_iterations
        if turn.tool_calls and (limit is None or self._turns_with_calls < limit):
            self._turns_with_calls += 1
            if self.defer_tool_calls:
                pending = PendingToolMessages(self, turn.tool_calls)
                return pending, 0.0, False, False, {}  # type: ignore[return-value]  # resolved by the rollout loop
            replies = self.call_tools(turn.tool_calls)
            return replies, 0.0, False, False, {}  # type: ignore[return-value]  # messages: rendered by the template
        return self._finish()

    def call_tools(self, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """Run the turn's calls (together) and return one ``tool`` message per call, errors included."""
        return self.tool_messages(calls, self.run_calls(calls))

    def run_calls(self, calls: Sequence[ToolCall]) -> list[ToolOutcome]:
        """The outcomes of the turn's calls, run together (safe from any thread: it changes nothing here)."""
        tools = {getattr(fn, "__name__", str(fn)): fn for fn in self.tool_functions}
        requests = []
        for call in calls:
            error = call.error
            if error is None and call.name not in tools:
                error = f"unknown tool {call.name!r}; tools: {', '.join(tools) or 'none'}"
            requests.append(ToolRequest(tools.get(call.name), dict(call.arguments), call.name, error))
        return (self.runner or shared_runner()).run(requests)

    def tool_messages(self, calls: Sequence[ToolCall], outcomes: Sequence[ToolOutcome]) -> list[dict[str, Any]]:
        """One ``tool`` message per call (its result, or ``{"error": ...}``), recorded in the episode's messages."""
        self.tool_calls += len(calls)
        messages = []
        for call, outcome in zip(calls, outcomes, strict=True):
            self.tool_failures += outcome.error is not None
            result = outcome.result
            content = {"error": outcome.error} if outcome.error is not None else result
            content = content if isinstance(content, list) else str(content)
            messages.append({"role": "tool", "name": call.name or "unknown", "content": content})
        self.messages.extend(messages)
        return messages

    def _finish(self) -> StepResult:
        info: dict[str, Any] = {"tool_calls": self.tool_calls, "tool_failures": self.tool_failures}
        get_reward = getattr(self.env, "get_reward", None)
        if not callable(get_reward):
            return "", 0.0, True, False, {**info, "final_reward": 0.0, "reward_components": {}}
        reward = float(resolved(get_reward()))
        info["correct"] = reward > 0
        components = {type(self.env).__name__: reward}
        return "", reward, True, False, {**info, "final_reward": reward, "reward_components": components}

    def close(self) -> None:
        getattr(self.env, "close", lambda: None)()
