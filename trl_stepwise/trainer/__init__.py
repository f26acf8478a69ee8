"""The stepwise REINFORCE trainer and its configuration."""

from trl_stepwise.trainer.config import StepwiseReinforceConfig
from trl_stepwise.trainer.trainer import StepwiseReinforceTrainer

__all__ = ["StepwiseReinforceConfig", "StepwiseReinforceTrainer"]
