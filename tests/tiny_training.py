"""Settings of the tiny training runs, shared by the trainer tests and the 2-process script they launch."""

from __future__ import annotations

from trl_stepwise.trainer import StepwiseReinforceConfig


def length_reward(completions, **kwargs):
    """A TRL-signature reward that varies between episodes (random models never solve anything)."""
    return [len(c) / 10 for c in completions]


def make_config(output_dir, **overrides) -> StepwiseReinforceConfig:
    """Tiny rollouts: 2 problems x 2 episodes per micro-batch, 2 steps of at most 6 tokens, 1-shot prompts."""
    base = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        num_generations=2,
        gradient_accumulation_steps=1,
        max_step_tokens=6,
        max_episode_steps=2,
        n_few_shot=1,
        env_flavour="arithmetic",
        learning_rate=1e-2,
        kl_coef=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        num_completions_to_print=0,
        seed=0,
    )
    return StepwiseReinforceConfig(**{**base, **overrides})
