"""Resume restores the trainer's own state (reference, baseline, curriculum, refresh counter) on every backend.

Under DeepSpeed (and FSDP), transformers never calls ``Trainer._load_from_checkpoint``: the engine loads the weights
itself. DeepSpeed is not installed here, so that branch is simulated: ``_load_from_checkpoint`` is replaced by
transformers' own, which loads the model weights and nothing of this trainer's state, as the engine would.
"""

from __future__ import annotations

import json

import torch
from tiny_training import length_reward, make_config
from transformers import Trainer

from trl_stepwise.trainer import StepwiseReinforceTrainer
from trl_stepwise.trainer.reference import REFERENCE_FILE
from trl_stepwise.trainer.saving import STATE_FILE

SETTINGS = dict(
    save_strategy="steps",
    save_steps=2,
    ref_sync_steps=1,
    log_rollouts=False,
    baseline="moving_average",
    curriculum=["arithmetic:level=1,n=32", "arithmetic:level=2,n=32"],
    curriculum_thresholds=[0.0],
    curriculum_min_steps=1,
)


def make(model, tokenizer, output_dir, max_steps):
    return StepwiseReinforceTrainer(
        model=model,
        args=make_config(output_dir, max_steps=max_steps, **SETTINGS),
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )


def test_resume_restores_trainer_state_when_transformers_skips_load_from_checkpoint(
    make_tiny_model, tokenizer, tmp_path
):
    first = make(make_tiny_model(), tokenizer, tmp_path, max_steps=2)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    saved_reference = torch.load(checkpoint / REFERENCE_FILE, weights_only=True)
    assert saved["ref_syncs"] >= 1 and saved["running_baseline"] is not None and saved["curriculum"]["stage"] == 1

    second = make(make_tiny_model(seed=1), tokenizer, tmp_path, max_steps=3)
    # the DeepSpeed branch of transformers' resume: the weights are loaded, the trainer's override is not called
    second._load_from_checkpoint = lambda path, model=None: Trainer._load_from_checkpoint(second, path, model)
    seen = {}
    get_batch_samples = second.get_batch_samples

    def spy(*args, **kwargs):  # the state the first rollout after resuming starts from
        if not seen:
            seen.update(
                ref_syncs=second.reference.last_sync,
                baseline=second.algorithm.running_baseline,
                stage=second.curriculum.stage,
                reference={k: v.detach().clone() for k, v in second.ref_model.state_dict().items()},
            )
        return get_batch_samples(*args, **kwargs)

    second.get_batch_samples = spy
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 3
    assert seen["ref_syncs"] == saved["ref_syncs"]
    assert seen["baseline"] == saved["running_baseline"]
    assert seen["stage"] == 1
    assert saved_reference.keys() == seen["reference"].keys()
    assert all(torch.equal(seen["reference"][k], v) for k, v in saved_reference.items())
