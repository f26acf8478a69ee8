"""``GRPOSettings``: the settings of TRL's ``GRPOConfig`` that have no counterpart elsewhere in
``StepwiseReinforceConfig``, under TRL's names and defaults, so that a TRL script's ``GRPOConfig(...)`` call runs here
with only the class name changed.

Each one is honoured (``sync_ref_model``, ``disable_dropout``, ``trust_remote_code``; ``generation_batch_size`` and
``steps_per_generation`` when they describe the rollout this trainer does), has no effect here (a one-line warning when
set away from TRL's default, like every other inert flag), or changes sampling or the objective in a way this trainer
does not implement: then a value away from TRL's default is refused in one line before any model loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trl import GRPOConfig

HONOURED = (
    "sync_ref_model",
    "disable_dropout",
    "trust_remote_code",
    "generation_batch_size",
    "steps_per_generation",
)
INERT = {  # name -> why it does nothing here
    "log_completions": "(num_completions_to_print transcripts are printed at each log; rollouts.jsonl has them all)",
    "log_unique_prompts": "(every rollout is written to rollouts.jsonl)",
    "log_multimodal": "(text environments only)",
    "log_completions_hub_repo": "(rollouts.jsonl is the completion log; push_rollouts uploads it)",
    "num_generations_eval": "(evaluation plays one greedy episode per problem)",
    "cast_lm_head_to_fp32": "(log-probabilities are computed in float32 already)",
    "pad_to_multiple_of": "(micro-batches are cut into length buckets)",
    "cache_implementation": "(the transformers engine keeps its own growing cache)",
    "ds3_gather_for_generation": "(ZeRO-3 is not supported)",
    "vllm_group_port": "(weights reach a server through TRL's client defaults)",
    "vllm_model_impl": "(the engine loads the model vLLM's own way)",
    "router_aux_loss_coef": "(no mixture-of-experts loss term)",
    "multi_objective_aggregation": "(reward functions are summed with reward_weights)",
    "use_bias_correction_kl": "(the KL is to the reference, on sampled tokens)",
}
REFUSED = (
    "shuffle_dataset",
    "min_p",
    "repetition_penalty",
    "generation_kwargs",
    "vllm_structured_outputs_regex",
    "vllm_tensor_parallel_size",
    "delta",
    "sapo_temperature_neg",
    "sapo_temperature_pos",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "top_entropy_quantile",
    "entropy_coef",
    "use_adaptive_entropy",
    "entropy_coef_min",
    "entropy_coef_max",
    "entropy_coef_delta",
    "entropy_target",
    "vllm_importance_sampling_cap",
    "vllm_importance_sampling_clip_min",
    "off_policy_mask_threshold",
    "use_transformers_continuous_batching",
    "transformers_continuous_batching_config",
    "use_transformers_paged",
)
TRL_REF_MODEL_SYNC_STEPS = 512  # GRPOConfig's default, used when sync_ref_model=True names no interval


def _trl_field(name: str, grpo_fields: dict[str, dataclasses.Field]) -> tuple[str, Any, dataclasses.Field]:
    """A field with GRPOConfig's type and default, its help saying what it does here."""
    source = grpo_fields[name]
    if name in HONOURED:
        note = "As in TRL."
    elif name in INERT:
        note = f"Accepted for TRL scripts; no effect here {INERT[name]}."
    else:
        note = "Accepted for TRL scripts at TRL's default only: any other value is refused (not implemented here)."
    help_text = f"TRL's GRPOConfig.{name}. {note}"
    if source.default_factory is not dataclasses.MISSING:
        new = dataclasses.field(default_factory=source.default_factory, metadata={"help": help_text})
    else:
        new = dataclasses.field(default=source.default, metadata={"help": help_text})
    return name, source.type, new


def _make_settings() -> type:
    grpo_fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    names = [n for n in (*HONOURED, *INERT, *REFUSED) if n in grpo_fields]  # a TRL release may drop one
    return dataclasses.make_dataclass("GRPOSettings", [_trl_field(n, grpo_fields) for n in names])


GRPOSettings = _make_settings()
GRPOSettings.__doc__ = "GRPOConfig's settings under TRL's names (see the module docstring)."
GRPOSettings.__module__ = __name__


_TRL_DEFAULTS = {  # GRPOConfig's default of each setting, as its GRPOSettings field carries it
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(GRPOSettings)
}


def resolve_grpo_settings(config: Any) -> None:
    """Apply the honoured settings to ``config`` and refuse the unimplemented ones set away from TRL's default
    (``ValueError``, one line naming the flag, the value and the fix)."""
    for name in REFUSED:
        if name in _TRL_DEFAULTS and getattr(config, name) != _TRL_DEFAULTS[name]:
            raise ValueError(
                f"--{name} {getattr(config, name)!r}: StepwiseReinforceTrainer does not implement this GRPOConfig "
                f"setting; drop it (TRL's default, {_TRL_DEFAULTS[name]!r}, is what this trainer does)."
            )
    per_rollout = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if config.steps_per_generation not in (None, config.gradient_accumulation_steps):
        raise ValueError(
            f"--steps_per_generation {config.steps_per_generation}: this trainer rolls out once per optimizer step "
            f"(steps_per_generation = gradient_accumulation_steps = {config.gradient_accumulation_steps}); drop it "
            "and set --gradient_accumulation_steps instead."
        )
    if config.generation_batch_size not in (None, per_rollout):
        raise ValueError(
            f"--generation_batch_size {config.generation_batch_size}: this trainer rolls out one optimizer step's "
            f"episodes together (per_device_train_batch_size x gradient_accumulation_steps = {per_rollout}); drop "
            "it, or set those two so that their product is the generation batch you want."
        )
    config.generation_batch_size = per_rollout
    config.steps_per_generation = config.gradient_accumulation_steps
    if config.sync_ref_model and not config.ref_sync_steps:
        config.ref_sync_steps = TRL_REF_MODEL_SYNC_STEPS
    if config.trust_remote_code:
        config.model_init_kwargs = {"trust_remote_code": True, **(config.model_init_kwargs or {})}


def inert_grpo_settings(config: Any) -> list[tuple[bool, tuple[str, ...], str]]:
    """Rules for ``inert_flags``: each accepted GRPOConfig setting that does nothing here, with the reason."""
    names = [name for name in INERT if hasattr(config, name)]
    return [(True, (name,), f"in StepwiseReinforceTrainer {INERT[name]}") for name in names]
