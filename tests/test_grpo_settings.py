"""A TRL script's ``GRPOConfig(...)`` keywords work on ``StepwiseReinforceConfig``: every GRPOConfig setting is
accepted under its name, honoured, reported as doing nothing here, or refused in one line when set to what this
trainer does not implement."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from tiny_training import make_config
from trl import GRPOConfig

from trl_stepwise.trainer import StepwiseReinforceConfig
from trl_stepwise.trainer.grpo_settings import INERT, REFUSED


def test_every_grpo_config_setting_is_accepted_by_name():
    ours = {f.name for f in dataclasses.fields(StepwiseReinforceConfig)}
    assert sorted({f.name for f in dataclasses.fields(GRPOConfig)} - ours) == []


def test_a_documented_trl_tool_script_config_runs_unchanged(tmp_path):
    """The keywords of TRL's tool-calling examples, as written for GRPOConfig."""
    args = StepwiseReinforceConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=128,
        max_tool_calling_iterations=3,
        chat_template_kwargs={"enable_thinking": False},
        log_completions=True,
        generation_batch_size=4,
        disable_dropout=True,
        shuffle_dataset=True,
        report_to="none",
    )
    assert args.generation_batch_size == 4 and args.steps_per_generation == 1
    assert args.max_episode_tokens == 128


def test_sync_ref_model_refreshes_the_reference_every_512_steps_as_in_trl(tmp_path):
    assert make_config(tmp_path, sync_ref_model=True).ref_sync_steps == 512
    assert make_config(tmp_path, sync_ref_model=True, ref_model_sync_steps=8).ref_sync_steps == 8


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"generation_batch_size": 12}, "--generation_batch_size 12"),
        ({"steps_per_generation": 3}, "--steps_per_generation 3"),
        ({"repetition_penalty": 1.2}, "--repetition_penalty 1.2"),
        ({"entropy_coef": 0.01}, "--entropy_coef 0.01"),
        ({"shuffle_dataset": False}, "--shuffle_dataset False"),
    ],
)
def test_what_this_trainer_does_not_implement_is_refused_in_one_line(tmp_path, settings, flag):
    with pytest.raises(ValueError) as error:
        make_config(tmp_path, **settings)
    message = str(error.value)
    assert message.startswith(flag) and "\n" not in message


def test_a_setting_that_does_nothing_here_warns_in_one_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_stepwise.trainer.config"):
        config = make_config(tmp_path, log_unique_prompts=True)
    lines = [line for line in config.inert_flags() if "--log_unique_prompts" in line]
    assert len(lines) == 1 and "rollouts.jsonl" in lines[0]
    assert any(record.getMessage() == lines[0] for record in caplog.records)


def test_every_grpo_setting_is_classified():
    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(INERT) <= grpo and set(REFUSED) <= grpo


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_turns_the_policys_dropout_modules_off_as_trl_does(make_tiny_model, tmp_path, disable):
    import torch

    from trl_stepwise.trainer.builders import build_policy

    model = make_tiny_model()
    model.model.head_dropout = torch.nn.Dropout(0.3)
    policy, _ = build_policy(model, make_config(tmp_path, disable_dropout=disable), None)
    assert policy.model.head_dropout.p == (0.0 if disable else 0.3)


def test_one_reward_function_may_be_passed_alone_as_in_trl(make_tiny_model, tokenizer, arithmetic_problems, tmp_path):
    from tiny_training import length_reward

    from trl_stepwise.trainer import StepwiseReinforceTrainer

    trainer = StepwiseReinforceTrainer(
        model=make_tiny_model(),
        args=make_config(tmp_path),
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        reward_funcs=length_reward,
    )
    assert trainer.reward_funcs == [length_reward]


def test_a_reward_model_by_name_is_refused_in_one_line_before_the_model_loads(tokenizer, tmp_path):
    from trl_stepwise.trainer import StepwiseReinforceTrainer

    with pytest.raises(ValueError, match="reward_funcs") as error:
        StepwiseReinforceTrainer(
            model="no/such-model",  # never loaded: the refusal comes first
            args=make_config(tmp_path),
            train_dataset="arithmetic:level=1,n=8",
            processing_class=tokenizer,
            reward_funcs="some/reward-model",
        )
    assert "\n" not in str(error.value)
