"""The reference model: refreshed after the optimizer step (hard or soft), and scored under the same precision."""

from __future__ import annotations

import pytest
import torch
from tiny_training import length_reward, make_config

from trl_stepwise.trainer import StepwiseReinforceTrainer


def make_trainer(model, tokenizer, dataset, output_dir, **overrides):
    return StepwiseReinforceTrainer(
        model=model,
        args=make_config(output_dir, log_rollouts=False, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )


def logged(trainer, key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


def test_reference_is_refreshed_after_the_refresh_steps_update(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    trainer = make_trainer(tiny_model, tokenizer, arithmetic_problems, tmp_path, max_steps=2, ref_sync_steps=2)
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    # step 2's own rollout was scored against the initial reference (non-zero KL), then its update was copied in
    assert logged(trainer, "kl")[2] > 1e-6
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), trainer.ref_model.parameters(), strict=True))
    assert logged(trainer, "ref_syncs") == {2: 1.0}


def test_refresh_counts_optimizer_steps_when_batches_are_reused(
    tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    # num_iterations=2: rollouts happen before steps 1, 3, 5; the refresh still follows every 3rd optimizer step
    trainer = make_trainer(
        tiny_model, tokenizer, arithmetic_problems, tmp_path, max_steps=6, ref_sync_steps=3, num_iterations=2
    )
    synced_at: list[int] = []
    original = trainer.sync_reference

    def spy():
        synced_at.append(trainer.state.global_step)
        original()

    monkeypatch.setattr(trainer, "sync_reference", spy)
    trainer.train()
    assert synced_at == [3, 6]


def test_soft_refresh_mixes_policy_into_reference(make_tiny_model, tokenizer, arithmetic_problems, tmp_path):
    model = make_tiny_model()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(
        model, tokenizer, arithmetic_problems, tmp_path, max_steps=1, ref_sync_steps=1, ref_model_mixup_alpha=0.25
    )
    trainer.train()
    policy = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
    for ref, pol, init in zip(trainer.ref_model.parameters(), policy, initial, strict=True):
        assert torch.allclose(ref, 0.25 * pol.detach() + 0.75 * init, atol=1e-6)
    assert any(not torch.equal(p.detach(), i) for p, i in zip(policy, initial, strict=True))


def test_soft_refresh_is_refused_with_peft(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"ref_model_mixup_alpha=0.5.*peft"):
        StepwiseReinforceTrainer(
            model=tiny_model,
            args=make_config(tmp_path, ref_sync_steps=2, ref_model_mixup_alpha=0.5),
            train_dataset=arithmetic_problems,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )


def test_reference_kl_is_exactly_zero_at_step_zero_under_bf16(
    tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    # the policy's forward is autocast by accelerate; the reference (a copy made before prepare) must be too
    monkeypatch.setattr("trl_stepwise.trainer.config.cpu_has_native_bf16", lambda: True)  # keep bf16 on any CPU
    trainer = make_trainer(
        tiny_model, tokenizer, arithmetic_problems, tmp_path, max_steps=1, bf16=True, num_iterations=2
    )
    scored: list = []
    original = trainer._rollout_logps

    def spy(trajectories):
        result = original(trajectories)
        scored.append(result)
        return result

    trainer._rollout_logps = spy
    trainer.train()
    policy, _, reference = scored[0]
    assert policy == reference  # identical weights, identical precision: bit-identical log-probs
    assert logged(trainer, "kl")[1] == 0.0


def test_no_reference_pass_while_the_reference_is_the_policy(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    """At the start and on the step after a full refresh the reference's weights are the policy's: its log-probs are
    the loss pass's own (KL exactly 0) and no reference pass is made."""
    trainer = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, max_steps=4, ref_sync_steps=2)
    scored_at: list[int] = []
    original = trainer.reference.score

    def spy(*args, **kwargs):
        scored_at.append(trainer.state.global_step + 1)  # the step whose rollout is scored
        return original(*args, **kwargs)

    trainer.reference.score = spy
    trainer.train()
    assert scored_at == [2, 4]
    kl = logged(trainer, "kl")
    assert kl[1] == 0.0 and kl[3] == 0.0
    assert kl[2] > 1e-6 and kl[4] > 1e-6


@pytest.mark.parametrize("kl_in_reward", [False, True], ids=["kl_in_loss", "kl_in_reward"])
def test_skipping_the_reference_pass_trains_the_same_weights(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, kl_in_reward
):
    """A first step with the reference pass skipped (its log-probs are the policy's) gives the weights a first step
    with the pass gives."""
    weights = []
    for skip in (True, False):
        trainer = make_trainer(
            make_tiny_model(), tokenizer, arithmetic_problems, tmp_path / str(skip), max_steps=1,
            kl_in_reward=kl_in_reward, kl_estimator="k1",
        )  # fmt: skip
        trainer.reference.equals_policy = skip
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()])
    for skipped, scored in zip(*weights, strict=True):
        assert torch.allclose(skipped, scored, atol=1e-6)
