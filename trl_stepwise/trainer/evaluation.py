"""The trainer's evaluation: greedy episodes on a fixed subset of an eval set, with the training prompts and
environments, on the engine that generates the rollouts (holding the current weights), sharded across processes."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from trl_stepwise.rollout import SamplingConfig

__all__ = ["EVAL_SUMMARY_KEYS", "evaluate_policy", "evaluate_sets"]

EVAL_SUMMARY_KEYS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "total")


def evaluate_policy(trainer: Any, dataset: Dataset) -> dict[str, Any]:
    """``evaluate_problems``' summary for the first ``eval_num_problems`` rows of ``dataset``."""
    from trl_stepwise.evaluation import evaluate_problems

    args = trainer.args
    rows = [dict(r) for r in dataset.select(range(min(args.eval_num_problems, len(dataset))))]
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=args.max_step_tokens, batch_size=args.eval_batch_size)
    summary, _ = evaluate_problems(
        trainer.accelerator.unwrap_model(trainer.model),
        trainer.processing_class,
        rows,
        trainer.prompt_builder,
        trainer.env_router(args.eval_max_episode_tokens),
        sampling,
        accelerator=trainer.accelerator,
        progress=False,
        step_delimiter=args.step_delimiter,
        calculator=args.calculator,
        engine=trainer.generation_engine(),
    )
    return summary


def evaluate_sets(trainer: Any, dataset: Any, prefix: str = "eval") -> dict[str, float]:
    """Metrics ``<prefix>_accuracy`` etc. for one eval set, or ``<prefix>_<name>_...`` for each of several (a dict,
    or the name of one of them, as the Trainer passes it)."""
    if dataset is None:
        raise ValueError("evaluate() needs an eval_dataset (set it on the trainer or pass one).")
    if isinstance(dataset, str):
        dataset = trainer.eval_dataset[dataset]
    if isinstance(dataset, dict):
        metrics: dict[str, float] = {}
        for name, subset in dataset.items():
            metrics.update(evaluate_sets(trainer, subset, f"{prefix}_{name}"))
        return metrics
    summary = evaluate_policy(trainer, dataset)
    return {f"{prefix}_{key}": float(summary[key]) for key in EVAL_SUMMARY_KEYS}
