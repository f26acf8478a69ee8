"""``StepwiseReinforceTrainer``: stepwise rollouts + pluggable REINFORCE objectives on TRL's base trainer.

One optimizer step works like TRL's GRPO: the problems of ``gradient_accumulation_steps`` micro-batches are rolled
out together (``num_generations`` episodes each), scored, turned into per-token advantages, and then consumed one
micro-batch per ``training_step`` by the ``transformers.Trainer`` loop, which keeps gradient accumulation,
mixed precision, distributed sync, logging, checkpoints and callbacks.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints

from trl_stepwise.algorithms import Algorithm, EpisodeScores, build_algorithm
from trl_stepwise.curriculum import STAGE_COLUMN, Curriculum
from trl_stepwise.data import load_math_dataset, normalise_columns
from trl_stepwise.engines import GenerationEngine, TransformersEngine
from trl_stepwise.engines.base import derive_seed
from trl_stepwise.engines.factory import build_engine
from trl_stepwise.engines.weights import policy_weights
from trl_stepwise.envs import FLAVOURS, EndReason, EnvRouter, StepwiseMathEnv, make_limited, resolve_env_factory
from trl_stepwise.guidance import failed_groups, play_references, reference_text
from trl_stepwise.models import build_quantization_config, load_model, load_tokenizer
from trl_stepwise.prompting import PromptBuilder, load_system_prompt, with_worked_examples
from trl_stepwise.rewards import combine_rewards, unique_name
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout, Trajectory
from trl_stepwise.trainer._trl import BaseTrainer
from trl_stepwise.trainer.batching import micro_batches, pad_trajectories, score_completions
from trl_stepwise.trainer.checkpoints import (
    publish_checkpoint,
    remove_stale_staging,
    resolve_resume_checkpoint,
    staging_dir,
)
from trl_stepwise.trainer.config import StepwiseReinforceConfig
from trl_stepwise.trainer.hub import ROLLOUT_FILES, uploads_ignoring
from trl_stepwise.trainer.parallelism import check_accelerator
from trl_stepwise.trainer.progress import CompactPrinterCallback, CompactProgressCallback
from trl_stepwise.trainer.reference import (
    REFERENCE_ADAPTER,
    add_reference_adapter,
    copy_policy_to_reference,
    load_reference_adapter,
    needs_initial_snapshot,
    policy_adapter,
)
from trl_stepwise.trainer.setup import check_engine_setup

logger = logging.getLogger(__name__)

SAMPLER_GAP = "sampling/sampling_logp_difference/mean"  # TRL's name: mean |log pi_trainer - log pi_engine|
STATE_FILE = "stepwise_state.json"
REFERENCE_FILE = "reference_model.pt"


class StepwiseReinforceTrainer(BaseTrainer):
    """Stepwise REINFORCE with a baseline and a periodically refreshed reference model.

    Drop-in for TRL users: ``StepwiseReinforceTrainer(model="...", args=StepwiseReinforceConfig(...),
    train_dataset=ds).train()``. The dataset needs ``question`` and ``answer`` columns (other names are mapped by
    ``trl_stepwise.data.normalise_columns``).
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
        reward_funcs: Sequence[Callable] | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        few_shot_dataset: Dataset | None = None,
        algorithm: Algorithm | None = None,
        curriculum: Any = None,
        judge: Any = None,
        teacher_model: str | PreTrainedModel | None = None,
        env: str | type | Callable[[], Any] | None = None,
        environment_factory: Callable[[], Any] | dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        args = args or StepwiseReinforceConfig(output_dir="outputs/stepwise-reinforce")
        if model is None or isinstance(model, str):  # what from_pretrained will be asked for
            quantization = (args.model_init_kwargs or {}).get("quantization_config")
            bits = (getattr(quantization, "load_in_4bit", False), getattr(quantization, "load_in_8bit", False))
        else:
            bits = (getattr(model, "is_loaded_in_4bit", False), getattr(model, "is_loaded_in_8bit", False))
        check_engine_setup(args, peft_config, *map(bool, bits))  # before any model loads
        if model is None or isinstance(model, str):
            model_name = model
            init_kwargs = dict(args.model_init_kwargs or {})  # every from_pretrained kwarg (attn_implementation, ...)
            dtype = init_kwargs.pop("dtype", init_kwargs.pop("torch_dtype", args.model_dtype))
            model = load_model(model_name, dtype=dtype, **init_kwargs)
        else:
            model_name = _model_id(model)
            if args.model_init_kwargs:
                logger.warning(
                    "model_init_kwargs (%s) are ignored: the model was passed already loaded; pass its name instead.",
                    ", ".join(sorted(args.model_init_kwargs)),
                )
        if processing_class is None:
            processing_class = load_tokenizer(model_name)
        model = _attach_peft(model, peft_config)
        _check_trainable_precision(model, args)
        if curriculum is None and args.curriculum:
            curriculum = Curriculum.from_config(args)
        self.curriculum = curriculum
        train_dataset = _as_problems(train_dataset, "train") if train_dataset is not None else None
        eval_dataset = _as_problems(eval_dataset, "test") if eval_dataset is not None else None
        if train_dataset is None and curriculum is None:
            raise ValueError(
                "StepwiseReinforceTrainer needs a train_dataset (a Dataset or a bundled name like 'gsm8k')."
            )
        if train_dataset is None:
            train_dataset = curriculum.placeholder_dataset()
            few_shot_dataset = few_shot_dataset if few_shot_dataset is not None else curriculum.few_shot_rows()
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
        check_accelerator(self.accelerator.state)
        self._use_compact_logs()
        self.reward_funcs = list(reward_funcs or [])
        self.algorithm = algorithm or build_algorithm(args.algorithm, args.algorithm_settings())
        flavour = args.env_flavour or "gsm8k"
        self.flavour = flavour
        examples = few_shot_dataset if few_shot_dataset is not None else train_dataset
        source = "the few-shot dataset" if few_shot_dataset is not None else "the training set"
        examples, note = with_worked_examples(list(examples), flavour, source=source)
        if note:
            logger.warning(note)
        self.prompt_builder = PromptBuilder(
            processing_class,
            examples,
            k=args.n_few_shot,
            system_prompt=load_system_prompt(args.system_prompt, flavour),
            flavour=flavour,
            seed=args.few_shot_seed,
            max_example_chars=args.max_example_chars,
            pool_size=args.few_shot_pool_size,
        )
        if is_peft_model(self.model) and args.kl_coef > 0 and args.ref_model_mixup_alpha < 1.0:
            raise ValueError(
                f"ref_model_mixup_alpha={args.ref_model_mixup_alpha} cannot soft-refresh a peft reference (mixing "
                "LoRA factors does not mix the adapters' weight updates); use --ref_model_mixup_alpha 1.0 with peft."
            )
        if args.kl_coef > 0 and args.ref_sync_steps == 1 and args.ref_model_mixup_alpha == 1.0:
            logger.warning(
                "ref_sync_steps=1 copies the policy into the reference after every step, so each rollout is scored "
                "against itself: the KL is 0 except on later iterations of a batch (num_iterations > 1). Use "
                "--ref_sync_steps >= 2 or a soft refresh (--ref_model_mixup_alpha < 1)."
            )
        self.ref_model: PreTrainedModel | None = None
        self._has_ref_adapter = False
        self._policy_adapter = policy_adapter(self.model) if is_peft_model(self.model) else None
        if args.kl_coef > 0 and not is_peft_model(self.model):
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        elif args.kl_coef > 0 and needs_initial_snapshot(self.model, self._policy_adapter):
            copy_policy_to_reference(self.model, self._policy_adapter)  # PiSSA/OLoRA: the base alone is not it
            self._has_ref_adapter = True
        self._env, self._named_envs = _environments(env if env is not None else args.env_id, environment_factory)
        for dataset in (train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])):
            for column in ("env", "environment"):
                if isinstance(dataset, Dataset) and column in dataset.column_names:
                    self.env_router().check([{column: name} for name in set(dataset[column])])
        self.judge = judge if judge is not None else _build_judge(args, self.accelerator.device)
        self.teacher = _build_teacher(teacher_model or args.teacher_model, args, processing_class)
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.accelerator.device)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._samples: list[dict] = []
        self._rollout_extra: dict[str, list] = {}  # columns reward functions log with TRL's log_extra
        self._buffer: list[dict] = []
        self._buffer_uses = 0
        self._ref_syncs = 0
        self._last_rollout_end: float | None = None
        self._sampler_gap = [0.0, 0.0]  # this optimizer step's summed |log-prob gap| and token count, all processes
        self._sampler_strikes = 0  # steps in a row above sampler_logprob_tolerance
        self.add_callback(_StepEndCallback(self))
        self._engine: GenerationEngine | None = None
        self._engine_step: int | None = None  # global step of the weights the engine holds (None: not yet pushed)

    # ------------------------------------------------------------------ environment and rollout
    def make_env(self, max_episode_tokens: int | None = None, flavour: str | None = None) -> StepwiseMathEnv:
        """A fresh math environment for one episode, configured from the trainer's arguments."""
        args = self.args
        return StepwiseMathEnv(
            flavour=flavour or self.flavour,
            step_delimiter=args.step_delimiter,
            max_steps=args.max_episode_steps,
            max_episode_tokens=max_episode_tokens or args.max_episode_tokens,
            calculator=args.calculator,
            # the trainer's reward functions are called once per rollout, batched (_add_reward_funcs), not per episode
            format_reward_weight=args.format_reward_weight,
            step_penalty=args.step_penalty,
        )

    def env_router(self, max_episode_tokens: int | None = None) -> EnvRouter:
        """Each row's environment: the row's ``env`` column, else ``env=`` (id, class or factory), else the math
        environment of the trainer's flavour; math ids take the trainer's step limits, calculator and rewards."""
        math = {f: functools.partial(self.make_env, max_episode_tokens, f) for f in FLAVOURS}
        limits = {"max_steps": self.args.max_episode_steps, "tools": self.args.calculator}
        budget = max_episode_tokens or self.args.max_episode_tokens
        make_id = functools.partial(make_limited, max_episode_tokens=budget, **limits)
        named = {**math, **self._named_envs}
        if isinstance(self._env, str):  # an id: the trainer's limits apply, as to the ids rows name
            default = named.get(self._env) or functools.partial(make_id, self._env)
        else:
            default = self._env or math[self.flavour]
        return EnvRouter(default, named, make_id)

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
            self._metrics["time/weight_sync_s"].append(time.perf_counter() - started)
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

    def _generate_and_score(self, problems: list[dict], num_micro_batches: int) -> list[dict]:
        args = self.args
        started = time.perf_counter()
        optimisation_seconds = started - self._last_rollout_end if self._last_rollout_end else 0.0
        rank = self.accelerator.process_index
        rows, group_ids = [], []
        for p, problem in enumerate(problems):
            for _ in range(args.num_generations):
                rows.append(dict(problem))
                group_ids.append(rank * 1_000_000 + p)
        engine = self.rollout_engine()
        trajectories = engine.run(self.env_router(), rows, group_ids=group_ids)
        sampled = list(trajectories)  # the policy's own episodes: accuracy and the curriculum count these
        if args.reference_guidance:
            self._guide_failed_groups(engine, trajectories, rows, group_ids)
        generation_seconds = time.perf_counter() - started
        self._add_reward_funcs(trajectories)
        (policy_logps, old_sampling_logps), ref_logps = self._score(trajectories)
        teacher_logps = self._teacher_logps(trajectories)
        judged = self._judge_rewards(trajectories)
        scores, returns = [], []
        for i, trajectory in enumerate(trajectories):
            step_kl = [0.0] * len(trajectory.episode.steps)
            if ref_logps is not None and policy_logps is not None:
                for token, (lp, rp) in enumerate(zip(policy_logps[i], ref_logps[i], strict=True)):
                    if trajectory.policy_mask[token] and trajectory.step_index[token] < len(step_kl):
                        step_kl[trajectory.step_index[token]] += lp - rp
            step_rewards = list(trajectory.episode.step_rewards)
            if judged is not None:
                step_rewards = [r + args.judge_weight * j for r, j in zip(step_rewards, judged[i], strict=True)]
            if step_rewards:  # EpisodeScores expects the final-answer reward on the last step
                step_rewards[-1] += args.answer_reward_weight * trajectory.episode.final_reward
            scores.append(EpisodeScores(trajectory.episode.group_id, step_rewards, step_kl))
            returns.append(sum(step_rewards))
        step_advantages = self._advantages(scores)
        token_advantages = [
            [adv[min(s, len(adv) - 1)] if adv else 0.0 for s in trajectory.step_index]
            for trajectory, adv in zip(trajectories, step_advantages, strict=True)
        ]
        num_tokens, num_sequences = self._global_normalisers(trajectories)
        batches = micro_batches(
            trajectories,
            token_advantages,
            num_micro_batches,
            pad_id=self.processing_class.pad_token_id,
            old_logps=policy_logps,
            ref_logps=ref_logps,
            teacher_logps=teacher_logps,
            sampling_logps=[t.sampling_logps for t in trajectories],
            old_sampling_logps=old_sampling_logps,
        )
        for batch in batches:
            batch["num_tokens"] = num_tokens
            batch["num_sequences"] = num_sequences
        self._record_rollout_metrics(
            trajectories, engine, generation_seconds, optimisation_seconds, returns, judged, sampled=sampled
        )
        if self.curriculum is not None:
            accuracies = [float(t.episode.correct) for t in sampled]
            stages = [row.get(STAGE_COLUMN) for row in rows]
            if self.accelerator.num_processes > 1:  # every process must promote at the same step
                accuracies = [a for part in gather_object([accuracies]) for a in part]
                stages = [s for part in gather_object([stages]) for s in part]
            if self.curriculum.update(accuracies, stages):
                self._metrics["curriculum/promoted"].append(1.0)
        self._last_rollout_end = time.perf_counter()
        return batches

    def _guide_failed_groups(
        self, rollout: StepwiseRollout, trajectories: list[Trajectory], rows: list[dict], group_ids: list[int]
    ) -> None:
        """Replace one episode of every all-failed group by the problem's worked solution (``reference_guidance``).

        The reference was not sampled by the engine (``engine_sampled`` False): its tokens get importance weight 1
        and stay out of the sampler-trainer comparison; its gradient is the policy's own."""
        chosen, texts = [], []
        for index in failed_groups(trajectories):
            row = rows[index]
            flavour = row.get("env") if row.get("env") in FLAVOURS else self.flavour
            text = reference_text(row, flavour)
            if text is not None:
                chosen.append(index)
                texts.append(text)
        if chosen:
            played = play_references(
                rollout, self.env_router(), [rows[i] for i in chosen], [group_ids[i] for i in chosen], texts
            )
            for index, reference in zip(chosen, played, strict=True):
                reference.engine_sampled = False
                trajectories[index] = reference
        counts = [(len(chosen), sum(trajectories[i].episode.correct for i in chosen))]
        if self.accelerator.num_processes > 1:  # every process guides its own groups: log the totals
            counts = gather_object(counts)
        guided, correct = sum(n for n, _ in counts), sum(c for _, c in counts)
        self._metrics["guidance/reference_episodes"].append(float(guided))
        self._metrics["guidance/reference_correct"].append(correct / guided if guided else 0.0)

    def _add_reward_funcs(self, trajectories: list[Trajectory]) -> None:
        """Call the reward functions once on the whole rollout with TRL's arguments; add the weighted sums to each
        episode's final reward and their raw scores to its reward components."""
        self._rollout_extra = defaultdict(list)
        if not self.reward_funcs:
            return
        episodes = [t.episode for t in trajectories]
        prompts = [e.row.get("prompt", e.row.get("question")) for e in episodes]
        conversational = any(_is_messages(p) for p in prompts)
        completions = [
            [{"role": "assistant", "content": e.completion}] if conversational else e.completion for e in episodes
        ]
        totals, components = combine_rewards(
            self.reward_funcs,
            self.args.reward_weights,
            completions,
            [e.row for e in episodes],
            prompts=prompts,
            completion_ids=[list(t.completion_ids) for t in trajectories],
            trainer_state=self.state,
            log_metric=self._log_metric,
            log_extra=lambda column, values: self._rollout_extra[column].extend(values),
        )
        for episode, total, parts in zip(episodes, totals, components, strict=True):
            episode.final_reward += total
            for name, value in parts.items():
                episode.reward_components[unique_name(name, episode.reward_components)] = value

    def _log_metric(self, name: str, value: float) -> None:
        """TRL's ``log_metric`` for reward functions: averaged into the next log line."""
        self._metrics[name].append(float(value))

    def _advantages(self, scores: list[EpisodeScores]) -> list[list[float]]:
        """Advantages over the episodes of every process (batch baselines and batch scaling see the global batch,
        as in GRPO); each process keeps its own episodes' share."""
        if self.accelerator.num_processes == 1:
            return self.algorithm.advantages(scores)
        parts = gather_object([scores])
        advantages = self.algorithm.advantages([s for part in parts for s in part])
        start = sum(len(part) for part in parts[: self.accelerator.process_index])
        return advantages[start : start + len(scores)]

    def _global_normalisers(self, trajectories: list[Trajectory]) -> tuple[float, float]:
        """Policy tokens and episodes of the step over all processes, divided by the process count: each process
        then holds sum_local / (count / P), and DDP's mean of the P gradients is the gradient of sum_all / count."""
        local = torch.tensor(
            [float(sum(t.num_policy_tokens for t in trajectories)), float(len(trajectories))],
            device=self.accelerator.device,
        )
        processes = self.accelerator.num_processes
        total = self.accelerator.gather(local).reshape(processes, 2).sum(0) if processes > 1 else local
        return float(total[0]) / processes, float(total[1]) / processes

    @torch.no_grad()
    def _score(self, trajectories: list[Trajectory]) -> tuple[tuple[Any, Any], list[list[float]] | None]:
        """``((policy, policy under the sampling filter), reference)`` log-probs of the sampled tokens: the rollout
        policy's when needed (later iterations of a batch, KL in the reward), the reference's when there is one."""
        args = self.args
        need_policy = args.num_iterations > 1 or (args.kl_coef > 0 and bool(args.kl_in_reward))
        need_ref = args.kl_coef > 0
        model = self.accelerator.unwrap_model(self.model)
        policy = self._logps(model, trajectories, filtered=True) if need_policy else (None, None)
        ref = None
        if need_ref:
            if self.ref_model is not None:
                ref = self._logps(self.ref_model, trajectories)
            elif self._has_ref_adapter:
                model.set_adapter(REFERENCE_ADAPTER)
                try:
                    ref = self._logps(model, trajectories)
                finally:
                    model.set_adapter(self._policy_adapter)
            else:
                with model.disable_adapter():
                    ref = self._logps(model, trajectories)
        return policy, ref

    @torch.no_grad()
    def _teacher_logps(self, trajectories: list[Trajectory]) -> list[list[float]] | None:
        """The frozen teacher's log-probs of the sampled tokens (for the distillation term)."""
        return None if self.teacher is None else self._logps(self.teacher, trajectories)

    def _judge_rewards(self, trajectories: list[Trajectory]) -> list[list[float]] | None:
        """Per-step rewards from the judge: every step of the batch is scored in one batched pass per question."""
        if self.judge is None:
            return None
        from trl_stepwise.judge import judge_items

        items, owners = [], []
        for i, trajectory in enumerate(trajectories):
            episode = trajectory.episode
            steps = [step.text for step in episode.steps]
            items.extend(judge_items(str(episode.row.get("question", "")), steps))
            owners.extend([i] * len(steps))
        started = time.perf_counter()
        scores = self.judge.score(items)
        per_episode: list[list[float]] = [[] for _ in trajectories]
        for owner, score in zip(owners, scores, strict=True):
            per_episode[owner].append(float(score))
        if scores:
            self._metrics["judge/step_score"].append(sum(scores) / len(scores))
        self._metrics["time/judge_s"].append(time.perf_counter() - started)
        return per_episode

    def _logps(self, model: PreTrainedModel, trajectories: list[Trajectory], filtered: bool = False):
        """Log-probs of every completion token; with ``filtered``, a pair: also those under the sampling filter."""
        was_training = model.training
        model.eval()
        out: list[list[float]] = []
        out_filtered: list[list[float]] = []
        top_k, top_p = (self.args.top_k, self.args.top_p) if filtered else (0, 1.0)
        try:
            for chunk in _chunks_by_tokens(trajectories, self.args.logprob_batch_tokens):
                batch = pad_trajectories(chunk, pad_id=self.processing_class.pad_token_id, device=model.device)
                with self.accelerator.autocast():  # the reference and teacher sit outside accelerator.prepare
                    scores = score_completions(
                        model, batch, temperature=self.args.temperature, top_k=top_k, top_p=top_p
                    )
                lengths = [len(t.completion_ids) for t in chunk]
                out.extend(row[:n] for row, n in zip(scores.logps.tolist(), lengths, strict=True))
                if filtered:  # the reference and the teacher need the plain log-probs only
                    rows = scores.sampling_logps.tolist()
                    out_filtered.extend(row[:n] for row, n in zip(rows, lengths, strict=True))
        finally:
            if was_training:
                model.train()
        return (out, out_filtered) if filtered else out

    # ------------------------------------------------------------------ loss
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
        )
        logps, entropy = scores.logps, scores.entropy
        mask = inputs["completion_mask"]
        old = inputs.get("old_logps")
        old = logps.detach() if old is None else old
        # the trainer's log-prob of each sampled token under the engine's own sampling distribution (top-k / top-p
        # applied), at the weights that sampled it: the quantity the engine's log-probs are compared with
        old_sampling = inputs.get("old_sampling_logps")
        old_sampling = scores.sampling_logps if old_sampling is None else old_sampling
        sampled = inputs["sampled_mask"]
        gap = torch.where(sampled, old_sampling - inputs["sampling_logps"], torch.zeros_like(old_sampling))
        ref = inputs.get("ref_logps")
        advantages = inputs["advantages"]
        weights = None
        if args.use_vllm and args.vllm_importance_sampling_correction:
            # the engine sampled from slightly different log-probs: weight each token's policy-gradient term (it is
            # linear in the advantage, so this weights it alone; the KL term is not weighted)
            weights = importance_weights(
                gap, args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_max
            )
            advantages = advantages * weights
        token_losses = self.algorithm.token_loss(logps, old, ref, advantages)
        teacher = inputs.get("teacher_logps")
        if teacher is not None:
            distill = self.algorithm.distill(logps, teacher)
            token_losses = token_losses + args.distill_coef * distill
        loss = self.algorithm.reduce(token_losses, mask, inputs["num_tokens"], inputs["num_sequences"])
        with torch.no_grad():
            m, s = mask.float(), sampled.float()
            sums = {"entropy": (entropy * m, m)}
            if ref is not None:
                sums["kl"] = (self.algorithm.kl(logps, ref) * m, m)
            if teacher is not None:
                sums["distill/teacher_kl"] = (distill * m, m)
            ratio = torch.exp(logps - old)
            sums["clip_ratio"] = (((ratio - 1.0).abs() > args.epsilon).float() * m, m)
            sums[SAMPLER_GAP] = (gap.abs() * s, s)  # every engine, every step: the runtime guard reads it
            if weights is not None:
                sums["sampling/importance_sampling_ratio/mean"] = (weights * s, s)
            means, (gap_sum, gap_count) = self._gathered_token_means(sums, SAMPLER_GAP)
            for key, value in means.items():
                self._metrics[key].append(value)
            self._sampler_gap[0] += gap_sum
            self._sampler_gap[1] += gap_count
        return loss

    def _gathered_token_means(
        self, sums: dict[str, tuple[torch.Tensor, torch.Tensor]], keep: str
    ) -> tuple[dict[str, float], tuple[float, float]]:
        """Per-token means over every process's micro-batch (one gather for all metrics), not rank 0's alone; and
        the gathered ``(sum, count)`` of ``keep``."""
        values = torch.stack([t for value, weight in sums.values() for t in (value.sum(), weight.sum())]).float()
        if self.accelerator.num_processes > 1:
            values = self.accelerator.gather(values).reshape(self.accelerator.num_processes, -1).sum(0)
        pairs = values.reshape(-1, 2).tolist()
        means = {key: total / count for key, (total, count) in zip(sums, pairs, strict=True) if count > 0}
        return means, tuple(pairs[list(sums).index(keep)])

    def _check_sampler(self) -> None:
        """After each optimizer step: stop when the engine's and the trainer's log-probs of the sampled tokens have
        disagreed beyond ``sampler_logprob_tolerance`` for ``sampler_logprob_patience`` steps in a row."""
        total, count = self._sampler_gap
        self._sampler_gap = [0.0, 0.0]
        tolerance = self.args.sampler_logprob_tolerance
        if tolerance <= 0 or count == 0:
            return
        gap = total / count
        self._sampler_strikes = self._sampler_strikes + 1 if gap > tolerance else 0
        if self._sampler_strikes >= self.args.sampler_logprob_patience:
            raise SamplerMismatchError(
                f"step {self.state.global_step}: the generation engine's log-probs of its sampled tokens differ from "
                f"the trainer's by {gap:.3f} per token (> --sampler_logprob_tolerance {tolerance:g}) for "
                f"{self._sampler_strikes} steps in a row, so it no longer samples the policy being trained. Likely "
                "causes: a part of the adapter not pushed to the engine, a dtype or kernel mismatch (--vllm_dtype, "
                "--bf16, --rollout_bf16), or a sampling filter the engine applies differently (--top_p, --top_k). "
                "Raise the tolerance or set it to 0 to train anyway."
            )

    # ------------------------------------------------------------------ reference model
    def _maybe_sync_reference(self) -> None:
        """After the optimizer step of every ``ref_sync_steps``-th step (like TRL's ``SyncRefModelCallback``): the
        step's own rollout was scored against the previous reference, and the next rollout sees the new one."""
        steps = self.args.ref_sync_steps
        step = self.state.global_step
        if self.args.kl_coef <= 0 or steps <= 0 or step == 0 or step % steps != 0 or step == self._ref_syncs:
            return
        self.sync_reference()
        self._ref_syncs = step

    def sync_reference(self) -> None:
        """Move the reference to the policy: a copy, or with ``ref_model_mixup_alpha`` < 1 the soft update
        ``ref = alpha * policy + (1 - alpha) * ref`` (for peft: into a frozen second adapter, adapter-sized)."""
        model = self.accelerator.unwrap_model(self.model)
        alpha = self.args.ref_model_mixup_alpha
        if self.ref_model is not None:
            if alpha >= 1.0:
                self.ref_model.load_state_dict(model.state_dict())
            else:
                with torch.no_grad():
                    for ref, param in zip(self.ref_model.parameters(), model.parameters(), strict=True):
                        ref.lerp_(param.to(ref.dtype), alpha)
            self._metrics["ref_syncs"].append(1.0)
            return
        copy_policy_to_reference(model, self._policy_adapter)
        self._has_ref_adapter = True
        self._metrics["ref_syncs"].append(1.0)

    # ------------------------------------------------------------------ metrics and logging
    def _record_rollout_metrics(
        self, trajectories, engine, generation_seconds, optimisation_seconds, returns=None, judged=None, sampled=None
    ) -> None:
        """``reward`` is the return the advantages start from (weights and judge included, before any KL);
        ``rewards/<name>/mean`` and ``/std`` the raw score of each reward function, as TRL logs them. ``accuracy``,
        the episode shapes and the printed samples describe ``sampled`` (the policy's own episodes, before any
        reference replaced one); default: the trained ``trajectories``."""
        episodes = [t.episode for t in trajectories]
        sampled = sampled or trajectories
        sampled_episodes = [t.episode for t in sampled]
        if returns is None:
            returns = [e.final_reward + sum(s.reward for s in e.steps) for e in episodes]
        names = list(dict.fromkeys(name for e in episodes for name in e.reward_components))
        components = {name: [e.reward_components.get(name, math.nan) for e in episodes] for name in names}
        if judged is not None:
            components["judge"] = [sum(steps) for steps in judged]
        local = {
            "reward": list(returns),
            "accuracy": [float(e.correct) for e in sampled_episodes],
            "steps_per_episode": [float(len(e.steps)) for e in sampled_episodes],
            "tokens_per_episode": [float(t.num_policy_tokens) for t in sampled],
            "calculator_calls": [float(sum(s.calc_calls for s in e.steps)) for e in sampled_episodes],
        }
        for reason in (r.value for r in EndReason):
            local[f"end/{reason}"] = [float(_reason(e) == reason) for e in sampled_episodes]
        gathered = (
            gather_object([(local, components)]) if self.accelerator.num_processes > 1 else [(local, components)]
        )
        for key in local:
            values = [v for part, _ in gathered for v in part[key]]
            self._metrics[key].append(sum(values) / max(len(values), 1))
        for name in dict.fromkeys(name for _, part in gathered for name in part):
            values = [v for _, part in gathered for v in part.get(name, []) if not math.isnan(v)]
            if values:
                mean = sum(values) / len(values)
                self._metrics[f"rewards/{name}/mean"].append(mean)
                self._metrics[f"rewards/{name}/std"].append(_std(values, mean))
        rewards = [v for part, _ in gathered for v in part["reward"]]
        self._metrics["reward_std"].append(_std(rewards, sum(rewards) / max(len(rewards), 1)))
        self._metrics["rollout_tokens_per_second"].append(engine.stats.tokens_per_second)
        self._metrics["time/generation_s"].append(generation_seconds)
        self._metrics["time/optimisation_s"].append(optimisation_seconds)
        self._samples = [
            {"question": e.row.get("question", ""), "completion": e.completion, "reward": e.final_reward}
            for e in sampled_episodes[: max(self.args.num_completions_to_print, 0)]
        ]
        if self.args.log_rollouts:
            self._append_rollouts(episodes)

    def _append_rollouts(self, episodes) -> None:
        """The rollout buffer cache: one JSON line per episode, for analysis (each process writes its own file)."""
        rank = self.accelerator.process_index
        name = "rollouts.jsonl" if rank == 0 else f"rollouts-rank{rank}.jsonl"
        path = Path(self.args.output_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            extra = self._rollout_extra
            for i, e in enumerate(episodes):
                record = {
                    "step": self.state.global_step,
                    "group_id": e.group_id,
                    "question": e.row.get("question"),
                    "answer": e.row.get("answer"),
                    "steps": [s.text for s in e.steps],
                    "final_answer": e.final_answer,
                    "correct": e.correct,
                    "reward": e.final_reward,
                    "end_reason": _reason(e),
                }
                record.update({column: values[i] for column, values in extra.items() if len(values) == len(episodes)})
                handle.write(json.dumps(record) + "\n")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and not any(key.startswith("eval_") for key in logs):
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
            if self.curriculum is not None:
                logs["curriculum/stage"] = float(self.curriculum.stage)
            self._metrics.clear()
            self._show_reward_on_progress_bar(logs)
            if self._samples and self.is_world_process_zero():
                for sample in self._samples:  # tqdm.write keeps the progress bar below the text
                    tqdm.write(
                        f"[step {self.state.global_step}] sample, reward {sample['reward']:.2f}\n"
                        f"  Q: {sample['question']}\n  A: {sample['completion'].strip()}"
                    )
                self._log_samples_table()
        super().log(logs, start_time)

    def _use_compact_logs(self) -> None:
        """Swap transformers' dict-printing log callbacks for compact lines (the progress bar itself stays)."""
        for plain, compact in ((ProgressCallback, CompactProgressCallback), (PrinterCallback, CompactPrinterCallback)):
            if any(type(callback) is plain for callback in self.callback_handler.callbacks):
                self.remove_callback(plain)
                self.add_callback(compact)

    def _show_reward_on_progress_bar(self, logs: dict[str, float]) -> None:
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None and "reward" in logs:
                bar.set_postfix(reward=f"{logs['reward']:.3f}", acc=f"{logs.get('accuracy', 0.0):.3f}")

    def _log_samples_table(self) -> None:
        if "wandb" not in (self.args.report_to or []):
            return
        import wandb

        if wandb.run is not None:
            table = wandb.Table(columns=["step", "question", "completion", "reward"])
            for s in self._samples:
                table.add_data(self.state.global_step, s["question"], s["completion"], s["reward"])
            wandb.log({"samples": table}, commit=False)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Accuracy on a fixed subset of the eval set (greedy), sharded across processes, logged as eval_accuracy."""
        from trl_stepwise.evaluation import evaluate_problems

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (set it on the trainer or pass one).")
        if isinstance(dataset, str):  # the Trainer passes the name of one of several eval sets
            dataset = self.eval_dataset[dataset]
        if isinstance(dataset, dict):  # several eval sets: one block of metrics each, eval_<name>_accuracy
            metrics: dict[str, float] = {}
            for name, subset in dataset.items():
                metrics.update(self.evaluate(subset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        rows = [dict(r) for r in dataset.select(range(min(self.args.eval_num_problems, len(dataset))))]
        sampling = SamplingConfig(
            temperature=0.0, max_step_tokens=self.args.max_step_tokens, batch_size=self.args.eval_batch_size
        )
        summary, _ = evaluate_problems(
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            rows,
            self.prompt_builder,
            self.env_router(self.args.eval_max_episode_tokens),
            sampling,
            accelerator=self.accelerator,
            progress=False,
            step_delimiter=self.args.step_delimiter,
            calculator=self.args.calculator,
            engine=self.generation_engine(),
        )
        metrics = {
            f"{metric_key_prefix}_accuracy": summary["accuracy"],
            f"{metric_key_prefix}_accuracy_ci_low": summary["accuracy_ci_low"],
            f"{metric_key_prefix}_accuracy_ci_high": summary["accuracy_ci_high"],
            f"{metric_key_prefix}_correct": float(summary["correct"]),
            f"{metric_key_prefix}_total": float(summary["total"]),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------ train, checkpoints and resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; ``resume_from_checkpoint`` True or "true" resumes from the newest *complete*
        checkpoint in ``output_dir`` (a folder whose save was interrupted is never picked)."""
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        output = super().train(resume, *args, **kwargs)
        self.plot_curves()
        return output

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` under a hidden staging folder and rename it once complete (crash-safe)."""
        if self.hp_search_backend is not None and trial is not None:
            return super()._save_checkpoint(model, trial)
        output_dir = self.args.output_dir
        staging = staging_dir(output_dir, self.state.global_step)
        if self.args.should_save:
            remove_stale_staging(output_dir)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
        if self.args.should_save:
            final = publish_checkpoint(staging, output_dir)
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging:
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints(
                output_dir=output_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_run_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def plot_curves(self) -> Path | None:
        """Write ``output_dir/training_curves.png`` (reward and eval accuracy over steps) from the log history."""
        if not self.is_world_process_zero():
            return None
        from trl_stepwise.plotting import plot_training_curves

        return plot_training_curves(self.state.log_history, Path(self.args.output_dir) / "training_curves.png")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the model as transformers does, but a PEFT policy without the frozen reference adapter."""
        model = self.accelerator.unwrap_model(self.model)
        if not (self._has_ref_adapter and is_peft_model(model)):
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if self.args.should_save:
            model.save_pretrained(output_dir, state_dict=state_dict, selected_adapters=[self._policy_adapter])
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """Upload as transformers does; ``rollouts*.jsonl`` only with ``push_rollouts=True``."""
        with uploads_ignoring(() if self.args.push_rollouts else ROLLOUT_FILES):
            return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        with uploads_ignoring(() if self.args.push_rollouts else ROLLOUT_FILES):
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_rng_state(self, output_dir: str) -> None:
        """Save the trainer's own state next to the RNG state (before trainer_state.json, the completion marker)."""
        super()._save_rng_state(output_dir)
        if not self.args.should_save:
            return
        state = {
            "ref_syncs": self._ref_syncs,
            "has_ref_adapter": self._has_ref_adapter,
            "running_baseline": self.algorithm.running_baseline,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
        }
        _atomic_write_text(Path(output_dir) / STATE_FILE, json.dumps(state))
        model = self.accelerator.unwrap_model(self.model)
        if self.ref_model is not None:
            reference = self.ref_model.state_dict()
        elif self._has_ref_adapter:
            reference = {k: v for k, v in model.state_dict().items() if f".{REFERENCE_ADAPTER}." in k}
        else:
            return
        _atomic_torch_save(reference, Path(output_dir) / REFERENCE_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Also restore the trainer's own state. transformers calls this on every resume and backend, after the
        weights are loaded; ``_load_from_checkpoint`` is skipped under DeepSpeed and FSDP."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_stepwise_state(checkpoint)

    def _load_stepwise_state(self, checkpoint: str) -> None:
        """Reference weights (model or adapter), refresh counter, baseline state and curriculum stage."""
        path = Path(checkpoint)
        if not (path / STATE_FILE).is_file():
            return
        state = json.loads((path / STATE_FILE).read_text())
        self._ref_syncs = state.get("ref_syncs", 0)
        self.algorithm.running_baseline = state.get("running_baseline")
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        if (path / REFERENCE_FILE).is_file():
            reference = torch.load(path / REFERENCE_FILE, map_location="cpu", weights_only=True)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.ref_model is not None:
                self.ref_model.load_state_dict(reference)
            elif state.get("has_ref_adapter"):
                add_reference_adapter(unwrapped, self._policy_adapter)
                self._has_ref_adapter = True
                load_reference_adapter(unwrapped, reference, checkpoint)


class SamplerMismatchError(RuntimeError):
    """The generation engine no longer samples the policy being trained (the runtime guard tripped)."""


def importance_weights(gap: torch.Tensor, mode: str, clip_max: float) -> torch.Tensor:
    """Per-token truncated importance weights from ``gap`` = log pi_trainer - log pi_engine of each sampled token:
    min(ratio, C) (token_truncate) or 1[ratio <= C] (token_mask)."""
    ratio = torch.exp(gap.detach())
    if mode == "token_mask":
        return (ratio <= clip_max).to(ratio.dtype)
    return ratio.clamp(max=clip_max)


def _build_judge(args: StepwiseReinforceConfig, policy_device: torch.device):
    """The judge named by ``args.judge_model`` (None when unset), frozen, on ``judge_device`` or the policy's."""
    if not args.judge_model:
        return None
    from trl_stepwise.judge import StepJudge

    quantization = build_quantization_config(load_in_4bit=args.judge_load_in_4bit, frozen=True)
    return StepJudge(
        args.judge_model,
        mode=args.judge_mode,
        prompt=args.judge_prompt,
        questions=args.judge_questions,
        batch_size=args.judge_batch_size,
        device=args.judge_device or policy_device,
        quantization_config=quantization,
    )


def _build_teacher(teacher, args: StepwiseReinforceConfig, tokenizer: PreTrainedTokenizerBase):
    """The frozen distillation teacher; it must share the policy's vocabulary (log-probs of the same token ids)."""
    if teacher is None:
        if args.distill_coef > 0:
            raise ValueError(
                "distill_coef > 0 needs a teacher: set --teacher_model (a hub id or a local folder), or pass "
                "teacher_model= to StepwiseReinforceTrainer."
            )
        return None
    if args.distill_coef <= 0:
        logger.warning("A teacher model was given but distill_coef is 0: the teacher is not used.")
        return None
    if isinstance(teacher, str):
        teacher_vocab = load_tokenizer(teacher).get_vocab()
        if teacher_vocab != tokenizer.get_vocab():
            raise ValueError(
                f"The teacher {teacher!r} has a different tokenizer from the policy: distillation compares "
                "log-probabilities of the same token ids, so pick a teacher of the same model family."
            )
        teacher = load_model(teacher, dtype=args.model_dtype)
    if teacher.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError("The teacher's vocabulary is smaller than the policy tokenizer's: use a same-family teacher.")
    return teacher.eval().requires_grad_(False)


def _attach_peft(model, peft_config):
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if peft_config is None:
        if quantized and not is_peft_model(model):
            raise ValueError(
                "The model is loaded in 4/8-bit but no peft_config was given: quantized weights cannot be trained. "
                "Pass peft_config (e.g. --use_peft with LoRA) or load the model in full precision."
            )
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_4bit_layers_differentiable(model)
    return get_peft_model(model, peft_config)


def _keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights at its first no-grad eval call (the
    rollout's decoding) into a kernel without a backward: the adapters above it would then silently get no gradient.
    Keep the differentiable kernel on every 4-bit layer of a model that trains."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _environments(
    env: str | type | Callable[[], Any] | None, factory: Callable[[], Any] | dict[str, Callable[[], Any]] | None
) -> tuple[Callable[[], Any] | None, dict[str, Callable[[], Any]]]:
    """``(default, named factories)`` from ``env=`` and TRL's ``environment_factory`` (one or a dict); the default
    stays an id when given as one, so that the trainer's limits apply to it."""
    if env is not None and factory is not None and not isinstance(factory, dict):
        raise ValueError("pass env= or environment_factory=, not both (they name the same thing)")
    if isinstance(env, str):
        resolve_env_factory(env)  # an unknown id fails here
    elif env is not None:
        env = resolve_env_factory(env)
    if isinstance(factory, dict):
        return env, dict(factory)
    return (env if env is not None else factory), {}


def _as_problems(dataset: Dataset | str | dict, split: str) -> Dataset | dict:
    if isinstance(dataset, dict):
        return {name: _as_problems(subset, split) for name, subset in dataset.items()}
    if isinstance(dataset, str):
        return load_math_dataset(dataset, split=split)
    if "question" in dataset.column_names and "answer" in dataset.column_names:
        return dataset
    return normalise_columns(dataset)


def _chunks_by_tokens(trajectories: list[Trajectory], max_tokens: int) -> list[list[Trajectory]]:
    chunks: list[list[Trajectory]] = []
    current: list[Trajectory] = []
    longest = 0
    for t in trajectories:
        length = len(t.prompt_ids) + len(t.completion_ids)
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, longest = [], 0
        current.append(t)
        longest = max(longest, length)
    if current:
        chunks.append(current)
    return chunks


def _std(values: list[float], mean: float) -> float:
    """Population standard deviation (0 for fewer than two values)."""
    return (sum((v - mean) ** 2 for v in values) / max(len(values), 1)) ** 0.5


def _is_messages(value: Any) -> bool:
    """Whether a prompt is conversational (a list of chat messages), as TRL's ``is_conversational`` decides."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _reason(episode) -> str | None:
    reason = episode.end_reason
    return getattr(reason, "value", reason)


def _model_id(model) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None)


def _identity(batch):
    return batch


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


__all__ = ["StepwiseReinforceTrainer", "build_quantization_config"]


class _StepEndCallback(TrainerCallback):
    """After each optimizer step: the sampler guard, then the reference refresh (TRL's ``SyncRefModelCallback``
    timing)."""

    def __init__(self, trainer: StepwiseReinforceTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._check_sampler()
        self.trainer._maybe_sync_reference()


def _check_trainable_precision(model: torch.nn.Module, args: StepwiseReinforceConfig) -> None:
    """Warn when full weights train in 16-bit: at small learning rates most AdamW updates round away."""
    if is_peft_model(model):
        return
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if dtypes & {torch.bfloat16, torch.float16}:
        logger.warning(
            "The trainable weights are %s: at learning_rate=%g most AdamW updates are smaller than their rounding "
            "step and are lost. Load the model in float32 (--model_dtype float32) and train with --bf16 autocast.",
            ", ".join(sorted(str(d) for d in dtypes)),
            args.learning_rate,
        )
