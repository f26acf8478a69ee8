"""Stepwise RL for language environments on top of TRL.

``from trl_stepwise import StepwiseReinforceConfig, StepwiseReinforceTrainer`` works as ``from trl import
GRPOTrainer`` does; the names load on first use, so ``import trl_stepwise`` stays fast (no torch, no transformers).
Importing the package installs narrow filters for third-party notices it triggers (see ``trl_stepwise.quiet``) before
any of those libraries is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from trl_stepwise.quiet import quiet_third_party

quiet_third_party()

# public name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {
    "StepwiseReinforceConfig": "trl_stepwise.trainer.config",
    "StepwiseReinforceTrainer": "trl_stepwise.trainer.trainer",
    "Env": "trl_stepwise.envs.core",
    "register": "trl_stepwise.envs.core",
    "make": "trl_stepwise.envs.core",
    "tool": "trl_stepwise.envs.tools",
    "MathEnv": "trl_stepwise.envs.math_env",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trl_stepwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
