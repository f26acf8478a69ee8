"""Language environments: the gymnasium-shaped API (``register`` / ``make`` / ``reset`` / ``step``), tools, the
registered environments and the state types the rollout loop records episodes in.

``StepwiseMathEnv`` and ``EnvBatch`` are the older text API of the math grader (``reset(question, answer)``,
4-tuple ``step``); ``MathEnv`` puts it on the new API.
"""

from trl_stepwise.envs.arithmetic_env import ArithmeticWordProblemEnv
from trl_stepwise.envs.base import EndReason, Episode, Observation, Segment, StepRecord, StepwiseEnv
from trl_stepwise.envs.batch import EnvBatch, StepAction
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
from trl_stepwise.envs.math_env import FLAVOURS, Flavour, StepwiseMathEnv, register_flavour
from trl_stepwise.envs.math_gym import MathEnv
from trl_stepwise.envs.session import EnvSession, as_env, play_scripted
from trl_stepwise.envs.tools import CalculatorTool, FunctionTool, Tool, ToolResult, tool
from trl_stepwise.envs.trl_env import TRLEnvironment

__all__ = [
    "FLAVOURS",
    "ArithmeticWordProblemEnv",
    "CalculatorTool",
    "EndReason",
    "CountdownEnv",
    "Env",
    "EnvRouter",
    "EnvBatch",
    "EnvSession",
    "EnvSpec",
    "Episode",
    "Flavour",
    "FunctionTool",
    "MathEnv",
    "MathFeedbackEnv",
    "Observation",
    "Segment",
    "StepAction",
    "StepRecord",
    "StepText",
    "StepwiseEnv",
    "StepwiseMathEnv",
    "TRLEnvironment",
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
