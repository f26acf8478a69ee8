"""TRL private base classes and the transformers.Trainer hooks the trainer overrides: fail loudly if they move.

``trl_stepwise.trainer._trl`` is the one place that imports ``trl.trainer.base_config._BaseConfig`` and
``trl.trainer.base_trainer._BaseTrainer``; the trainer also overrides private ``transformers.Trainer`` methods
(``get_batch_samples``, ``_save_rng_state``, ``_load_optimizer_and_scheduler``, ``_save``, ``_push_from_checkpoint``)
and replaces ``transformers.trainer.hf_api`` during uploads. A TRL or transformers upgrade that renames
or re-signs any of them should fail here, with the name of what moved, rather than silently skip our overrides.
"""

from __future__ import annotations

import inspect

import pytest
import transformers
import trl

from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer
from trl_stepwise.trainer._trl import BaseConfig, BaseTrainer


def test_trl_private_bases_are_training_arguments_and_trainer():
    assert issubclass(BaseConfig, transformers.TrainingArguments), (
        "TRL's _BaseConfig no longer extends TrainingArguments"
    )
    assert issubclass(BaseTrainer, transformers.Trainer), "TRL's _BaseTrainer no longer extends transformers.Trainer"


def test_grpo_derives_from_the_same_bases():
    assert issubclass(trl.GRPOConfig, BaseConfig), (
        f"trl {trl.__version__}: GRPOConfig no longer derives from _BaseConfig"
    )
    assert issubclass(trl.GRPOTrainer, BaseTrainer), (
        f"trl {trl.__version__}: GRPOTrainer no longer derives from _BaseTrainer"
    )


def test_our_classes_sit_on_the_trl_bases():
    assert issubclass(StepwiseReinforceConfig, BaseConfig)
    assert issubclass(StepwiseReinforceTrainer, BaseTrainer)


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("get_batch_samples", ["self", "epoch_iterator", "num_batches", "device"]),
        ("_save_rng_state", ["self", "output_dir"]),
        ("_load_optimizer_and_scheduler", ["self", "checkpoint"]),
        ("_save", ["self", "output_dir", "state_dict"]),
        ("_push_from_checkpoint", ["self", "checkpoint_folder"]),
        ("compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
        ("log", ["self", "logs", "start_time"]),
        ("get_train_dataloader", ["self"]),
        ("evaluate", ["self", "eval_dataset", "ignore_keys", "metric_key_prefix"]),
    ],
)
def test_overridden_trainer_hooks_keep_their_signature(name, parameters):
    parent = getattr(transformers.Trainer, name, None)
    assert parent is not None, (
        f"transformers.Trainer.{name} is gone: StepwiseReinforceTrainer's override is never called"
    )
    assert list(inspect.signature(parent).parameters) == parameters, f"transformers.Trainer.{name} changed signature"
    ours = getattr(StepwiseReinforceTrainer, name)
    assert ours is not parent and list(inspect.signature(ours).parameters) == parameters


def test_trainer_still_calls_the_private_hooks():
    source = inspect.getsource(transformers.Trainer)
    calls = ("self.get_batch_samples(", "self._save_rng_state(", "self._load_optimizer_and_scheduler(", "self._save(")
    for call in calls:
        assert call in source, f"transformers.Trainer no longer calls {call}...): checkpoints or rollouts would break"


def test_hub_uploads_go_through_the_module_level_hf_api():
    """``trainer/hub.py`` swaps ``transformers.trainer.hf_api`` to keep rollouts out of uploads."""
    import transformers.trainer

    assert callable(getattr(transformers.trainer, "hf_api", None)), "transformers.trainer.hf_api is gone"
    for method in (transformers.Trainer.push_to_hub, transformers.Trainer._push_from_checkpoint):
        assert "hf_api().upload_folder(" in inspect.getsource(method), f"{method.__name__} uploads another way"
