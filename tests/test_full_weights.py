"""Full-weights training: every model_init_kwargs reaches from_pretrained, and the recipe's updates land."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from tiny_training import length_reward, make_config

from trl_stepwise.models import load_model
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

REPO = Path(__file__).resolve().parents[1]
FULL_RECIPE = REPO / "recipes" / "configs" / "reinforce_gsm8k_llama1b_full.yaml"


def test_model_init_kwargs_are_all_honoured(tiny_model_dir, tokenizer, arithmetic_problems, tmp_path, caplog):
    args = make_config(tmp_path, model_init_kwargs={"attn_implementation": "eager", "dtype": "bfloat16"})
    with caplog.at_level(logging.WARNING):
        trainer = StepwiseReinforceTrainer(
            model=str(tiny_model_dir),
            args=args,
            train_dataset=arithmetic_problems,
            processing_class=tokenizer,
            reward_funcs=[length_reward],
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.bfloat16  # model_init_kwargs' dtype beats model_dtype
    assert "Load the model in float32" in caplog.text  # 16-bit trainable weights are worth a warning


def test_model_init_kwargs_with_a_loaded_model_warn(tiny_model, tokenizer, arithmetic_problems, tmp_path, caplog):
    args = make_config(tmp_path, model_init_kwargs={"attn_implementation": "eager"})
    with caplog.at_level(logging.WARNING):
        StepwiseReinforceTrainer(
            model=tiny_model, args=args, train_dataset=arithmetic_problems, processing_class=tokenizer
        )
    assert "model_init_kwargs (attn_implementation) are ignored" in caplog.text


def test_full_weights_recipe_keeps_fp32_master_weights_so_updates_land(tiny_model_dir):
    recipe = yaml.safe_load(FULL_RECIPE.read_text())
    dtype = recipe.get("model_dtype", StepwiseReinforceConfig.__dataclass_fields__["model_dtype"].default)
    assert recipe["bf16"] is True  # speed comes from bf16 autocast, not from bf16 weights
    model = load_model(str(tiny_model_dir), dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(recipe["learning_rate"]))
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before, strict=True))
    total = sum(b.numel() for b in before)
    assert changed / total > 0.9, f"only {changed / total:.1%} of the weights moved in one update"
