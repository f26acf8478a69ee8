"""ZeRO-3 and FSDP are refused at start with a message naming the set-up and what to use instead."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from tiny_training import make_config

from trl_stepwise.trainer.parallelism import check_accelerator, sharded_setup

FSDP2_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
ZERO3_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.mark.parametrize(
    ("launch", "named"),
    [(FSDP2_LAUNCH, r"FSDP \(fsdp_version 2, e\.g\. accelerate_configs/fsdp2\.yaml\)"), (ZERO3_LAUNCH, "ZeRO-3")],
)
def test_sharded_launch_is_refused_when_the_config_is_parsed(tmp_path, monkeypatch, launch, named):
    for key, value in launch.items():  # what `accelerate launch --config_file accelerate_configs/<x>.yaml` exports
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=named) as error:
        make_config(tmp_path)
    assert "multi_gpu.yaml (DDP)" in str(error.value) and "deepspeed_zero2.yaml" in str(error.value)


def test_zero2_ddp_and_single_process_are_accepted(tmp_path):
    zero2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    assert sharded_setup(zero2) is None
    assert sharded_setup({"ACCELERATE_USE_FSDP": "false"}) is None
    assert sharded_setup({}) is None


def test_zero3_in_a_deepspeed_json_or_dict_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert "ZeRO-3" in sharded_setup({}, deepspeed=str(path))
    launch = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    assert "ZeRO-3" in sharded_setup(launch)
    assert sharded_setup({}, deepspeed={"zero_optimization": {"stage": 2}}) is None
    assert "FSDP" in sharded_setup({}, fsdp="full_shard")


def test_accelerator_state_with_fsdp_or_zero3_is_refused():
    with pytest.raises(ValueError, match=r"FSDP \(fsdp_version 2\).*multi_gpu\.yaml"):
        check_accelerator(SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2), deepspeed_plugin=None))
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_accelerator(SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    check_accelerator(SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    check_accelerator(SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=None))
