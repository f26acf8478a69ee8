"""StepwiseReinforceConfig: TRL's GRPO names and semantics, and refused training settings (one clear sentence each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_training import make_config

from trl_stepwise.trainer import StepwiseReinforceConfig

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- temperature
def test_temperature_zero_is_refused_for_training(tmp_path):
    with pytest.raises(ValueError, match=r"temperature=0.0.*--temperature") as info:
        make_config(tmp_path, temperature=0.0)
    assert len(str(info.value).splitlines()) == 1
    assert make_config(tmp_path, temperature=0.7).temperature == 0.7


# ---------------------------------------------------------------------------------------------- TRL names
def test_beta_is_an_alias_of_kl_coef(tmp_path):
    assert make_config(tmp_path, kl_coef=None, beta=0.3).kl_coef == 0.3
    assert make_config(tmp_path, kl_coef=None).kl_coef == 0.05  # the default is unchanged
    assert make_config(tmp_path, kl_coef=0.2, beta=0.2).kl_coef == 0.2
    with pytest.raises(ValueError, match=r"beta=0.3.*kl_coef=0.2"):
        make_config(tmp_path, kl_coef=0.2, beta=0.3)


def test_ref_model_sync_steps_is_an_alias_of_ref_sync_steps(tmp_path):
    assert make_config(tmp_path, ref_model_sync_steps=4).ref_sync_steps == 4
    assert make_config(tmp_path).ref_sync_steps == 0
    with pytest.raises(ValueError, match=r"ref_model_sync_steps=4.*ref_sync_steps=2"):
        make_config(tmp_path, ref_sync_steps=2, ref_model_sync_steps=4)


def test_max_completion_length_is_the_episode_token_budget(tmp_path):
    assert make_config(tmp_path, max_completion_length=200).max_episode_tokens == 200
    assert make_config(tmp_path).max_episode_tokens == 384
    with pytest.raises(ValueError, match=r"max_completion_length=200.*max_episode_tokens=100"):
        make_config(tmp_path, max_episode_tokens=100, max_completion_length=200)


def test_ref_model_mixup_alpha_range(tmp_path):
    assert make_config(tmp_path, ref_model_mixup_alpha=0.6).ref_model_mixup_alpha == 0.6
    assert make_config(tmp_path).ref_model_mixup_alpha == 1.0  # hard refresh unless asked
    with pytest.raises(ValueError, match=r"ref_model_mixup_alpha=0.0.*\(0, 1\]"):
        make_config(tmp_path, ref_model_mixup_alpha=0.0)


def test_scale_rewards_takes_grpo_values(tmp_path):
    assert make_config(tmp_path).scale_rewards == "none"
    assert make_config(tmp_path, scale_rewards="group").scale_rewards == "group"
    assert make_config(tmp_path, scale_rewards=True).scale_rewards == "group"  # GRPO's boolean spelling
    assert make_config(tmp_path, scale_rewards=False).scale_rewards == "none"
    assert make_config(tmp_path, scale_advantages=True).scale_rewards == "batch"  # the older flag's meaning
    assert make_config(tmp_path, scale_rewards="batch").algorithm_settings().scale_rewards == "batch"
    with pytest.raises(ValueError, match=r"scale_rewards='std'.*group, batch or none"):
        make_config(tmp_path, scale_rewards="std")
    with pytest.raises(ValueError, match=r"scale_rewards='group'.*num_generations >= 2"):
        make_config(tmp_path, scale_rewards="group", num_generations=1, baseline="batch_mean")


def test_num_generations_divides_the_generation_batch_like_grpo(tmp_path):
    # the episodes of one optimizer step (per_device x gradient_accumulation_steps) are rolled out together, so a
    # micro-batch smaller than a group is fine as long as the generation batch holds whole groups
    config = make_config(tmp_path, per_device_train_batch_size=2, num_generations=4, gradient_accumulation_steps=2)
    assert config.generation_batch_size == 4 and config.problems_per_rollout == 1
    with pytest.raises(ValueError, match=r"generation batch \(3 x 2 = 6 episodes.*num_generations \(4\)"):
        make_config(tmp_path, per_device_train_batch_size=3, num_generations=4, gradient_accumulation_steps=2)


def test_recipe_help_explains_the_new_flags():
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "reinforce_gsm8k.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    for flag in ("--beta", "--ref_model_sync_steps", "--ref_model_mixup_alpha", "--max_completion_length"):
        assert flag in text
    assert "Alias of kl_coef" in text and "Alias of ref_sync_steps" in text and "Alias of max_episode_tokens" in text
    assert "group, batch or none" in text and "pi_ref = alpha * pi + (1 - alpha) * pi_ref" in text
    assert "--baseline_per_step" in text


def test_config_dataclass_has_the_grpo_fields():
    names = set(StepwiseReinforceConfig.__dataclass_fields__)
    assert {"beta", "ref_model_sync_steps", "ref_model_mixup_alpha", "max_completion_length", "scale_rewards"} <= names


def test_micro_batch_smaller_than_a_group_trains(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    import json

    from tiny_training import length_reward

    from trl_stepwise.trainer import StepwiseReinforceTrainer

    args = make_config(
        tmp_path, max_steps=2, per_device_train_batch_size=2, num_generations=4, gradient_accumulation_steps=2
    )
    trainer = StepwiseReinforceTrainer(
        model=tiny_model,
        args=args,
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    trainer.train()
    assert trainer.state.global_step == 2
    records = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    for step in (0, 1):  # one problem x 4 episodes per optimizer step, split over two micro-batches of 2
        groups = [r["group_id"] for r in records if r["step"] == step]
        assert len(groups) == 4 and len(set(groups)) == 1
