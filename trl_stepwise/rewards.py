"""Built-in reward functions in TRL's batched signature, and the one place rewards are weighted and summed.

A reward function is called as TRL's `GRPOTrainer` calls it: `fn(prompts=..., completions=..., completion_ids=...,
trainer_state=..., log_metric=..., log_extra=..., **columns) -> list[float | None]`, where each dataset column
arrives as a list aligned with `completions`, so the same functions work in TRL and here. A function without
`**kwargs` gets only the arguments it names (the early form `fn(completions, answer)` keeps working). `None` means
"not applicable": it adds 0 to the total and is left out of the per-function components.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trl_stepwise._awaitables import resolved
from trl_stepwise.grading import extract_final_answer, grade_solution

RewardFunc = Callable[..., Sequence[float | None]]

# Columns TRL never forwards to reward functions as dataset columns; we pass them explicitly instead.
_RESERVED_COLUMNS = frozenset({"prompt", "prompts", "completion", "completions", "completion_ids"})


def completion_text(completion: Any) -> str:
    """Plain text of a completion, which TRL gives as a string or as a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content") or "")
    raise TypeError(f"completion must be a string or a list of chat messages, got {type(completion).__name__}")


def correctness_reward(completions: Sequence[Any], answer: Sequence[str | None], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's final answer matches the reference, else 0.0; None where there is no reference."""
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    return [
        None if ref is None else float(grade_solution(completion_text(c), str(ref)).correct)
        for c, ref in zip(completions, answer, strict=True)
    ]


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when a final answer can be extracted ("The answer is: X" or \\boxed{X}), so the model learns to finish."""
    return [float(extract_final_answer(completion_text(c)) is not None) for c in completions]


def as_reward_funcs(reward_funcs: Callable[..., Any] | Sequence[Callable[..., Any]] | None) -> list[Callable]:
    """TRL's ``reward_funcs``: one function or a list of them; a reward model named by a string is refused in one
    line (this trainer scores with functions)."""
    funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs or [])
    for func in funcs:
        if not callable(func):
            raise ValueError(
                f"reward_funcs={func!r}: StepwiseReinforceTrainer takes reward functions (TRL's signature: "
                "fn(prompts, completions, **columns) -> list[float]); load a reward model inside one instead."
            )
    return funcs


def reward_name(func: Callable[..., Any]) -> str:
    """The key a reward function's score is logged under (its __name__, as in TRL)."""
    return getattr(func, "__name__", None) or type(func).__name__


def unique_name(name: str, taken: Mapping[str, Any] | set[str]) -> str:
    """`name`, or `name_2`, `name_3`, ... so two functions with the same __name__ don't overwrite each other."""
    if name not in taken:
        return name
    index = 2
    while f"{name}_{index}" in taken:
        index += 1
    return f"{name}_{index}"


def combine_rewards(
    funcs: Sequence[RewardFunc],
    weights: Sequence[float] | None,
    completions: Sequence[Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    prompts: Sequence[Any] | None = None,
    **extra: Any,
) -> tuple[list[float], list[dict[str, float]]]:
    """Call every function once on the whole batch and return weighted totals plus unweighted components.

    `rows[i]` holds the dataset columns of `completions[i]`; they are passed as column lists (`answer=[...]`).
    `extra` (TRL's `completion_ids`, `trainer_state`, `log_metric`) is passed to every function as given.
    `components[i]` maps each function's name to its raw score for completion i, omitting `None` scores.
    """
    if weights is None:
        weights = [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"got {len(funcs)} reward functions but {len(weights)} weights")
    if len(rows) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(rows)} rows")
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(prompts)} prompts")

    keys = [key for key in dict.fromkeys(k for row in rows for k in row) if key not in _RESERVED_COLUMNS]
    columns: dict[str, list[Any]] = {key: [row.get(key) for row in rows] for key in keys}
    if prompts is not None:
        columns["prompts"] = list(prompts)
    columns.update(extra)

    totals = [0.0] * len(completions)
    components: list[dict[str, float]] = [{} for _ in completions]
    names: set[str] = set()
    for func, weight in zip(funcs, weights, strict=True):
        name = unique_name(reward_name(func), names)
        names.add(name)
        scores = list(_call(func, completions=list(completions), **columns))
        if len(scores) != len(completions):
            raise ValueError(
                f"reward function {name!r} returned {len(scores)} scores for {len(completions)} completions"
            )
        for i, score in enumerate(scores):
            if score is None:
                continue
            totals[i] += float(weight) * float(score)
            components[i][name] = float(score)
    return totals, components


def _call(func: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``func`` with the keyword arguments it accepts (all of them when it takes ``**kwargs``); an async
    function (TRL accepts them) is run to its result."""
    return resolved(_call_sync(func, **kwargs))


def _call_sync(func: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature: pass everything
        return func(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return func(**kwargs)
    return func(**{key: value for key, value in kwargs.items() if key in parameters})
