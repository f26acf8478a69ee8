"""Language environments: the gymnasium-shaped API (``register`` / ``make`` / ``reset`` / ``step``), tools, the
registered environments and the state types the rollout loop records episodes in.

Every environment is an ``Env``, played one episode at a time by an ``EnvSession`` (the rollout loop, evaluation and
``play_scripted`` all use it). The math environments are ``MathEnv`` with a flavour (``gsm8k``, ``math``,
``arithmetic`` or one added with ``register_flavour``). TRL's tool-calling setups (``tools=``, ``environment_factory``)
are played as chats in the template's own tool format (``ToolChatEnv``).
"""

from trl_stepwise.envs.base import EndReason, Episode, Segment, StepRecord
from trl_stepwise.envs.chat_env import AssistantTurn, ToolChatEnv
from trl_stepwise.envs.core import (
    Env,
    EnvRouter,
    EnvSpec,
    StepText,
    make,
    make_limited,
    register,
    registry,
    resolve_env_factory,
    spec,
)
from trl_stepwise.envs.countdown import CountdownEnv  # registers "countdown"
from trl_stepwise.envs.feedback import MathFeedbackEnv  # registers "math_feedback"
from trl_stepwise.envs.math_env import FLAVOURS, Flavour, MathEnv, register_flavour
from trl_stepwise.envs.session import EnvSession, as_env, play_scripted
from trl_stepwise.envs.tool_calls import ToolCall, ToolCallFormat
from trl_stepwise.envs.tools import CalculatorTool, FunctionTool, Tool, ToolResult, tool

__all__ = [
    "FLAVOURS",
    "AssistantTurn",
    "CalculatorTool",
    "EndReason",
    "CountdownEnv",
    "Env",
    "EnvRouter",
    "EnvSession",
    "EnvSpec",
    "Episode",
    "Flavour",
    "FunctionTool",
    "MathEnv",
    "MathFeedbackEnv",
    "Segment",
    "StepRecord",
    "StepText",
    "ToolCall",
    "ToolCallFormat",
    "ToolChatEnv",
    "Tool",
    "ToolResult",
    "as_env",
    "make",
    "make_limited",
    "play_scripted",
    "register",
    "register_flavour",
    "registry",
    "resolve_env_factory",
    "spec",
    "tool",
]
