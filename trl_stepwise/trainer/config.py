"""``StepwiseReinforceConfig``: every knob of stepwise REINFORCE, on top of TRL's trainer configuration."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from trl_stepwise.algorithms import ALGORITHMS, BASELINES, KL_ESTIMATORS, AlgorithmSettings
from trl_stepwise.engines.config import GenerationEngineArguments, inert_flags
from trl_stepwise.trainer._trl import BaseConfig
from trl_stepwise.trainer.config_checks import check_ranges
from trl_stepwise.trainer.grpo_settings import GRPOSettings, inert_grpo_settings, resolve_grpo_settings
from trl_stepwise.trainer.objective_config import ObjectiveArguments
from trl_stepwise.trainer.parallelism import check_launch
from trl_stepwise.trainer.tool_config import ToolArguments

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 / AMX): on others (AVX2 only) torch emulates it, and
    a training step under bfloat16 autocast took ~20x longer than in float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an unknown build: leave the choice to the user
        return True


JUDGE_FLAGS = (
    "judge_mode",
    "judge_weight",
    "judge_prompt",
    "judge_questions",
    "judge_batch_size",
    "judge_device",
    "judge_load_in_4bit",
)
CURRICULUM_FLAGS = (
    "curriculum_thresholds",
    "curriculum_min_steps",
    "curriculum_max_steps",
    "curriculum_window",
    "curriculum_replay",
)


@dataclass
class StepwiseReinforceConfig(ToolArguments, ObjectiveArguments, GenerationEngineArguments, GRPOSettings, BaseConfig):
    """Configuration of ``StepwiseReinforceTrainer``.

    Batch sizes follow TRL's GRPO convention: ``per_device_train_batch_size`` counts episodes (completions), and
    must be a multiple of ``num_generations``; the episodes of ``gradient_accumulation_steps`` micro-batches are
    generated together in one rollout before the optimizer step that uses them.
    """

    _VALID_DICT_FIELDS = [*BaseConfig._VALID_DICT_FIELDS, "chat_template_kwargs", "model_init_kwargs"]

    # ---- rollouts
    num_generations: int = field(default=8, metadata={"help": "Episodes per problem (G): the group for the baseline."})
    max_episode_steps: int | None = field(
        default=None, metadata={"help": "Most reasoning steps per episode (default: the environment flavour's)."}
    )
    max_step_tokens: int = field(default=96, metadata={"help": "Most tokens the policy may write in one step."})
    max_episode_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of one episode (policy tokens; default 384)."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Alias of max_episode_tokens (TRL's GRPO name): the episode token budget."}
    )
    step_delimiter: str = field(
        default="\n", metadata={"help": "Text that ends a step. Use single-step mode with --max_episode_steps 1."}
    )
    calculator: bool = field(default=True, metadata={"help": "Fill `<<expr=` calculations with the safe calculator."})
    env_flavour: str | None = field(
        default=None,
        metadata={
            "help": "Environment flavour: gsm8k, math, arithmetic or one added with register_flavour (default: from "
            "the dataset)."
        },
    )
    env_id: str | None = field(
        default=None,
        metadata={
            "help": "Registered environment id (trl_stepwise.envs.make: gsm8k, math, arithmetic, math_feedback, "
            "countdown, or your own) every episode runs in; default: the math environment of env_flavour. A dataset "
            "column `env` picks one per row."
        },
    )
    n_few_shot: int | None = field(
        default=None,
        metadata={
            "help": "Solved examples in each prompt. Default: the environment's own (`Env.n_few_shot`): 4 for the "
            "math environments, 0 for others, so your own environment gets none unless it (or this flag) asks."
        },
    )
    few_shot_seed: int = field(default=0, metadata={"help": "Seed that draws the few-shot examples."})
    max_example_chars: int | None = field(
        default=None, metadata={"help": "Only use few-shot examples shorter than this (keeps prompts short on CPU)."}
    )
    few_shot_pool_size: int | None = field(
        default=None,
        metadata={
            "help": "Draw the few-shot examples of each training step from a pool of this many (every problem of a "
            "step sees the same ones), so the model learns to follow worked examples, not one fixed set; evaluation "
            "keeps the first n_few_shot of the pool. Default: the same n_few_shot examples every step."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt: a bundled name (gsm8k, math, arithmetic) or a file path."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of training rollouts (> 0; evaluation is greedy)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of training rollouts (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of training rollouts (0 = off)."})
    rollout_batch_size: int = field(
        default=64,
        metadata={"help": "Episodes decoded together in one batch (transformers engine; vLLM batches continuously)."},
    )
    rollout_bf16: bool = field(
        default=False, metadata={"help": "bfloat16 autocast during generation (transformers engine only)."}
    )
    sampler_logprob_tolerance: float = field(
        default=0.5,
        metadata={
            "help": "Stop training when the mean |log-prob difference| per sampled token between the generation "
            "engine and the trainer (sampling/sampling_logp_difference/mean, measured every step on every engine) "
            "stays above this for sampler_logprob_patience optimizer steps in a row: the engine no longer samples "
            "the policy being trained. 0 turns the check off."
        },
    )
    sampler_logprob_patience: int = field(
        default=3, metadata={"help": "Optimizer steps in a row above sampler_logprob_tolerance before the stop."}
    )

    # ---- rewards
    format_reward_weight: float = field(default=0.0, metadata={"help": "Weight of the well-formed-answer reward."})
    step_penalty: float = field(default=0.0, metadata={"help": "Reward subtracted per step taken."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the extra reward_funcs passed to the trainer (default 1 each)."}
    )

    # ---- judge step rewards and teacher distillation
    judge_model: str | None = field(
        default=None,
        metadata={
            "help": "Causal LM that rewards every step (hub id, path, or smollm2-135m-instruct for the embedded "
            "model); None = no judge. It is frozen and never trained."
        },
    )
    judge_mode: str = field(
        default="score",
        metadata={"help": "score: expected 1-10 rating from digit probabilities; yes_no: mean P(yes) of questions."},
    )
    judge_weight: float = field(
        default=1.0, metadata={"help": "Non-negative weight of the judge's per-step score (the score lies in [0, 1])."}
    )
    judge_prompt: str | None = field(
        default=None,
        metadata={"help": "File replacing the bundled judge prompt ({question}, {previous_steps}, {step})."},
    )
    judge_questions: str | None = field(
        default=None, metadata={"help": "File of yes/no questions for judge_mode yes_no, one per line."}
    )
    judge_batch_size: int = field(default=16, metadata={"help": "Steps scored per judge forward pass."})
    judge_device: str | None = field(
        default=None, metadata={"help": "Device of the judge, e.g. cuda:1 (default: the policy's device)."}
    )
    judge_load_in_4bit: bool = field(default=False, metadata={"help": "Load the judge in 4-bit NF4 (bitsandbytes)."})
    answer_reward_weight: float = field(
        default=1.0, metadata={"help": "Weight of the final-answer reward when combined with judge step rewards."}
    )
    teacher_model: str | None = field(
        default=None,
        metadata={"help": "Frozen teacher for distillation (hub id or path; same tokenizer as the policy)."},
    )
    distill_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the loss term pulling the log-probs of sampled tokens to the teacher's."},
    )
    reference_guidance: bool = field(
        default=False,
        metadata={
            "help": "When every episode of a problem's group fails, replace one of them with the problem's worked "
            "solution, played through the same prompt and environment (off-policy guidance): such a group then has "
            "something to learn from instead of zero advantages. Problems without a worked solution (final answers "
            "only) are left as they are; accuracy and the curriculum count the sampled episodes only."
        },
    )

    # ---- curriculum
    curriculum: list[str] | None = field(
        default=None,
        metadata={
            "help": "Problem sources in order, e.g. arithmetic:level=1 arithmetic:level=2 gsm8k_easy gsm8k. "
            "When set, training problems come from the current stage instead of train_dataset."
        },
    )
    curriculum_thresholds: list[float] | None = field(
        default=None,
        metadata={"help": "Rolling training accuracy that promotes each stage (one value, or one per stage)."},
    )
    curriculum_min_steps: int = field(default=5, metadata={"help": "Fewest optimizer steps in a stage."})
    curriculum_max_steps: int | None = field(default=None, metadata={"help": "Most optimizer steps in a stage."})
    curriculum_window: int = field(default=64, metadata={"help": "Episodes in the rolling training accuracy."})
    curriculum_replay: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of each step's problems drawn from the stages already passed (in turn), so that a stage "
            "the policy cannot solve yet still leaves it something to learn from; in [0, 1)."
        },
    )

    # ---- evaluation and logging
    eval_num_problems: int = field(default=100, metadata={"help": "Problems of eval_dataset used by each evaluation."})
    eval_max_episode_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of one evaluation episode (default: max_episode_tokens)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Episodes decoded together during evaluation."})
    cache_start_evaluation: bool = field(
        default=True,
        metadata={
            "help": "Reuse the evaluation before the first optimizer step from an identical earlier run (the same "
            "weights, problems, prompts, settings, engine, libraries and code: the key hashes them all), kept in the "
            "model cache folder; false computes it again."
        },
    )
    log_rollouts: bool = field(default=True, metadata={"help": "Append every rollout to output_dir/rollouts.jsonl."})
    push_rollouts: bool = field(
        default=False, metadata={"help": "Upload rollouts*.jsonl with push_to_hub (off: they stay local)."}
    )
    num_completions_to_print: int = field(default=1, metadata={"help": "Sample transcripts printed at each log."})
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra from_pretrained kwargs when the trainer loads the model by name, a dict or a JSON string, "
            'e.g. \'{"distributed_config": {"fsdp_size": 2}}\' to shard the model at load time (FSDP2).'
        },
    )
    model_dtype: str = field(
        default="float32", metadata={"help": "dtype to load the model in (float32, bfloat16, auto)."}
    )

    # ---- TRL-convention overrides
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate of AdamW."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory (recomputes activations in backward)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision for training (default: on where CUDA supports it)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the environment needs every dataset column."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.model_init_kwargs, str) and self.model_init_kwargs.startswith("{"):  # from the CLI
            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        # FSDP1, and FSDP2 / ZeRO-3 without an engine on gathered weights: refused before any model loads
        check_launch(
            os.environ, self.deepspeed, self.fsdp, use_vllm=self.use_vllm, model_init_kwargs=self.model_init_kwargs
        )
        self.kl_coef = _alias(self.kl_coef, "kl_coef", self.beta, "beta", 0.05)
        self.ref_sync_steps = _alias(
            self.ref_sync_steps, "ref_sync_steps", self.ref_model_sync_steps, "ref_model_sync_steps", 0
        )
        self.max_episode_tokens = _alias(
            self.max_episode_tokens, "max_episode_tokens", self.max_completion_length, "max_completion_length", 384
        )
        if self.scale_advantages and self.scale_rewards not in (None, "batch"):
            raise ValueError(
                f"scale_advantages=True and scale_rewards={self.scale_rewards!r} disagree: scale_advantages is the "
                "older spelling of scale_rewards=batch; set only --scale_rewards."
            )
        if self.scale_rewards is None:
            self.scale_rewards = "batch" if self.scale_advantages else "none"
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.fp16)
        self._avoid_emulated_bf16()
        super().__post_init__()
        resolve_grpo_settings(self)  # GRPOConfig's own settings: honoured, inert or refused
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm={self.algorithm!r} is not registered; choose one of {', '.join(sorted(ALGORITHMS))} "
                "or register yours with trl_stepwise.algorithms.register_algorithm."
            )
        defaults = ALGORITHMS[self.algorithm].defaults
        if self.baseline is None:
            self.baseline = defaults.get("baseline", "leave_one_out")
        if self.kl_estimator is None:
            self.kl_estimator = defaults.get("kl_estimator", "k3")
        if self.kl_in_reward is None:
            self.kl_in_reward = defaults.get("kl_in_reward", False)
        self.resolve_objective()
        self._check()
        for line in self.inert_flags():
            logger.warning(line)

    def _avoid_emulated_bf16(self) -> None:
        """On a CPU without bfloat16 hardware, autocast is emulated and far slower than float32: train (and
        generate) in float32 there, and say so in one line."""
        flags = ["bf16"] if self.bf16 else []
        if self.rollout_bf16 and not self.use_vllm:  # with vLLM the flag does nothing and is reported as such
            flags.append("rollout_bf16")
        on_cpu = self.use_cpu or not torch.cuda.is_available()
        if not flags or not on_cpu or cpu_has_native_bf16():
            return
        for name in flags:
            setattr(self, name, False)
        logger.warning(
            "%s: this CPU has no bfloat16 hardware (torch CPU capability %s), so bfloat16 autocast would be emulated "
            "and ~20x slower than float32; running in float32 instead (pass %s to silence this).",
            " and ".join(f"--{name} true" for name in flags),
            torch.backends.cpu.get_cpu_capability(),
            " ".join(f"--{name} false" for name in flags),
        )

    def inert_flags(self) -> list[str]:
        """One line per flag set away from its default where this configuration makes it do nothing."""
        rules = [
            (self.use_vllm, ("rollout_batch_size", "rollout_bf16"), "with --use_vllm true (transformers engine only)"),
            (self.kl_coef == 0, ("ref_sync_steps", "ref_model_mixup_alpha"), "with --kl_coef 0 (no reference model)"),
            (self.baseline != "moving_average", ("moving_average_decay",), f"with --baseline {self.baseline}"),
            (
                self.num_iterations == 1 and self.loss_type != "cispo",
                ("epsilon", "epsilon_high", "importance_sampling_level"),
                "with --num_iterations 1 (the importance ratio is always 1)",
            ),
            (not self.dynamic_sampling, ("dynamic_sampling_max_rounds",), "without --dynamic_sampling"),
            (not self.judge_model, JUDGE_FLAGS, "without --judge_model"),
            (not self.curriculum, CURRICULUM_FLAGS, "without --curriculum"),
            (self.sampler_logprob_tolerance == 0, ("sampler_logprob_patience",), "with --sampler_logprob_tolerance 0"),
            *inert_grpo_settings(self),
        ]
        resolved = {"ref_sync_steps": 0, "epsilon_high": self.default_epsilon_high()}
        return self.inert_engine_flags(training=True) + inert_flags(self, rules, resolved=resolved)

    def _check(self) -> None:
        self.check_engine_arguments()
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline={self.baseline!r} is unknown; choose one of {', '.join(BASELINES)}.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; choose k1 or k3.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations={self.num_generations}; use at least 1 episode per problem.")
        if self.baseline == "leave_one_out" and self.num_generations < 2:
            raise ValueError(
                "The leave_one_out baseline needs num_generations >= 2 (it compares each episode with the others of "
                "its problem). Raise --num_generations, or pick --baseline batch_mean / moving_average / none."
            )
        if self.generation_batch_size % self.num_generations != 0:
            per_device, accumulation = self.per_device_train_batch_size, self.gradient_accumulation_steps
            raise ValueError(
                f"The generation batch ({per_device} x {accumulation} = {self.generation_batch_size} episodes: "
                "per_device_train_batch_size x gradient_accumulation_steps, rolled out together) must be divisible "
                f"by num_generations ({self.num_generations}) so that each problem's group stays together; set "
                f"--per_device_train_batch_size to a multiple of {self.num_generations} or adjust the accumulation."
            )
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef={self.kl_coef} is negative; use 0 (no reference model) or a positive weight.")
        if self.ref_sync_steps < 0:
            raise ValueError(f"ref_sync_steps={self.ref_sync_steps} is negative; use 0 (never refresh) or N > 0.")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature={self.temperature} cannot train: every episode of a group would be identical and every "
                "advantage 0; set --temperature > 0 (e.g. 0.7) for training (evaluation always decodes greedily)."
            )
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(
                f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in (0, 1]: pi_ref = alpha * pi + "
                "(1 - alpha) * pi_ref at each refresh; use 1.0 for a plain copy."
            )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; choose group, batch or none.")
        if self.scale_rewards == "group" and self.num_generations < 2:
            raise ValueError(
                "scale_rewards='group' divides by the std of each problem's group, which needs num_generations >= 2; "
                "raise --num_generations or use --scale_rewards batch / none."
            )
        if self.sampler_logprob_tolerance < 0 or self.sampler_logprob_patience < 1:
            raise ValueError(
                f"sampler_logprob_tolerance={self.sampler_logprob_tolerance}, sampler_logprob_patience="
                f"{self.sampler_logprob_patience}: use a tolerance >= 0 (0 = off, e.g. 0.5) and a patience >= 1."
            )
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations}; use >= 1 optimizer steps per batch of rollouts.")
        if self.judge_mode not in ("score", "yes_no"):
            raise ValueError(f"judge_mode={self.judge_mode!r}; choose score or yes_no.")
        if self.distill_coef < 0:
            raise ValueError(f"distill_coef={self.distill_coef} is negative; use 0 (no distillation) or more.")
        if self.max_step_tokens < 1 or self.max_episode_tokens < 1:
            raise ValueError(
                f"max_step_tokens={self.max_step_tokens}, max_episode_tokens={self.max_episode_tokens}: both must be "
                ">= 1."
            )
        check_ranges(self)

    @property
    def problems_per_batch(self) -> int:
        """Problems behind one micro-batch of episodes (0 when a micro-batch is smaller than a group)."""
        return self.per_device_train_batch_size // self.num_generations

    @property
    def problems_per_rollout(self) -> int:
        """Problems behind one rollout: ``generation_batch_size / num_generations``."""
        return self.generation_batch_size // self.num_generations

    def algorithm_settings(self) -> AlgorithmSettings:
        return AlgorithmSettings(
            gamma=self.gamma,
            baseline=self.baseline,
            scale_rewards=self.scale_rewards,
            baseline_per_step=self.baseline_per_step,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            kl_in_reward=bool(self.kl_in_reward),
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_episode_tokens,
            moving_average_decay=self.moving_average_decay,
            importance_sampling=(
                self.vllm_importance_sampling_mode
                if self.use_vllm and self.vllm_importance_sampling_correction
                else None
            ),
            importance_sampling_clip_max=self.vllm_importance_sampling_clip_max,
        )


def _alias(value, name: str, alias_value, alias_name: str, default):
    """Resolve a flag and its TRL-named alias: either may be set, both only when they agree."""
    if alias_value is not None and value is not None and alias_value != value:
        raise ValueError(
            f"{alias_name}={alias_value} and {name}={value} disagree: {alias_name} is an alias of {name}; set one."
        )
    if value is not None:
        return value
    return alias_value if alias_value is not None else default
