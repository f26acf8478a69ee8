"""Stepwise environments: state types, the math environment and the batch that steps many episodes at once."""

from trl_stepwise.envs.arithmetic_env import ArithmeticWordProblemEnv
from trl_stepwise.envs.base import EndReason, Episode, Observation, Segment, StepRecord, StepwiseEnv
from trl_stepwise.envs.batch import EnvBatch, StepAction
from trl_stepwise.envs.math_env import FLAVOURS, Flavour, StepwiseMathEnv, register_flavour

__all__ = [
    "ArithmeticWordProblemEnv",
    "FLAVOURS",
    "EndReason",
    "EnvBatch",
    "Episode",
    "Flavour",
    "Observation",
    "Segment",
    "StepAction",
    "StepRecord",
    "StepwiseEnv",
    "StepwiseMathEnv",
    "register_flavour",
]
