"""``StepwiseReinforceTrainer``: stepwise rollouts + pluggable REINFORCE objectives on TRL's base trainer.

One optimizer step works like TRL's GRPO: the problems of ``gradient_accumulation_steps`` micro-batches are rolled
out together (``num_generations`` episodes each), scored, turned into per-token advantages, and then consumed one
micro-batch per ``training_step`` by the ``transformers.Trainer`` loop, which keeps gradient accumulation,
mixed precision, distributed sync, logging, checkpoints and callbacks.

This file is the loop: generate -> score -> loss -> log. Its rooms: ``builders`` (the policy, judge, teacher,
environments), ``scoring`` (rewards, returns, advantages), ``reference`` (the KL reference), ``metrics`` (what is
logged), ``sampler_guard`` (the sampler is the policy), ``saving`` (checkpoints and resume), ``batching`` (tensors and
log-probs).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, RandomSampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from trl_stepwise.algorithms import Algorithm, BehaviourLogps, build_algorithm
from trl_stepwise.curriculum import Curriculum
from trl_stepwise.engines import GenerationEngine, TransformersEngine
from trl_stepwise.engines.base import derive_seed
from trl_stepwise.engines.factory import build_engine
from trl_stepwise.engines.weights import policy_weights
from trl_stepwise.envs import EnvRouter, MathEnv
from trl_stepwise.models import build_quantization_config, load_tokenizer, quantization_bits
from trl_stepwise.prompting import AlternatingExamples
from trl_stepwise.quiet import quiet_run_logs
from trl_stepwise.rewards import as_reward_funcs
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout, Trajectory
from trl_stepwise.trainer._trl import BaseTrainer
from trl_stepwise.trainer.batching import micro_batches, score_completions, sequence_logps
from trl_stepwise.trainer.builders import (
    as_problems,
    build_judge,
    build_policy,
    build_prompts,
    build_teacher,
)
from trl_stepwise.trainer.checkpoints import resolve_resume_checkpoint
from trl_stepwise.trainer.config import StepwiseReinforceConfig
from trl_stepwise.trainer.dynamic_sampling import ExtraProblems, PlayedGroups, fill_with_signal, step_returns
from trl_stepwise.trainer.environments import TrainerEnvironments
from trl_stepwise.trainer.evaluation import EVAL_SUMMARY_KEYS, evaluate_policy, named_eval_set
from trl_stepwise.trainer.metrics import TrainingMetrics, append_rollouts
from trl_stepwise.trainer.parallelism import check_accelerator
from trl_stepwise.trainer.progress import show_reward_on_progress_bar, use_compact_logs
from trl_stepwise.trainer.reference import ReferencePolicy
from trl_stepwise.trainer.rounds import play_round, promote_curriculum
from trl_stepwise.trainer.sampler_guard import SamplerGuard
from trl_stepwise.trainer.saving import CheckpointMixin
from trl_stepwise.trainer.scoring import (
    episode_scores,
    global_advantages,
    global_normalisers,
    token_advantages,
)
from trl_stepwise.trainer.setup import check_engine_setup
from trl_stepwise.trainer.sharded_state import resumable
from trl_stepwise.trainer.sharding import agreed_count, is_sharded, masked_out, shards_on_prepare

logger = logging.getLogger(__name__)

__all__ = ["StepwiseReinforceTrainer", "build_quantization_config"]


class StepwiseReinforceTrainer(CheckpointMixin, BaseTrainer):
    """Stepwise REINFORCE with a baseline and a periodically refreshed reference model.

    Drop-in for TRL users: ``StepwiseReinforceTrainer(model="...", args=StepwiseReinforceConfig(...),
    train_dataset=ds).train()``. The dataset holds the columns the environment reads (``Env.required_columns``: the
    math environments' ``question`` and ``answer``, other names mapped by ``trl_stepwise.data.normalise_columns``).
    """

    _tag_names = ["trl", "trl-stepwise", "reinforce"]
    _name = "StepwiseReinforce"
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        args: StepwiseReinforceConfig | None = None,
        train_dataset: Dataset | str | None = None,
        eval_dataset: Dataset | str | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_funcs: Callable | Sequence[Callable] | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        few_shot_dataset: Dataset | AlternatingExamples | None = None,
        algorithm: Algorithm | None = None,
        curriculum: Any = None,
        judge: Any = None,
        teacher_model: str | PreTrainedModel | None = None,
        env: str | type | Callable[[], Any] | None = None,
        environment_factory: Callable[[], Any] | dict[str, Callable[[], Any]] | None = None,
        tools: Sequence[Callable[..., Any]] | None = None,
    ) -> None:
        args = args or StepwiseReinforceConfig(output_dir="outputs/stepwise-reinforce")
        check_engine_setup(args, peft_config, *quantization_bits(model, args.model_init_kwargs))  # before loading
        reward_funcs = as_reward_funcs(reward_funcs)
        quiet_run_logs(args.third_party_logs)
        environments = TrainerEnvironments(args, env if env is not None else args.env_id, environment_factory, tools)
        env_few_shot, env_columns = environments.default_settings()
        environments.chat_turns(processing_class)  # a template that cannot render tools: refused before loading
        model, model_name = build_policy(model, args, peft_config)
        if processing_class is None:
            processing_class = load_tokenizer(model_name)
        self.chat_turns = environments.chat_turns(processing_class)
        if curriculum is None and args.curriculum:
            curriculum = Curriculum.from_config(args)
        self.curriculum = curriculum
        train_dataset = as_problems(train_dataset, "train", env_columns) if train_dataset is not None else None
        eval_dataset = as_problems(eval_dataset, "test", env_columns) if eval_dataset is not None else None
        if train_dataset is None and curriculum is None:
            raise ValueError("StepwiseReinforceTrainer needs a train_dataset (a Dataset or a bundled name: 'gsm8k').")
        if train_dataset is None:
            train_dataset = curriculum.placeholder_dataset()
            few_shot_dataset = few_shot_dataset if few_shot_dataset is not None else curriculum.few_shot_rows()
        with resumable(model, args):  # a model sharded at load time: its shards are checkpointed here
            super().__init__(
                model=model,
                args=args,
                data_collator=_identity,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
            )
        check_accelerator(self.accelerator.state, args.use_vllm, sharded_model=is_sharded(self.model))
        # FSDP2 / ZeRO-3: every process makes the same model calls (sharding.py); now or once prepare shards it
        self.sharded = is_sharded(self.model) or shards_on_prepare(self.accelerator.state)
        use_compact_logs(self)
        self.reward_funcs = reward_funcs
        self.algorithm = algorithm or build_algorithm(args.algorithm, args.algorithm_settings())
        self.flavour = environments.flavour
        n_few_shot = env_few_shot if args.n_few_shot is None or environments.all_chat else args.n_few_shot
        self.prompt_builder = build_prompts(
            args, processing_class, few_shot_dataset, train_dataset, self.flavour, n_few_shot
        )
        self.reference = ReferencePolicy(
            self.model,
            kl_coef=args.kl_coef,
            sync_steps=args.ref_sync_steps,
            mixup_alpha=args.ref_model_mixup_alpha,
            sharded=self.sharded,
        )
        self.environments = environments
        environments.check_datasets(train_dataset, eval_dataset)
        self.judge = judge if judge is not None else build_judge(args, self.accelerator.device)
        self.teacher = build_teacher(teacher_model or args.teacher_model, args, processing_class)
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.accelerator.device)
        self.metrics = TrainingMetrics(self.accelerator)
        self.sampler_guard = SamplerGuard(args.sampler_logprob_tolerance, args.sampler_logprob_patience)
        self._buffer: list[dict] = []
        self._buffer_uses = 0
        self._last_rollout_end: float | None = None
        self._extra_problems = ExtraProblems(
            self.train_dataset, curriculum, args.seed, self.accelerator.process_index, self.accelerator.num_processes
        )
        self.add_callback(_StepEndCallback(self))
        self._engine: GenerationEngine | None = None
        self._engine_step: int | None = None  # global step of the weights the engine holds (None: not yet pushed)

    @property
    def ref_model(self) -> PreTrainedModel | None:
        """The frozen full copy of the reference (None for peft policies and without a KL term), as in TRL."""
        return self.reference.model

    # ------------------------------------------------------------------ environment and rollout
    def make_env(self, max_episode_tokens: int | None = None, flavour: str | None = None) -> MathEnv:
        """A fresh math environment for one episode, configured from the trainer's arguments."""
        return self.environments.math_env(max_episode_tokens, flavour)

    def env_router(self, max_episode_tokens: int | None = None) -> EnvRouter:
        """Each row's environment (``trainer.environments``: the row's ``env``, else ``env=``, else math)."""
        return self.environments.router(max_episode_tokens)

    def rollout_engine(self, sampling: SamplingConfig | None = None) -> StepwiseRollout:
        args = self.args
        sampling = sampling or SamplingConfig(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_step_tokens=args.max_step_tokens,
            batch_size=args.rollout_batch_size,
            bf16=args.rollout_bf16,
            # another draw every step and process, the same on a resume
            seed=derive_seed(args.seed, self.state.global_step, self.accelerator.process_index),
        )
        prompts = self.prompt_builder
        if args.few_shot_pool_size is not None:  # another draw of the pool every optimizer step (resumes the same)
            prompts = prompts.rotated(self.state.global_step)
        return StepwiseRollout(
            None,
            self.processing_class,
            prompts,
            sampling,
            step_delimiter=args.step_delimiter,
            calculator=args.calculator,
            engine=self.generation_engine(),
            chat=self.chat_turns,
        )

    def generation_engine(self) -> GenerationEngine:
        """The engine that generates rollouts, holding the current policy weights (pushed after each update)."""
        if self._engine is None:
            model = self.accelerator.unwrap_model(self.model)
            self._engine = build_engine(self.args, model, self.processing_class, seed=self.args.seed)
        if not isinstance(self._engine, TransformersEngine) and self._engine_step != self.state.global_step:
            started = time.perf_counter()
            with policy_weights(self.accelerator.unwrap_model(self.model)) as weights:
                self._engine.sync_weights(weights)
            self._engine_step = self.state.global_step
            self.metrics.add("time/weight_sync_s", time.perf_counter() - started)
        return self._engine

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """Batches of problems (not episodes): each problem becomes ``num_generations`` episodes in the rollout."""
        generator = torch.Generator().manual_seed(self.args.seed)
        loader = DataLoader(
            self.train_dataset,
            batch_size=self._problems_per_loader_batch(),
            sampler=RandomSampler(self.train_dataset, generator=generator),
            collate_fn=_identity,
            drop_last=True,
        )
        return self.accelerator.prepare(loader)

    def _problems_per_loader_batch(self) -> int:
        """Problems per loader batch: a micro-batch's worth when it holds whole groups, else 1, so that an
        accumulation cycle pulls exactly ``generation_batch_size / num_generations`` problems (5 episodes per
        micro-batch with 2 per problem would otherwise pull 3 problems for 2 micro-batches of 5: 12 episodes)."""
        args = self.args
        if args.per_device_train_batch_size % args.num_generations == 0:
            return args.problems_per_batch
        return 1

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: Any = None):
        """Roll out the problems of a whole accumulation cycle at once and split the episodes into micro-batches."""
        if self._buffer and self._buffer_uses < self.args.num_iterations:
            self._buffer_uses += 1
            return self._buffer, None
        problems: list[dict] = []
        wanted = max(1, num_batches * self.args.per_device_train_batch_size // self.args.num_generations)
        while len(problems) < wanted:
            try:
                problems.extend(next(epoch_iterator))
            except StopIteration:
                break
        if not problems:
            return [], None
        pulled = min(
            num_batches, -(-len(problems) * self.args.num_generations // self.args.per_device_train_batch_size)
        )
        if self.curriculum is not None:
            problems = self.curriculum.sample(
                len(problems), rank=self.accelerator.process_index, world_size=self.accelerator.num_processes
            )
        self._buffer = self._generate_and_score(problems, pulled)
        self._buffer_uses = 1
        return self._buffer, None

    # ------------------------------------------------------------------ generate -> score
    def _generate_and_score(self, problems: list[dict], num_micro_batches: int) -> list[dict]:
        """Play ``num_generations`` episodes per problem (more groups with ``dynamic_sampling``), score them and cut
        them into micro-batches."""
        started = time.perf_counter()
        rollout = self.rollout_engine()
        played = play_round(self, rollout, problems, round_number=0)
        if self.args.dynamic_sampling:
            played, stats = fill_with_signal(
                played,
                len(problems),
                lambda n, round_number: play_round(self, rollout, self._extra_problems.draw(n), round_number),
                functools.partial(
                    step_returns,
                    algorithm=self.algorithm,
                    answer_reward_weight=self.args.answer_reward_weight,
                    judge_weight=self.args.judge_weight,
                ),
                self.args.dynamic_sampling_max_rounds,
            )
            for name, value in stats.metrics().items():
                self.metrics.add(name, value)
        if self.args.reference_guidance:
            self.metrics.add_guidance(played.guidance)
        generation_seconds = time.perf_counter() - started
        batches = self._score(played, num_micro_batches)
        self.metrics.add("rollout_tokens_per_second", rollout.stats.tokens_per_second)
        self.metrics.add("time/generation_s", generation_seconds)
        self.metrics.add("time/scoring_s", time.perf_counter() - started - generation_seconds)
        if self.curriculum is not None:
            if promote_curriculum(self.curriculum, played, self.accelerator.num_processes):
                self.metrics.add("curriculum/promoted", 1.0)
        self._last_rollout_end = time.perf_counter()
        return batches

    def _score(self, played: PlayedGroups, num_micro_batches: int) -> list[dict]:
        """Per-step returns -> advantages over every process -> micro-batches with the log-probs the loss needs
        (policy at rollout time, reference, teacher, engine)."""
        args = self.args
        trajectories, judged = played.trajectories, played.judged
        policy_logps, policy_sampling_logps, ref_logps = self._rollout_logps(trajectories)
        teacher_logps = None if self.teacher is None else self._logps(self.teacher, trajectories)
        scores = episode_scores(
            trajectories,
            judged,
            policy_logps,
            ref_logps,
            answer_reward_weight=args.answer_reward_weight,
            judge_weight=args.judge_weight,
        )
        returns = [sum(score.step_rewards) for score in scores]
        advantages = token_advantages(trajectories, global_advantages(self.algorithm, scores, self.accelerator))
        out_of_loss = [args.mask_truncated_completions and t.episode.truncated for t in trajectories]
        num_tokens, num_sequences = global_normalisers(trajectories, self.accelerator, out_of_loss)
        batches = micro_batches(
            trajectories,
            advantages,
            num_micro_batches,
            pad_id=self.processing_class.pad_token_id,
            old_logps=policy_logps,
            ref_logps=ref_logps,
            teacher_logps=teacher_logps,
            sampling_logps=[t.sampling_logps for t in trajectories],
            old_sampling_logps=policy_sampling_logps,
            out_of_loss=out_of_loss,
        )
        for batch in batches:
            batch.update(num_tokens=num_tokens, num_sequences=num_sequences, num_micro_batches=len(batches))
            batch["ref_is_policy"] = self.reference.serves_from_loss(ref_logps)
        if self.sharded:  # every process trains on as many micro-batches as the one with the most
            wanted = agreed_count(len(batches), self.accelerator.num_processes)
            batches += [masked_out(batches[-1]) for _ in range(wanted - len(batches))]
        self.metrics.record_rollout(
            trajectories,
            returns,
            sampled=played.sampled,
            judged=judged,
            samples_to_print=args.num_completions_to_print,
        )
        if args.log_rollouts:
            append_rollouts(
                args.output_dir, self.accelerator.process_index, self.state.global_step, trajectories, played.extra
            )
        return batches

    @torch.no_grad()
    def _rollout_logps(self, trajectories: list[Trajectory]):
        """``(policy, policy under the sampling filter, reference)`` log-probs of the sampled tokens: the rollout
        policy's when needed (later iterations of a batch, KL in the reward), the reference's when there is one."""
        args = self.args
        need_policy = args.num_iterations > 1 or (args.kl_coef > 0 and bool(args.kl_in_reward))
        model = self.accelerator.unwrap_model(self.model)
        policy, policy_sampling = self._logps(model, trajectories, filtered=True) if need_policy else (None, None)
        scorer = functools.partial(self._logps, trajectories=trajectories)
        return policy, policy_sampling, self.reference.score_unless_policy(model, scorer, policy)

    def _logps(self, model: PreTrainedModel, trajectories: list[Trajectory], filtered: bool = False):
        """Log-probs of every completion token; with ``filtered``, a pair: also those under the sampling filter."""
        return sequence_logps(
            model,
            trajectories,
            pad_id=self.processing_class.pad_token_id,
            max_tokens=self.args.logprob_batch_tokens,
            temperature=self.args.temperature,
            top_k=self.args.top_k,
            top_p=self.args.top_p,
            filtered=filtered,
            autocast=self.accelerator.autocast,  # the reference and teacher sit outside accelerator.prepare
            sharded_over=self.accelerator.num_processes if is_sharded(model) else 0,
        )

    # ------------------------------------------------------------------ loss
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        """The whole loss pass in one autocast region (HF's hook, a no-op there): each weight is cast to bfloat16
        once per step, not once per forward call (prefix, prompts, length buckets); the same log-probs."""
        return self.accelerator.autocast()

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        args = self.args
        scores = score_completions(
            model,
            inputs,
            temperature=args.temperature,
            with_entropy=True,
            prefix_model=self.accelerator.unwrap_model(model),
            top_k=args.top_k,
            top_p=args.top_p,
            sharded_over=self.accelerator.num_processes if self.sharded else 0,
        )
        logps, mask = scores.logps, inputs["completion_mask"]
        old = inputs.get("old_logps")
        old = logps.detach() if old is None else old
        # the trainer's log-prob of each sampled token under the engine's own sampling distribution (top-k / top-p
        # applied), at the weights that sampled it: the quantity the engine's log-probs are compared with
        old_sampling = inputs.get("old_sampling_logps")
        behaviour = BehaviourLogps(
            engine=inputs["sampling_logps"],
            trainer=scores.sampling_logps if old_sampling is None else old_sampling,
            mask=inputs["sampled_mask"],
        )
        ref = inputs.get("ref_logps")
        ref = logps.detach() if ref is None and inputs.get("ref_is_policy") else ref  # the reference is the policy
        token_losses = self.algorithm.token_loss(logps, old, ref, inputs["advantages"], behaviour, mask=mask)
        teacher = inputs.get("teacher_logps")
        distill = None
        if teacher is not None:
            distill = self.algorithm.distill(logps, teacher)
            token_losses = token_losses + args.distill_coef * distill
        loss = self.algorithm.reduce(
            token_losses, mask, inputs["num_tokens"], inputs["num_sequences"], inputs["num_micro_batches"]
        )
        gap_sum, gap_count = self.metrics.add_loss_metrics(
            self.algorithm, logps, old, ref, distill, scores.entropy, mask, behaviour
        )
        self.sampler_guard.add(gap_sum, gap_count)
        return loss

    # ------------------------------------------------------------------ after each optimizer step
    def sync_reference(self) -> None:
        """Move the reference to the policy now (a copy, or a soft update with ``ref_model_mixup_alpha`` < 1)."""
        self.reference.refresh(self.accelerator.unwrap_model(self.model))
        self.metrics.add("ref_syncs", 1.0)

    def _on_step_end(self) -> None:
        """The sampler guard, then the reference refresh (TRL's ``SyncRefModelCallback`` timing: the step's own
        rollout was scored against the previous reference, and the next rollout sees the new one)."""
        step = self.state.global_step
        self.sampler_guard.check(step)
        self.reference.policy_changed()
        if self.reference.due(step):
            self.sync_reference()
            self.reference.last_sync = step

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.metrics.values and not any(key.startswith("eval_") for key in logs):
            if self._last_rollout_end is not None:  # the step just finished: its optimizer work since its rollout
                self.metrics.add("time/optimisation_s", time.perf_counter() - self._last_rollout_end)
            if self.curriculum is not None:
                self.metrics.add("curriculum/stage", float(self.curriculum.stage))
            self.metrics.flush(
                logs,
                self.state.global_step,
                is_main=self.is_world_process_zero(),
                wandb="wandb" in (self.args.report_to or []),
            )
            show_reward_on_progress_bar(self, logs)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Accuracy on a fixed subset of the eval set (greedy), sharded across processes, logged as eval_accuracy."""
        dataset = named_eval_set(self, eval_dataset if eval_dataset is not None else self.eval_dataset)
        if isinstance(dataset, dict):  # several eval sets: one block of metrics (and one log) each
            metrics: dict[str, float] = {}
            for name, subset in dataset.items():
                metrics.update(self.evaluate(subset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        summary = evaluate_policy(self, dataset)
        metrics = {f"{metric_key_prefix}_{key}": float(summary[key]) for key in EVAL_SUMMARY_KEYS}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; ``resume_from_checkpoint`` True or "true" resumes from the newest *complete*
        checkpoint in ``output_dir`` (a folder whose save was interrupted is never picked)."""
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        output = super().train(resume, *args, **kwargs)
        self.plot_curves()
        return output


def _identity(batch):
    return batch


class _StepEndCallback(TrainerCallback):
    """Runs the trainer's after-step work at ``on_step_end`` (after the optimizer step)."""

    def __init__(self, trainer: StepwiseReinforceTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_step_end()
