"""The math flavours: one registry of per-dataset facts, read by the math environment, the prompts and the configs.

A flavour says how an episode of its problems ends and is prompted: the answer patterns that end it, its step limit,
whether the calculator is offered, the bundled system prompt, how worked solutions split into steps, and where worked
examples come from when a few-shot source has final answers only. ``register_flavour`` adds one; every part of the
package then accepts its name (``MathEnv(flavour=...)``, ``env_flavour=...``, ``PromptBuilder(flavour=...)``).

This module imports nothing from the package, so any layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ANSWER_IS_PATTERN",
    "BOXED_PATTERN",
    "FLAVOURS",
    "SOLUTION_FORMATS",
    "Flavour",
    "get_flavour",
    "register_flavour",
]

# The phrases grading.extract_final_answer reads, so an episode ends when (and only when) an answer is written.
ANSWER_IS_PATTERN = r"(?i)\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b[ \t]*:?[ \t]*(?:[^\s:.]|\.\d)"
BOXED_PATTERN = r"\\(?:boxed|fbox)\b[ \t]*\S"

# How a worked solution splits into steps: "lines" (GSM8K style: one step per line, ``#### N`` as the answer) or
# "latex" (MATH style: sentences and display formulas, the answer from ``\boxed{}``).
SOLUTION_FORMATS = ("lines", "latex")


@dataclass(frozen=True)
class Flavour:
    """Per-dataset defaults; ``MathEnv`` arguments left as None take their value from here.

    ``system_prompt``: a bundled prompt name or a file (``trl_stepwise.prompting.load_system_prompt``);
    ``solution_format``: one of ``SOLUTION_FORMATS``; ``worked_examples``: the ``(dataset, split)`` pairs of worked
    examples the prompt falls back on when the few-shot source has final answers only (a single pair is accepted;
    several alternate in the prompt, one from each in turn; empty: no fallback); ``worked_example_chars``: the
    fallback skips examples longer than this (question + solution), unless the user set ``max_example_chars``;
    ``worked_example_shots``: how many of them a prompt shows where the user did not say (None: the caller's default).
    """

    name: str
    answer_patterns: tuple[str, ...]
    max_steps: int
    calculator: bool
    system_prompt: str = "gsm8k"
    solution_format: str = "lines"
    worked_examples: tuple[tuple[str, str], ...] | tuple[str, str] | None = ()
    worked_example_chars: int | None = None
    worked_example_shots: int | None = None

    def __post_init__(self) -> None:
        pairs = self.worked_examples or ()
        if len(pairs) == 2 and all(isinstance(part, str) for part in pairs):
            pairs = (pairs,)
        object.__setattr__(self, "worked_examples", tuple(tuple(pair) for pair in pairs))
        if self.solution_format not in SOLUTION_FORMATS:
            raise ValueError(f"solution_format={self.solution_format!r}; choose one of {', '.join(SOLUTION_FORMATS)}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


FLAVOURS: dict[str, Flavour] = {}


def register_flavour(flavour: Flavour, *, overwrite: bool = False) -> Flavour:
    """Add a flavour so every part of the package accepts its name; refuses to replace one silently."""
    if flavour.name in FLAVOURS and not overwrite:
        raise ValueError(f"flavour {flavour.name!r} is already registered (pass overwrite=True to replace it)")
    FLAVOURS[flavour.name] = flavour
    return flavour


def get_flavour(name: str) -> Flavour:
    """The registered flavour ``name``; a ValueError naming the registered ones otherwise."""
    if name not in FLAVOURS:
        raise ValueError(f"unknown flavour {name!r}; registered: {', '.join(FLAVOURS)}")
    return FLAVOURS[name]


register_flavour(
    Flavour(
        "gsm8k",
        answer_patterns=(ANSWER_IS_PATTERN,),
        max_steps=10,
        calculator=True,
        # short real solutions alternating with generated one-step ones: the best pair for the embedded model both
        # untrained and after the main job (benchmarks/README.md, "Worked examples for a set with final answers only")
        worked_examples=(("gsm8k", "train"), ("arithmetic:level=1", "fewshot")),
        worked_example_chars=300,
        worked_example_shots=2,  # 4 of them: 6.6% against 11.1% for the untrained model on generated levels 1-3
    )
)
register_flavour(
    Flavour(
        "math",
        answer_patterns=(BOXED_PATTERN, ANSWER_IS_PATTERN),
        max_steps=15,
        calculator=False,
        system_prompt="math",
        solution_format="latex",
        worked_examples=("math", "train"),
    )
)
register_flavour(
    Flavour(
        "arithmetic",
        answer_patterns=(ANSWER_IS_PATTERN,),
        max_steps=6,
        calculator=True,
        system_prompt="arithmetic",  # GSM8K's calculator-style prompt
        worked_examples=("arithmetic", "fewshot"),
    )
)
