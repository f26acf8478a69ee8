"""Under bf16 autocast the loss pass casts each weight once per step, not once per forward call.

A main-job loss pass makes several forward calls (the shared few-shot prefix, the groups' prompts, the completions in
length buckets). Autocast caches a weight's bfloat16 copy only within one autocast region; with one region per
forward call every call re-cast all 135M weights (7.26 s against 7.08 s for a main-job bfloat16 loss pass,
benchmarks/README.md).
"""

from __future__ import annotations

import collections

import torch
from tiny_training import length_reward, make_config
from torch.utils._python_dispatch import TorchDispatchMode

from trl_stepwise.trainer import StepwiseReinforceTrainer
from trl_stepwise.trainer import config as config_module


class _CastCounter(TorchDispatchMode):
    """Counts float32 -> bfloat16 copies per source storage."""

    def __init__(self) -> None:
        super().__init__()
        self.casts: collections.Counter[int] = collections.Counter()
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            source = args[0]
            if source.dtype == torch.float32:
                self.casts[source.untyped_storage().data_ptr()] += 1
        return func(*args, **kwargs)


def test_a_bf16_loss_pass_casts_each_weight_once(tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)  # autocast even on an AVX2-only CPU
    trainer = StepwiseReinforceTrainer(
        model=tiny_model,
        args=make_config(tmp_path, max_steps=1, bf16=True, kl_coef=0.0),
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    assert trainer.args.bf16
    counter = _CastCounter()
    loss_pass_calls = []
    original_step = StepwiseReinforceTrainer.training_step

    def counted_step(self, *args, **kwargs):
        with counter:
            return original_step(self, *args, **kwargs)

    monkeypatch.setattr(StepwiseReinforceTrainer, "training_step", counted_step)
    tiny_model.register_forward_pre_hook(lambda module, args: loss_pass_calls.append(counter.active))
    trainer.train()
    weight = tiny_model.model.layers[0].self_attn.q_proj.weight
    assert sum(loss_pass_calls) >= 2, "the loss pass makes several forward calls (prefix, prompts, completions)"
    assert counter.casts[weight.untyped_storage().data_ptr()] == 1
