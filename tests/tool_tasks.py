"""The tool-calling task the tests share, written as TRL's documentation writes them: an ``environment_factory``
class (``reset``, a documented tool method, ``get_reward``) and a standalone documented tool function."""

from __future__ import annotations


class DoublingTask:
    """A TRL ``environment_factory`` environment: the model should call ``double(21)``."""

    observation = " You may call double."  # appended to the last user message at reset

    def reset(self, **row):
        self.calls = []
        return None if row.get("quiet") else self.observation

    def double(self, x: int) -> int:
        """Twice a number.

        Args:
            x: The number to double.
        """
        self.calls.append(x)
        return 2 * x

    def get_reward(self) -> float:
        return float(self.calls == [21])


def multiply(a: int, b: int) -> int:
    """Multiply two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b
