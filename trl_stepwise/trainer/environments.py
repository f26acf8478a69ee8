"""The trainer's environments: which one each row plays, built with the trainer's limits, calculator and rewards.

Kept out of the trainer so the rule is read in one place: a row's ``env`` column wins, else ``env=`` (an id, a class or
a factory; TRL's ``environment_factory`` as one or a dict), else the math environment of the trainer's flavour.
Registered ids (given to ``env=`` or named by rows) take the trainer's step limit, calculator and token budget.
TRL's tool-calling setups (``tools=``, and ``environment_factory`` objects: ``reset``, tool methods, no ``step``) are
played as chats (``ToolChatEnv``) with the trainer's token budget, ``max_tool_calling_iterations`` and tool runner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset

from trl_stepwise.chat_turns import ChatTurns
from trl_stepwise.envs import FLAVOURS, EnvRouter, MathEnv, as_env, make_limited, resolve_env_factory
from trl_stepwise.envs.chat_env import ToolChatEnv, is_trl_environment
from trl_stepwise.envs.tool_runner import ToolRunner
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
        tools: Sequence[Callable[..., Any]] | None = None,
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
        self.tools = list(tools or [])
        self.runner: ToolRunner | None = None
        self._chat_turns: ChatTurns | None = None
        # TRL's setups become chats: each factory whose objects are TRL environments, and tools= on their own
        self.chat_factories = {name for name, factory in self.named.items() if _makes_trl_environments(factory)}
        default_is_trl = callable(env) and not isinstance(env, str) and _makes_trl_environments(env)
        self.default_chat = default_is_trl or (env is None and not self.named and bool(self.tools))
        if self.tools and not (self.default_chat or self.chat_factories):
            raise ValueError(
                "tools=: tools are offered in tool-calling chats; pass them with environment_factory= (a class with "
                "reset and tool methods, as in TRL) or alone, not with a stepwise environment"
            )

    @property
    def all_chat(self) -> bool:
        """Whether every episode is a chat: the default environment, or (no default) every named one."""
        if self.default is None and self.named:
            return self.chat_factories == set(self.named)
        return self.default_chat

    @property
    def chat(self) -> bool:
        """Whether any episode is a tool-calling chat (the tokenizer's template must render tools)."""
        return self.default_chat or bool(self.chat_factories)

    def chat_turns(self, tokenizer: Any) -> ChatTurns | None:
        """The template's renderer and tool-call reader when any episode is a chat (built once; a template that
        cannot render tools is refused in one line)."""
        if self.chat and self._chat_turns is None and tokenizer is not None:
            args = self.args
            self._chat_turns = ChatTurns(tokenizer, args.tool_call_format, args.chat_template_kwargs)
        return self._chat_turns

    def chat_env(self, factory: EnvFactory | None, max_episode_tokens: int | None = None) -> ToolChatEnv:
        """One tool-calling chat episode: the TRL environment ``factory`` builds (None: ``tools=`` alone) with the
        trainer's tools, limits and runner."""
        args = self.args
        if self.runner is None:
            self.runner = ToolRunner(timeout_s=args.tool_timeout_s)
        return ToolChatEnv(
            factory() if factory is not None else None,
            self.tools,
            max_tool_calling_iterations=args.max_tool_calling_iterations,
            max_episode_tokens=max_episode_tokens or args.max_episode_tokens,
            runner=self.runner,
        )

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
        chats = {n: functools.partial(self.chat_env, self.named[n], max_episode_tokens) for n in self.chat_factories}
        named = {**math, **self.named, **chats}
        if isinstance(self.default, str):  # an id: the trainer's limits apply, as to the ids rows name
            default = named.get(self.default) or functools.partial(make_id, self.default)
        elif self.default_chat:
            default = functools.partial(self.chat_env, self.default, max_episode_tokens)
        else:
            default = self.default or math[self.flavour]
        return EnvRouter(default, named, make_id)

    def check_datasets(self, *datasets: Any) -> None:
        """Fail before training when a dataset row names an environment nobody can build (``env`` or TRL's
        ``environment`` column; a dict of datasets is checked set by set)."""
        for dataset in datasets:
            for subset in dataset.values() if isinstance(dataset, dict) else [dataset]:
                for column in ("env", "environment"):
                    if isinstance(subset, Dataset) and column in subset.column_names:
                        self.router().check([{column: name} for name in set(subset[column])])

    def default_settings(self) -> tuple[int, tuple[str, ...]]:
        """``(n_few_shot, required_columns)`` of the default environment: what it asks of prompts and datasets
        (``Env.n_few_shot``, ``Env.required_columns``), read from one instance of it."""
        if self.all_chat:
            return 0, ToolChatEnv.required_columns
        env = as_env(self.router()())
        try:
            return int(getattr(env, "n_few_shot", 0)), tuple(getattr(env, "required_columns", ()))
        finally:
            getattr(env, "close", lambda: None)()


def _makes_trl_environments(factory: EnvFactory) -> bool:
    """Whether ``factory`` builds TRL environments (probed on one instance, as TRL probes it)."""
    env = factory()
    trl = is_trl_environment(env)
    if not trl:  # a probed gym environment is closed; a TRL one has nothing to close
        getattr(env, "close", lambda: None)()
    return trl
