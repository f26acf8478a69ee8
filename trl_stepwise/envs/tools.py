"""Tools an environment offers: the policy writes a call, the loop pauses there and inserts the result.

A tool says where generation must pause for it (``stop_strings``, given the step so far) and what to append when the
step ends with a complete call (``insert``). The result is appended as tokens the policy did not sample, so it is
masked from the loss. ``FunctionTool`` turns a plain function into a tool with the call syntax
``<name>arguments</name>``; its result follows the closing tag. The calculator is one ``Tool`` among others.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from trl_stepwise import calculator

__all__ = ["CalculatorTool", "FunctionTool", "Tool", "ToolResult", "tool"]


@dataclass(frozen=True)
class ToolResult:
    """One call: ``text`` to insert (None: insert nothing) and ``error`` when the call failed."""

    text: str | None
    error: str | None = None


class Tool:
    """Base class: a tool pauses generation at its ``stop_strings`` and completes a pending call with ``insert``."""

    name: str = "tool"
    # The policy can write the result itself (the calculator's value): a streaming engine runs on through the call and
    # the rollout keeps what follows when it is exactly the result's tokens (masked), else cuts there and inserts it.
    checked: bool = False

    def stop_strings(self, step_text: str) -> tuple[str, ...]:
        """Where the engine must pause so that ``insert`` is asked at the right token."""
        return ()

    def insert(self, step_text: str) -> ToolResult | None:
        """The result to append when ``step_text`` ends with a complete call; None when no call is pending."""
        return None


class CalculatorTool(Tool):
    """GSM8K-style ``<<expr=`` -> ``value>>value``; a failed expression inserts nothing and counts as an error."""

    name = "calculator"
    checked = True

    def __init__(self, timeout_s: float = 1.0) -> None:
        self.timeout_s = timeout_s

    def stop_strings(self, step_text: str) -> tuple[str, ...]:
        return calculator.stop_strings(step_text)

    def insert(self, step_text: str) -> ToolResult | None:
        text, result = calculator.completion_for(step_text, timeout_s=self.timeout_s)
        if result is None:
            return None
        return ToolResult(text, result.error)


class FunctionTool(Tool):
    """A function called as ``<name>arguments</name>``; its result (``str(fn(arguments))``) follows the close tag.

    The call gets ``timeout_s`` of wall time and its result at most ``max_chars`` characters (longer: an error
    instead). A function that raises inserts ``error: <Type>: <message>`` so the policy sees what went wrong.
    """

    def __init__(
        self, fn: Callable[[str], object], name: str | None = None, timeout_s: float = 1.0, max_chars: int = 200
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not re.fullmatch(r"[A-Za-z_][\w-]*", self.name):
            raise ValueError(f"tool name {self.name!r} must be a word (letters, digits, _ or -)")
        self.open, self.close = f"<{self.name}>", f"</{self.name}>"
        self.timeout_s = timeout_s
        self.max_chars = max_chars

    def _pending(self, step_text: str) -> str | None:
        start = step_text.rfind(self.open)
        if start < 0 or not step_text.endswith(self.close):
            return None
        arguments = step_text[start + len(self.open) : -len(self.close)]
        return None if self.close in arguments or "\n" in arguments else arguments

    def stop_strings(self, step_text: str) -> tuple[str, ...]:
        start = step_text.rfind(self.open)
        if start >= 0 and self.close not in step_text[start:]:
            return (self.close,)
        return (self.open,)

    def insert(self, step_text: str) -> ToolResult | None:
        arguments = self._pending(step_text)
        if arguments is None:
            return None
        from trl_stepwise.envs.tool_runner import ToolRequest, shared_runner

        # A worker thread with a deadline: the timeout holds even when the function is blocked in I/O or in C
        # (``time_limit`` alone waits for the next bytecode). str() runs there too, under the same limit.
        text = arguments.strip()
        request = ToolRequest(lambda: str(self.fn(text)), {}, self.name)
        outcome = shared_runner().run([request], timeout_s=self.timeout_s)[0]
        if outcome.error_type == "timeout":
            return ToolResult(f" error: {self.name} took longer than {self.timeout_s:g}s", "timeout")
        if outcome.error is not None:  # the policy's arguments are untrusted: any failure is shown, not raised
            return ToolResult(f" error: {outcome.error}", outcome.error_type)
        text = outcome.result
        if len(text) > self.max_chars:
            return ToolResult(f" error: result longer than {self.max_chars} characters", "too_large")
        return ToolResult(f" {text}")


def tool(name: str | None = None, timeout_s: float = 1.0, max_chars: int = 200) -> Callable[..., FunctionTool]:
    """Decorator: ``@tool()`` over ``def convert(arguments: str) -> str`` makes a ``FunctionTool``."""

    def wrap(fn: Callable[[str], object]) -> FunctionTool:
        return FunctionTool(fn, name=name, timeout_s=timeout_s, max_chars=max_chars)

    return wrap
