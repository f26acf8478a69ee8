"""The main-job study's configurations: recipe flags on top of the main-job YAML, and what each tests
(``main_job_study.py`` runs them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One configuration of the study: recipe flags on top of the main-job YAML, and what it tests."""

    overrides: dict[str, Any]
    why: str


LORA = {
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
FAST_STAGES = {"curriculum_min_steps": 3, "curriculum_window": 32}
# Real word problems mixed with generated ones: from step 2, half of each step's problems are GSM8K train problems
# with <= 2 calculations (the other half generated level 1); the loss-type, sampling and group-size entries start here
MIXED = {
    "curriculum": ["arithmetic:level=1", "gsm8k_easy"],
    "curriculum_thresholds": [0.0, 1.0],
    "curriculum_min_steps": 1,
    "max_episode_tokens": 160,
}

VARIANTS: dict[str, Variant] = {
    "base": Variant({}, "the main job as configured"),
    "base_seed43": Variant({"seed": 43}, "the main job under another sampling seed (run-to-run spread)"),
    "base_seed44": Variant({"seed": 44}, "the main job under a third sampling seed (run-to-run spread)"),
    "fp32": Variant({"bf16": False}, "float32 training step instead of the main job's bfloat16 autocast"),
    "lora": Variant(
        {**LORA, "learning_rate": 1e-4}, "LoRA r16 on every projection instead of full weights, learning rate 1e-4"
    ),
    "lr1e-5": Variant({"learning_rate": 1e-5}, "learning rate 1e-5 instead of 3e-5"),
    "lr1e-4": Variant({"learning_rate": 1e-4}, "learning rate 1e-4, constant"),
    "lr1e-4_cosine": Variant(
        {"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 1, "max_steps": 16},
        "learning rate 1e-4, 1 warm-up step, cosine decay over the main job's 16 steps (stops at 16 or the budget)",
    ),
    "more_steps_fewer_episodes": Variant(
        {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2},
        "8 episodes per step (2 problems x 4) instead of 16: twice the steps",
    ),
    "gen8": Variant(
        {"num_generations": 8, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
        "8 episodes per problem (2 problems x 8 per step) instead of 4",
    ),
    "kl0": Variant({"kl_coef": 0.0}, "no KL penalty (no reference model) instead of 0.02"),
    "ref_refresh2": Variant({"ref_sync_steps": 2}, "reference refreshed every 2 steps instead of 8"),
    "temp1.0": Variant({"temperature": 1.0}, "sampling temperature 1.0 instead of 0.7"),
    "curriculum_fast": Variant(
        {**FAST_STAGES, "curriculum_thresholds": [0.5, 0.4, 0.35, 0.25, 1.0]},
        "the main curriculum with thresholds it can pass (0.5, 0.4, 0.35, 0.25), >= 3 steps per stage, window 32",
    ),
    "real_mix": Variant(
        {
            **FAST_STAGES,
            "curriculum": ["arithmetic:level=2", "arithmetic:level=3", "gsm8k_easy"],
            "curriculum_thresholds": [0.4, 0.3, 1.0],
            "curriculum_min_steps": 2,
            "curriculum_max_steps": 4,
        },
        "closer to real problems: two-step, then three-step with a distractor sentence, then GSM8K train with <= 2 "
        "calculations; a stage lasts 2-4 steps",
    ),
    "no_replay": Variant(
        {"curriculum_replay": 0.0}, "after a promotion, every problem from the new stage (the main job replays half)"
    ),
    "level1_then_gsm8k_easy": Variant(
        {"curriculum": ["arithmetic:level=1", "gsm8k_easy"], "curriculum_thresholds": [0.4, 1.0]},
        "generated level 1, then GSM8K train problems with <= 2 calculations (level 1 replayed for half of each step)",
    ),
    "level1_shots": Variant(
        {"few_shot_dataset_name": "arithmetic:level=1"},
        "worked examples in the training prompt from generated level 1 (evaluation keeps the main job's source)",
    ),
    "gsm8k_shots": Variant(
        {"few_shot_dataset_name": "gsm8k"},
        "worked examples in the training prompt from GSM8K train (evaluation keeps the main job's source)",
    ),
    "gsm8k_short_shots": Variant(
        {"few_shot_dataset_name": "gsm8k", "max_example_chars": 300},
        "worked examples in the training prompt from GSM8K train, only those under 300 characters",
    ),
    "few_shot_pool16": Variant(
        {"few_shot_pool_size": 16},
        "another 2 of 16 short GSM8K worked examples every training step (evaluation keeps the main job's 2)",
    ),
    "level1_distractors": Variant(
        {
            "curriculum": [
                "arithmetic:level=1,distractors=0-1",
                "arithmetic:level=2",
                "arithmetic:level=3",
                "gsm8k_easy",
                "gsm8k",
            ]
        },
        "the first stage's one-step problems carry an irrelevant sentence half of the time",
    ),
    "unguided": Variant(
        {"reference_guidance": False, "curriculum_thresholds": [0.5, 0.4, 0.3, 0.25, 1.0]},
        "no reference guidance, level 1 passed at 0.5 (the main job until its guidance)",
    ),
    "gsm8k_easy_guided": Variant(
        MIXED,
        "from step 2 half of each step's problems are GSM8K train problems with <= 2 calculations (the other half "
        "generated level 1); groups that all fail train on the worked solution, so real problems give a signal; "
        "episodes up to 160 tokens (97% of those worked solutions fit, 78% in 100)",
    ),
    "shots0": Variant({"n_few_shot": 0}, "training prompts without worked examples (evaluation keeps 2)"),
    "shots1": Variant({"n_few_shot": 1}, "training prompts with 1 worked example (evaluation keeps 2)"),
    # The main job's own problems (base is their baseline: loss_type dapo, one optimizer step per batch). With one
    # process, one micro-batch and one iteration, bnpo divides by the same token count as dapo and cispo's weight is
    # the ratio 1, so both give dapo's gradient there; cispo is compared where the ratio moves (two iterations)
    "loss_grpo": Variant(
        {"loss_type": "grpo"}, "loss_type grpo: each episode's token mean, then the mean over episodes"
    ),
    "loss_dr_grpo": Variant(
        {"loss_type": "dr_grpo"}, "loss_type dr_grpo: summed token losses over episodes x max_episode_tokens"
    ),
    "two_iterations": Variant(
        {"num_iterations": 2}, "2 optimizer steps per batch of rollouts (the second is off-policy: the clip acts)"
    ),
    "two_iterations_clip_higher": Variant(
        {"num_iterations": 2, "epsilon_high": 0.28},
        "2 optimizer steps per batch, the ratio clipped at 1.28 above instead of 1.2 (DAPO's clip-higher)",
    ),
    "two_iterations_cispo": Variant(
        {"num_iterations": 2, "loss_type": "cispo"},
        "2 optimizer steps per batch, loss_type cispo (the ratio weighs the gradient, capped at 5, not clipped away)",
    ),
    "dynamic_sampling": Variant(
        {"dynamic_sampling": True},
        "groups whose episodes all earned the same at every step are dropped and more problems played, up to 3 extra "
        "rounds per step (DAPO's dynamic sampling)",
    ),
    "bf16_engine": Variant(
        {"vllm_dtype": "bfloat16"},
        "vLLM's weights in bfloat16 (the precision of the training step's autocast) instead of float32: ~1.3x the "
        "rollout tokens/s",
    ),
    "bf16_engine_seed43": Variant(
        {"vllm_dtype": "bfloat16", "seed": 43}, "the bfloat16 engine under another sampling seed (run-to-run spread)"
    ),
    "gen16": Variant(
        {"num_generations": 16}, "16 episodes per problem (1 problem per step) instead of 4 problems x 4"
    ),
    # On the mixed problems (gsm8k_easy_guided is their baseline: loss_type dapo, 4 episodes per problem)
    "mixed_dynamic_sampling": Variant(
        {**MIXED, "dynamic_sampling": True},
        "mixed problems; groups whose episodes all earned the same at every step are dropped and more problems "
        "played, up to 3 extra rounds per step (DAPO's dynamic sampling)",
    ),
    **{
        f"mixed_{loss_type}": Variant({**MIXED, "loss_type": loss_type}, f"mixed problems; loss_type {loss_type}")
        for loss_type in ("grpo", "bnpo", "dr_grpo", "cispo")
    },
    "mixed_two_iterations": Variant(
        {**MIXED, "num_iterations": 2},
        "mixed problems; 2 optimizer steps per batch of rollouts (the second is off-policy: the clip acts)",
    ),
    "mixed_two_iterations_clip_higher": Variant(
        {**MIXED, "num_iterations": 2, "epsilon_high": 0.28},
        "mixed problems; 2 optimizer steps per batch, the ratio clipped at 1.28 above instead of 1.2 (DAPO's "
        "clip-higher; with one step per batch the ratio is 1 and no clip acts)",
    ),
    "mixed_gen8": Variant(
        {**MIXED, "num_generations": 8},
        "mixed problems; 8 episodes per problem (2 problems x 8 per step) instead of 4",
    ),
    "mixed_gen16": Variant(
        {**MIXED, "num_generations": 16}, "mixed problems; 16 episodes per problem (1 problem per step) instead of 4"
    ),
}
