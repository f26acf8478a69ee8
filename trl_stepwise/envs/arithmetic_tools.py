"""A small tool-calling task, written as a TRL user writes one: word problems, an ``environment_factory`` class whose
methods are exact arithmetic, and reward functions that read the completions and the environments.

It is the tool recipe's task (``recipes/reinforce_tools.py``) and the side-by-side benchmark's
(``benchmarks/tool_trainers.py``): the same class, dataset and reward functions run on TRL's ``GRPOTrainer`` and on
``StepwiseReinforceTrainer`` unchanged. The problems are the generated arithmetic stories (never a real word-problem
set), posed as chat messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Dataset

from trl_stepwise.rewards import completion_text, correctness_reward

__all__ = ["SYSTEM_PROMPT", "ArithmeticTools", "arithmetic_tool_dataset", "correct_answer", "used_a_tool"]

SYSTEM_PROMPT = (
    "Solve the word problem. You may call the arithmetic tools for exact results. "
    "End with a line 'The answer is: <number>'."
)


class ArithmeticTools:
    """Exact arithmetic the model may call while it solves one problem."""

    def reset(self, **kwargs: Any) -> None:
        self.calls: list[str] = []

    def add(self, a: float, b: float) -> float:
        """Add two numbers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.calls.append("add")
        return a + b

    def subtract(self, a: float, b: float) -> float:
        """Subtract the second number from the first.

        Args:
            a: The number to subtract from.
            b: The number to subtract.
        """
        self.calls.append("subtract")
        return a - b

    def multiply(self, a: float, b: float) -> float:
        """Multiply two numbers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.calls.append("multiply")
        return a * b

    def divide(self, a: float, b: float) -> float:
        """Divide the first number by the second.

        Args:
            a: The dividend.
            b: The divisor (not zero).
        """
        self.calls.append("divide")
        return a / b


def arithmetic_tool_dataset(n: int = 256, level: str = "1", start: int = 0, split: str = "train") -> Dataset:
    """``n`` generated word problems of ``level`` (``1``, ``1-3``) as TRL's conversational rows: ``prompt`` (system +
    user) and ``answer``."""
    from trl_stepwise.data import load_math_dataset

    problems = load_math_dataset(f"arithmetic:level={level},n={n},start={start}", split=split)
    return Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": row["question"]},
                ],
                "answer": row["answer"],
            }
            for row in problems
        ]
    )


def correct_answer(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float | None]:
    """1.0 when the last assistant message's final answer matches the reference."""
    return correctness_reward([completion_text(c) for c in completions], answer)


def used_a_tool(environments: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
    """0.1 for an episode that called a tool at least once: a small push towards using them."""
    return [0.1 * bool(getattr(env, "calls", None)) for env in environments or []]
