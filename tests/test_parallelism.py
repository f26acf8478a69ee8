"""Sharded set-ups: FSDP2 and ZeRO-3 run with an engine on gathered weights; with the transformers engine, FSDP1, and
a full-weight ZeRO-3 reference they are refused at start in one line naming the set-up and the fix."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_training import make_config

from trl_stepwise.trainer.parallelism import (
    check_accelerator,
    check_launch,
    check_sharded_reference,
    sharded_setup,
)
from trl_stepwise.trainer.sharding import agreed_count, is_sharded, masked_out, shards_on_prepare

FSDP2_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
FSDP1_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
ZERO3_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.mark.parametrize(
    ("launch", "named"),
    [(FSDP2_LAUNCH, r"FSDP \(fsdp_version 2, e\.g\. accelerate_configs/fsdp2\.yaml\)"), (ZERO3_LAUNCH, "ZeRO-3")],
)
def test_sharded_launch_with_the_transformers_engine_is_refused_when_the_config_is_parsed(
    tmp_path, monkeypatch, launch, named
):
    for key, value in launch.items():  # what `accelerate launch --config_file accelerate_configs/<x>.yaml` exports
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=named) as error:
        make_config(tmp_path, use_vllm=False)
    assert "--use_vllm true" in str(error.value) and "\n" not in str(error.value)
    check_launch(launch, use_vllm=True)  # an engine on gathered weights: accepted


def test_fsdp2_launch_with_vllm_parses(tmp_path, monkeypatch):
    for key, value in FSDP2_LAUNCH.items():
        monkeypatch.setenv(key, value)
    assert make_config(tmp_path, use_vllm=True).use_vllm


def test_fsdp1_is_refused_with_every_engine(tmp_path, monkeypatch):
    for key, value in FSDP1_LAUNCH.items():
        monkeypatch.setenv(key, value)
    for use_vllm in (True, False):
        with pytest.raises(ValueError, match=r"fsdp_version 1.*use fsdp_version 2 \(accelerate_configs/fsdp2\.yaml\)"):
            make_config(tmp_path, use_vllm=use_vllm)


def test_a_model_sharded_at_load_time_needs_an_engine_on_gathered_weights(tmp_path):
    kwargs = {"distributed_config": object()}
    with pytest.raises(ValueError, match="model_init_kwargs distributed_config.*--use_vllm true"):
        make_config(tmp_path, use_vllm=False, model_init_kwargs=kwargs)
    check_launch({}, use_vllm=True, model_init_kwargs=kwargs)


def test_zero2_ddp_and_single_process_are_not_sharded(tmp_path):
    zero2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    assert sharded_setup(zero2) is None
    assert sharded_setup({"ACCELERATE_USE_FSDP": "false"}) is None
    assert sharded_setup({}) is None
    check_launch(zero2, use_vllm=False)


def test_zero3_in_a_deepspeed_json_or_dict_is_recognised(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert "ZeRO-3" in sharded_setup({}, deepspeed=str(path))
    launch = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    assert "ZeRO-3" in sharded_setup(launch)
    assert sharded_setup({}, deepspeed={"zero_optimization": {"stage": 2}}) is None
    assert "FSDP" in sharded_setup({}, fsdp="full_shard")


def test_accelerator_state_is_checked_too():
    fsdp2 = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2), deepspeed_plugin=None)
    zero3 = SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(ValueError, match=r"FSDP \(fsdp_version 2\).*--use_vllm true"):
        check_accelerator(fsdp2, use_vllm=False)
    with pytest.raises(ValueError, match="ZeRO-3.*--use_vllm true"):
        check_accelerator(zero3, use_vllm=False)
    with pytest.raises(ValueError, match="fsdp_version 1"):
        check_accelerator(SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1), deepspeed_plugin=None), True)
    check_accelerator(fsdp2, use_vllm=True)
    check_accelerator(zero3, use_vllm=True)
    check_accelerator(SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=2)), False)
    assert shards_on_prepare(fsdp2) and shards_on_prepare(zero3)
    assert not shards_on_prepare(SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=2)))


def test_a_sharded_model_with_the_transformers_engine_is_refused(tiny_model):
    assert not is_sharded(tiny_model)
    next(tiny_model.parameters()).ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    assert is_sharded(tiny_model)
    plain = SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=None)
    with pytest.raises(ValueError, match="A sharded model.*--use_vllm true"):
        check_accelerator(plain, use_vllm=False, sharded_model=True)
    check_accelerator(plain, use_vllm=True, sharded_model=True)
    check_accelerator(plain, use_vllm=False, sharded_model=False)


def test_full_weight_zero3_with_a_kl_term_is_refused_before_loading():
    with pytest.raises(ValueError, match="kl_coef=0.05 with full weights under DeepSpeed ZeRO-3.*fsdp2.yaml"):
        check_sharded_reference(ZERO3_LAUNCH, None, peft_config=None, kl_coef=0.05)
    check_sharded_reference(ZERO3_LAUNCH, None, peft_config=object(), kl_coef=0.05)  # the base is the reference
    with pytest.raises(ValueError, match="ref_sync_steps=2 with kl_coef=0.05 under DeepSpeed ZeRO-3"):
        check_sharded_reference(ZERO3_LAUNCH, None, peft_config=object(), kl_coef=0.05, ref_sync_steps=2)
    pissa = SimpleNamespace(init_lora_weights="pissa")  # the initial adapter changes the base: a copy is needed
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        check_sharded_reference(ZERO3_LAUNCH, None, peft_config=pissa, kl_coef=0.05)
    check_sharded_reference(ZERO3_LAUNCH, None, peft_config=None, kl_coef=0.0)
    check_sharded_reference(FSDP2_LAUNCH, None, peft_config=None, kl_coef=0.05)  # FSDP2 builds a sharded copy


def test_process_agreement_and_padding_micro_batches():
    assert agreed_count(3, num_processes=1) == 3
    batch = {"completion_mask": torch.ones(2, 3, dtype=torch.bool), "sampled_mask": torch.ones(2, 3, dtype=torch.bool)}
    batch["input_ids"] = torch.arange(6).reshape(2, 3)
    padding = masked_out(batch)
    assert not padding["completion_mask"].any() and not padding["sampled_mask"].any()
    assert padding["input_ids"] is batch["input_ids"] and batch["completion_mask"].all()  # the original untouched


def test_model_init_kwargs_from_the_command_line_as_in_trl(tmp_path):
    """A JSON string, as TRL's GRPOConfig takes it (``--model_init_kwargs '{...}'``), becomes the mapping the loader
    reads; a sharded load there is checked like any other sharded set-up."""
    from trl import TrlParser

    from trl_stepwise.trainer import StepwiseReinforceConfig

    cli = ["--output_dir", str(tmp_path), "--model_init_kwargs", '{"distributed_config": {"fsdp_size": 2}}']
    (args,) = TrlParser((StepwiseReinforceConfig,)).parse_args_and_config([*cli, "--use_vllm", "true"])
    assert args.model_init_kwargs == {"distributed_config": {"fsdp_size": 2}}
    with pytest.raises(ValueError, match="distributed_config"):
        TrlParser((StepwiseReinforceConfig,)).parse_args_and_config([*cli, "--use_vllm", "false"])


def test_a_process_with_fewer_micro_batches_pads_them_without_changing_the_loss_normaliser(
    tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    """Another process wants one micro-batch more: this one adds a copy of its last with every token out of the loss,
    and its real micro-batches keep their own count as the bnpo normaliser (padding must not shrink their loss)."""
    from tiny_training import length_reward

    from trl_stepwise.trainer import StepwiseReinforceTrainer
    from trl_stepwise.trainer import trainer as trainer_module

    config = make_config(tmp_path, loss_type="bnpo", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = StepwiseReinforceTrainer(
        model=tiny_model,
        args=config,
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    trainer.sharded = True  # as under FSDP2, with the other process wanting one micro-batch more
    monkeypatch.setattr(trainer_module, "agreed_count", lambda count, processes: count + 1)
    batches = trainer._generate_and_score([dict(r) for r in arithmetic_problems.select(range(2))], 2)
    assert len(batches) == 3 and [b["num_micro_batches"] for b in batches] == [2, 2, 2]
    assert batches[0]["completion_mask"].any() and batches[1]["completion_mask"].any()
    assert not batches[2]["completion_mask"].any() and not batches[2]["sampled_mask"].any()
    assert torch.equal(batches[2]["input_ids"], batches[1]["input_ids"])  # the same forward shape and calls
