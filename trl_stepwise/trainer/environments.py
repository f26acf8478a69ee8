"""The trainer's environments: which one each row plays, built with the trainer's limits, calculator and rewards.

Kept out of the trainer so the rule is read in one place: a row's ``env`` column wins, else ``env=`` (an id, a class or
a factory; TRL's ``environment_factory`` as one or a dict), else the math environment of the trainer's flavour.
Registered ids (given to ``env=`` or named by rows) take the trainer's step limit, calculator and token budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from trl_stepwise.envs import FLAVOURS, EnvRouter, MathEnv, as_env, make_limited, resolve_env_factory
from trl_stepwise.trainer.config import StepwiseReinforceConfig

__all__ = ["TrainerEnvironments"]

EnvFactory = Callable[[], Any]


class TrainerEnvironments:
    """``env=`` and ``environment_factory=`` as given to the trainer, resolved once; ``router(budget)`` per use."""

    def __init__(
        self,
        args: StepwiseReinforceConfig,
        env: str | type | EnvFactory | None,
        environment_factory: EnvFactory | dict[str, EnvFactory] | None,
    ) -> None:
        if env is not None and environment_factory is not None and not isinstance(environment_factory, dict):
            raise ValueError("pass env= or environment_factory=, not both (they name the same thing)")
        if isinstance(env, str):
            resolve_env_factory(env)  # an unknown id fails here; it stays an id so the trainer's limits apply
        elif env is not None:
            env = resolve_env_factory(env)
        self.named: dict[str, EnvFactory] = dict(environment_factory) if isinstance(environment_factory, dict) else {}
        if env is None and not isinstance(environment_factory, dict):
            env = environment_factory
        self.default = env
        self.args = args
        self.flavour = args.env_flavour or "gsm8k"

    def math_env(self, max_episode_tokens: int | None = None, flavour: str | None = None) -> MathEnv:
        """A fresh math environment for one episode, configured from the trainer's arguments (the trainer's reward
        functions are called once per rollout, batched, not per episode)."""
        args = self.args
        return MathEnv(
            flavour or self.flavour,
            step_delimiter=args.step_delimiter,
            max_steps=args.max_episode_steps,
            max_episode_tokens=max_episode_tokens or args.max_episode_tokens,
            calculator=args.calculator,
            format_reward_weight=args.format_reward_weight,
            step_penalty=args.step_penalty,
        )

    def router(self, max_episode_tokens: int | None = None) -> EnvRouter:
        """Each row's environment under a token budget (default: ``max_episode_tokens``)."""
        args = self.args
        math = {f: functools.partial(self.math_env, max_episode_tokens, f) for f in FLAVOURS}
        budget = max_episode_tokens or args.max_episode_tokens
        make_id = functools.partial(
            make_limited, max_episode_tokens=budget, max_steps=args.max_episode_steps, tools=args.calculator
        )
        named = {**math, **self.named}
        if isinstance(self.default, str):  # an id: the trainer's limits apply, as to the ids rows name
            default = named.get(self.default) or functools.partial(make_id, self.default)
        else:
            default = self.default or math[self.flavour]
        return EnvRouter(default, named, make_id)

    def default_settings(self) -> tuple[int, tuple[str, ...]]:
        """``(n_few_shot, required_columns)`` of the default environment: what it asks of prompts and datasets
        (``Env.n_few_shot``, ``Env.required_columns``), read from one instance of it."""
        env = as_env(self.router()())
        try:
            return int(getattr(env, "n_few_shot", 0)), tuple(getattr(env, "required_columns", ()))
        finally:
            getattr(env, "close", lambda: None)()
