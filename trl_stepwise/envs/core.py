"""The environment API, shaped after gymnasium: ``register`` / ``make`` ids, ``reset`` and a 5-tuple ``step``.

An action is the text of one step the policy wrote; an observation is text the environment adds to the context after
it (empty when it has nothing to say), or, from a chat environment (``chat = True``), chat messages the tokenizer's
template renders as a new turn; a chat environment that answers an end of turn keeps the episode going. ``reset``
returns the problem text the prompt is built from. The rollout loop appends a non-empty observation as tokens the
policy did not sample, masked from the loss.

gymnasium itself is not a dependency: ``Env`` keeps its method names and return shapes so gym-minded code and
wrappers read the same, without pulling numpy spaces into a text-only API.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trl_stepwise.envs.base import Segment
    from trl_stepwise.envs.chat_env import AssistantTurn
    from trl_stepwise.envs.tools import Tool

__all__ = [
    "Env",
    "EnvRouter",
    "EnvSpec",
    "StepText",
    "make",
    "make_limited",
    "register",
    "registry",
    "resolve_env_factory",
    "spec",
]

StepResult = tuple[str, float, bool, bool, dict[str, Any]]


class StepText(str):
    """An action: the step's text, plus what the rollout loop knows about it (environments may ignore the extras).

    ``eos``: the policy ended its turn; ``num_tokens``: tokens in the step (tool results included); ``segments``: the
    step split into policy text and tool results; ``turn``: at the end of a chat environment's turn, the whole turn
    as the template's response format reads it (its content and tool calls).
    """

    eos: bool
    num_tokens: int | None
    segments: list[Segment] | None
    turn: AssistantTurn | None

    def __new__(
        cls,
        text: str,
        *,
        eos: bool = False,
        num_tokens: int | None = None,
        segments: list[Segment] | None = None,
        turn: AssistantTurn | None = None,
    ) -> StepText:
        action = super().__new__(cls, text)
        action.eos, action.num_tokens, action.segments, action.turn = eos, num_tokens, segments, turn
        return action


class Env:
    """Base class of a language environment; subclass it and write ``reset`` and ``step``.

    Class attributes the rollout loop reads (override per instance as needed): ``tools`` (see
    ``trl_stepwise.envs.tools``), ``max_steps`` (the loop ends the episode as truncated after that many steps),
    ``max_episode_tokens`` (same for tokens; None: no budget) and ``step_delimiter`` (what ends a step). The trainer
    reads two more: ``n_few_shot`` (worked examples put before each problem when the config does not say; the
    problem text states the task, so 0 by default) and ``required_columns`` (the dataset columns ``reset`` reads
    from its row; a dataset lacking them is mapped to ``question`` / ``answer``, else it is passed as it is).
    """

    tools: Sequence[Tool] = ()
    n_few_shot: int = 0
    required_columns: tuple[str, ...] = ()
    max_steps: int = 10
    max_episode_tokens: int | None = None
    step_delimiter: str = "\n"
    spec: EnvSpec | None = None
    rng: random.Random

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        """Start an episode and return ``(problem_text, info)``; the same seed and options give the same start.

        Subclasses call ``super().reset(seed=seed)`` first to (re)seed ``self.rng``, as in gymnasium.
        """
        if seed is not None or not hasattr(self, "rng"):
            self.rng = random.Random(seed)
        return "", {}

    def step(self, action: str) -> StepResult:
        """Take one step's text; returns ``(observation, reward, terminated, truncated, info)``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (nothing by default)."""


@dataclass
class EnvSpec:
    """A registered id: what ``make`` builds and with which default keyword arguments."""

    id: str
    entry_point: Callable[..., Env] | str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def make(self, **kwargs: Any) -> Env:
        entry = self.entry_point
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            entry = getattr(importlib.import_module(module), name)
        env = entry(**{**self.kwargs, **kwargs})
        if isinstance(env, Env):
            env.spec = self
        return env


registry: dict[str, EnvSpec] = {}


def register(id: str, entry_point: Callable[..., Env] | str, *, overwrite: bool = False, **defaults: Any) -> EnvSpec:
    """Make ``make(id)`` build ``entry_point(**defaults)``; ``entry_point`` is a callable or ``"module:Name"``."""
    if id in registry and not overwrite:
        raise ValueError(f"environment id {id!r} is already registered (pass overwrite=True to replace it)")
    registry[id] = EnvSpec(id, entry_point, dict(defaults))
    return registry[id]


def spec(id: str) -> EnvSpec:
    if id not in registry:
        raise KeyError(f"unknown environment id {id!r}; registered: {sorted(registry)}")
    return registry[id]


def make(id: str, **kwargs: Any) -> Env:
    """A new environment of a registered id; ``kwargs`` override the registered defaults."""
    return spec(id).make(**kwargs)


def make_limited(
    id: str, max_steps: int | None = None, max_episode_tokens: int | None = None, tools: bool = True
) -> Env:
    """``make(id)`` with the caller's step and token limits (None: the environment's own) and, optionally, no tools."""
    env = make(id)
    if max_steps is not None:
        env.max_steps = max_steps
    if max_episode_tokens is not None:
        env.max_episode_tokens = max_episode_tokens
    if not tools:
        env.tools = ()
    return env


def resolve_env_factory(env: str | type | Callable[[], Any], **kwargs: Any) -> Callable[[], Any]:
    """A zero-argument factory from an id, an environment class or a factory (TRL's ``environment_factory``)."""
    if isinstance(env, str):
        spec(env)  # fail now, not at the first episode
        return lambda: make(env, **kwargs)
    if callable(env):
        return (lambda: env(**kwargs)) if kwargs else env
    raise TypeError(f"env must be an id, an environment class or a factory, got {type(env).__name__}")


class EnvRouter:
    """Each row's environment: the row's ``env`` id (or TRL's ``environment`` name), else the default factory.

    ``named`` maps names to factories (TRL's dict ``environment_factory``); a name not in it is a registered id. The
    rollout loop calls ``for_row(row)``; calling the router itself builds the default environment.
    """

    def __init__(
        self,
        default: Callable[[], Any],
        named: Mapping[str, Callable[[], Any]] | None = None,
        make_id: Callable[[str], Any] = make,
    ) -> None:
        self.default = default
        self.named = dict(named or {})
        self.make_id = make_id  # builds the registered ids rows name (e.g. with the trainer's step limits)

    def __call__(self) -> Any:
        return self.default()

    def name_of(self, row: Mapping[str, Any]) -> str | None:
        name = row.get("env") or row.get("environment")
        return None if name is None else str(name)

    def for_row(self, row: Mapping[str, Any]) -> Any:
        name = self.name_of(row)
        if name is None:
            return self.default()
        if name in self.named:
            return self.named[name]()
        return self.make_id(name)

    def check(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Fail before training when a row names an environment nobody can build."""
        unknown = {self.name_of(r) for r in rows} - {None, *self.named, *registry}
        if unknown:
            raise ValueError(
                f"rows name unknown environments {sorted(unknown)}; registered ids: {sorted(registry)}"
                + (f", environment_factory names: {sorted(self.named)}" if self.named else "")
            )
