"""Any of our environments under TRL's ``GRPOTrainer``, through its ``rollout_func``.

The adapter plays stepwise episodes with the same rollout loop as ``StepwiseReinforceTrainer`` (tool results and
environment replies appended as forced tokens) and hands GRPOTrainer what it expects: prompt and completion ids,
the sampling log-probs, ``env_mask`` (0 on tokens the policy did not sample, so GRPO's loss skips them) and each
episode's return, which ``reward_func`` gives back as the reward. GRPO then credits every token of an episode with
the same group-relative advantage; ``StepwiseReinforceTrainer`` credits each step with its own.

    adapter = GRPOEnvAdapter("countdown", rows, tokenizer, prompt_builder)
    trainer = GRPOTrainer(model=model, args=GRPOConfig(...), train_dataset=adapter.dataset(),
                          reward_funcs=[adapter.reward_func], rollout_func=adapter.rollout_func)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from trl_stepwise.engines import GenerationEngine
from trl_stepwise.envs import EnvRouter, resolve_env_factory
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

__all__ = ["GRPOEnvAdapter"]


class GRPOEnvAdapter:
    """``rollout_func`` + ``reward_func`` + the prompt dataset that run an environment under ``GRPOTrainer``.

    GRPOTrainer passes only the prompts to ``rollout_func``; the adapter's dataset uses each row's ``question`` as
    the prompt and finds the row again from it (questions must be distinct).
    """

    def __init__(
        self,
        env: str | type | Callable[[], Any],
        rows: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        prompt_builder: PromptBuilder,
        sampling: SamplingConfig | None = None,
        step_delimiter: str | None = "\n",
        engine: Callable[[Any], GenerationEngine] | None = None,
    ) -> None:
        self.router = EnvRouter(resolve_env_factory(env))
        self.rows = {str(row["question"]): dict(row) for row in rows}
        if len(self.rows) != len(rows):
            raise ValueError("GRPOEnvAdapter needs rows with distinct questions (the prompt finds its row again)")
        self.tokenizer = tokenizer
        self.prompt_builder = prompt_builder
        self.sampling = sampling or SamplingConfig()
        self.step_delimiter = step_delimiter
        self.engine = engine  # engine(trainer) -> GenerationEngine; default: the transformers loop on the policy
        self.last_trajectories: list = []

    def dataset(self):
        """The prompt dataset for GRPOTrainer: ``prompt`` = the row's question, plus the row's other columns."""
        from datasets import Dataset

        return Dataset.from_list([{"prompt": question, **row} for question, row in self.rows.items()])

    def rollout_func(self, prompts: list, trainer: Any) -> dict[str, list]:
        """One stepwise episode per prompt (GRPOTrainer repeats each prompt ``num_generations`` times)."""
        rows = [self.rows[str(prompt)] for prompt in prompts]
        model = trainer.accelerator.unwrap_model(trainer.model) if self.engine is None else None
        rollout = StepwiseRollout(
            model,
            self.tokenizer,
            self.prompt_builder,
            self.sampling,
            step_delimiter=self.step_delimiter,
            engine=self.engine(trainer) if self.engine is not None else None,
        )
        with torch.no_grad():
            trajectories = rollout.run(self.router, rows)
        self.last_trajectories = trajectories
        return {
            "prompt_ids": [t.prompt_ids for t in trajectories],
            "completion_ids": [t.completion_ids for t in trajectories],
            "logprobs": [t.sampling_logps for t in trajectories],
            "env_mask": [[int(m) for m in t.policy_mask] for t in trajectories],
            "env_return": [sum(t.episode.step_rewards) + t.episode.final_reward for t in trajectories],
        }

    @staticmethod
    def reward_func(completions: list, env_return: list[float], **kwargs: Any) -> list[float]:
        """The environment's return of each episode (forwarded by GRPOTrainer from ``rollout_func``)."""
        return list(env_return)
