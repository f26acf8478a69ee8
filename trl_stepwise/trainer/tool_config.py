"""``ToolArguments``: tool-calling chats (TRL's ``tools=`` and ``environment_factory=``), a part of
``StepwiseReinforceConfig`` with TRL's names where TRL has them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolArguments:
    """How tool-calling episodes are rendered, read and bounded."""

    max_tool_calling_iterations: int | None = field(
        default=None,
        metadata={
            "help": "Maximum number of tool-calling turns when training an agent (TRL's name). If None, there is no "
            "limit: an episode ends at a turn with no tool calls or at its token budget (max_completion_length)."
        },
    )
    tool_call_format: str | None = field(
        default=None,
        metadata={
            "help": "How the model writes tool calls: 'auto' (None: the template's response schema where TRL knows "
            "the template, else read from what the template renders), 'hermes' (<tool_call>{json}</tool_call>, "
            'Qwen / Hermes / SmolLM3) or \'llama3\' ({"name": ..., "parameters": ...}). The trainer also takes a '
            "function text -> calls (see trl_stepwise.envs.tool_calls)."
        },
    )
    tool_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "Wall time one tool call may take; it holds for a call blocked in I/O or C (its error is the "
            "tool's result, training goes on)."
        },
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Additional keyword arguments to pass to the `apply_chat_template` function when generating "
            "completions (TRL's name)."
        },
    )
