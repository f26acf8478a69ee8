"""The one place that imports TRL's private base classes.

``tests/test_trl_compat.py`` fails loudly if TRL moves them.
"""

from trl.trainer.base_config import _BaseConfig as BaseConfig
from trl.trainer.base_trainer import _BaseTrainer as BaseTrainer

__all__ = ["BaseConfig", "BaseTrainer"]
