"""The LoRA reference adapter: PiSSA / OLoRA initialisations, any adapter name, and what save_model writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_training import length_reward, make_config

from trl_stepwise.trainer import StepwiseReinforceTrainer


def peft_trainer(model, tokenizer, dataset, output_dir, init="pissa", adapter="policy", **overrides):
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=init
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter)
    return StepwiseReinforceTrainer(
        model=peft_model,
        args=make_config(output_dir, log_rollouts=False, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )


def weights(model, marker: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if marker in k}


def flat(rows) -> torch.Tensor:
    return torch.tensor([x for row in rows for x in row])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_reference_snapshot_keeps_base_weights_and_starts_at_the_initial_policy(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, init
):
    trainer = peft_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, init=init)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = {k: v.detach().clone() for k, v in model.named_parameters() if "base_layer" in k}
    trajectories = trainer.rollout_engine().run(
        trainer.make_env, [dict(r) for r in arithmetic_problems.select(range(2))]
    )
    policy = flat(trainer._logps(model, trajectories))
    # the initial adapter is not zero for PiSSA / OLoRA: the reference is the initial policy, not the bare base
    assert trainer.reference.equals_policy  # so the first rollout needs no reference pass; scored anyway here:
    reference = trainer.reference.score(model, lambda scored: trainer._logps(scored, trajectories))
    assert torch.allclose(flat(reference), policy, atol=1e-5)

    with torch.no_grad():  # a training step moved the policy adapter
        for name, param in model.named_parameters():
            if ".policy." in name:
                param.add_(0.01)
    trainer.sync_reference()
    after = {k: v.detach() for k, v in model.named_parameters() if "base_layer" in k}
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)  # not re-initialised
    snapshot = {k.replace(".reference.", "."): v for k, v in weights(model, ".reference.").items()}
    policy_adapter = {k.replace(".policy.", "."): v for k, v in weights(model, ".policy.").items()}
    assert snapshot and snapshot.keys() == policy_adapter.keys()
    assert all(torch.equal(snapshot[k], policy_adapter[k]) for k in snapshot)
    assert model.active_adapter == "policy"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    reference = trainer.reference.score(model, lambda scored: trainer._logps(scored, trajectories))
    assert torch.allclose(flat(reference), flat(trainer._logps(model, trajectories)), atol=1e-5)


def lora_trainer(model, tokenizer, dataset, output_dir, **overrides):
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    return StepwiseReinforceTrainer(
        model=model,
        args=make_config(output_dir, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
        peft_config=config,
    )


def test_save_model_writes_the_policy_adapter_only(make_tiny_model, tokenizer, arithmetic_problems, tmp_path):
    trainer = lora_trainer(
        make_tiny_model(), tokenizer, arithmetic_problems, tmp_path / "run", max_steps=2, ref_sync_steps=1,
        save_strategy="steps", save_steps=2, log_rollouts=False,
    )  # fmt: skip
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.reference.has_adapter
    final = tmp_path / "final"
    trainer.save_model(str(final))
    for folder in (final, tmp_path / "run" / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file(), folder
        assert not (folder / "reference").exists(), folder  # the frozen reference stays out of the user's output
    loaded = PeftModel.from_pretrained(make_tiny_model(), str(final))
    assert list(loaded.peft_config) == ["default"]
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k and ".default." in k}
    restored = loaded.state_dict()
    assert trained and all(torch.equal(restored[k], v) for k, v in trained.items())


@pytest.mark.parametrize("push_rollouts", [False, True])
def test_push_to_hub_uploads_rollouts_only_when_asked(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch, push_rollouts
):
    import transformers.trainer
    from huggingface_hub.utils import filter_repo_objects

    trainer = lora_trainer(
        make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, max_steps=1, push_rollouts=push_rollouts
    )
    trainer.train()
    assert (tmp_path / "rollouts.jsonl").is_file()
    uploaded: list[str] = []

    class FakeApi:
        def upload_folder(self, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
            files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
            uploaded.extend(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(trainer, "create_model_card", lambda *a, **k: None)
    trainer.hub_model_id = "someone/stepwise-test"
    trainer.push_to_hub()
    assert "adapter_model.safetensors" in uploaded
    assert ("rollouts.jsonl" in uploaded) == push_rollouts
