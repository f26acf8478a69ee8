"""Range checks of ``StepwiseReinforceConfig``: every numeric knob in its range, so a typo fails at start with one line
that names the flag, the value and the fix, instead of training on nonsense."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from trl_stepwise.flavours import FLAVOURS

__all__ = ["MODEL_DTYPES", "check_ranges"]

MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")


def check_ranges(config: Any) -> None:
    """Every numeric knob in its range, so a typo fails here instead of training on nonsense."""
    for f in fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{f.name}={value} is not a finite number; give a finite value.")
    if config.max_steps == 0 or (config.max_steps < 0 and config.num_train_epochs <= 0):
        raise ValueError(
            f"max_steps={config.max_steps} and num_train_epochs={config.num_train_epochs}: nothing to train; set "
            "max_steps to a number of optimizer steps > 0 (or -1 with num_train_epochs > 0)."
        )
    if not 0 <= config.gamma <= 1:
        raise ValueError(f"gamma={config.gamma} is outside [0, 1]; the discount must lie in [0, 1] (1 = none).")
    if config.epsilon <= 0:
        raise ValueError(f"epsilon={config.epsilon}; the clip range must be > 0 (e.g. 0.2).")
    if config.epsilon_high <= 0:
        raise ValueError(f"epsilon_high={config.epsilon_high}; the upper clip range must be > 0 (e.g. 0.28).")
    if not 0 <= config.moving_average_decay <= 1:
        raise ValueError(f"moving_average_decay={config.moving_average_decay} is outside [0, 1]; e.g. 0.9.")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p={config.top_p} is outside (0, 1]; use 1.0 to turn nucleus sampling off.")
    if config.top_k < 0:
        raise ValueError(f"top_k={config.top_k} is negative; use 0 to turn top-k sampling off.")
    if config.max_episode_steps is not None and config.max_episode_steps < 1:
        raise ValueError(f"max_episode_steps={config.max_episode_steps}; use >= 1 (1 = single-step mode).")
    if config.n_few_shot is not None and config.n_few_shot < 0:
        raise ValueError(f"n_few_shot={config.n_few_shot} is negative; use 0 (no examples) or more.")
    if config.few_shot_pool_size is not None and config.few_shot_pool_size < (config.n_few_shot or 0):
        raise ValueError(
            f"few_shot_pool_size={config.few_shot_pool_size} is smaller than n_few_shot={config.n_few_shot}; use at "
            "least n_few_shot, or leave it unset for the same examples every step."
        )
    if config.reference_guidance and config.num_generations < 2:
        raise ValueError(
            f"reference_guidance needs num_generations >= 2 (got {config.num_generations}): the worked solution "
            "replaces one episode of a failed group and learns against the others; raise num_generations."
        )
    if config.max_example_chars is not None and config.max_example_chars < 1:
        raise ValueError(f"max_example_chars={config.max_example_chars}; use a positive length or leave it unset.")
    if not config.step_delimiter:
        raise ValueError("step_delimiter is empty; use a text that ends a step, e.g. a newline.")
    if config.env_flavour is not None and config.env_flavour not in FLAVOURS:
        raise ValueError(f"env_flavour={config.env_flavour!r}; choose one of {', '.join(FLAVOURS)} or leave it unset.")
    if config.env_id is not None:
        from trl_stepwise.envs import registry

        if config.env_id not in registry:
            raise ValueError(
                f"env_id={config.env_id!r} is not a registered environment; choose one of {sorted(registry)}."
            )
    if config.model_dtype not in MODEL_DTYPES:
        raise ValueError(f"model_dtype={config.model_dtype!r}; choose one of {', '.join(MODEL_DTYPES)}.")
    if config.learning_rate < 0:
        raise ValueError(f"learning_rate={config.learning_rate} is negative; use a positive rate such as 1e-6.")
    if not 0 <= config.judge_weight < float("inf"):
        raise ValueError(
            f"judge_weight={config.judge_weight}; the judge's per-step score (in [0, 1]) is scaled by this "
            "non-negative finite weight, e.g. 0.5."
        )
    if config.step_penalty < 0:
        raise ValueError(f"step_penalty={config.step_penalty} is negative; it is subtracted per step, use >= 0.")
    for name in ("rollout_batch_size", "logprob_batch_tokens", "judge_batch_size", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)}; use a positive size.")
    if config.eval_num_problems < 1:
        raise ValueError(f"eval_num_problems={config.eval_num_problems}; use at least 1 problem.")
    if config.eval_max_episode_tokens is not None and config.eval_max_episode_tokens < 1:
        raise ValueError(f"eval_max_episode_tokens={config.eval_max_episode_tokens}; use >= 1 or leave it unset.")
    if config.curriculum_thresholds is not None:
        if any(not 0 <= t <= 1 for t in config.curriculum_thresholds):
            raise ValueError(f"curriculum_thresholds={config.curriculum_thresholds}: each is an accuracy in [0, 1].")
        stages = len(config.curriculum or [])
        if config.curriculum and len(config.curriculum_thresholds) not in (1, stages):
            raise ValueError(
                f"curriculum_thresholds has {len(config.curriculum_thresholds)} values for {stages} curriculum "
                "stages; give one per stage or a single value for all."
            )
    if config.curriculum_min_steps < 0:
        raise ValueError(f"curriculum_min_steps={config.curriculum_min_steps} is negative; use 0 or more.")
    if config.curriculum_max_steps is not None and config.curriculum_max_steps < 1:
        raise ValueError(f"curriculum_max_steps={config.curriculum_max_steps}; use >= 1 or leave it unset.")
    if not 0.0 <= config.curriculum_replay < 1.0:
        raise ValueError(
            f"curriculum_replay={config.curriculum_replay}: a fraction of each step's problems; use a value in "
            "[0, 1) (e.g. 0.5)."
        )
    if config.curriculum_window < 1:
        raise ValueError(f"curriculum_window={config.curriculum_window}; use at least 1 episode.")
