"""The trainer's evaluation: greedy episodes on a fixed subset of an eval set, with the training prompts and
environments, on the engine that generates the rollouts (holding the current weights), sharded across processes."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from trl_stepwise.rollout import SamplingConfig
from trl_stepwise.trainer import evaluation_cache

logger = logging.getLogger(__name__)

__all__ = ["EVAL_SUMMARY_KEYS", "evaluate_policy", "named_eval_set"]

# logged as eval[_<set>]_<key>, and kept for a reused evaluation (its wall time: how long the final one will take)
EVAL_SUMMARY_KEYS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "total", "wall_seconds")


def evaluate_policy(trainer: Any, dataset: Dataset) -> dict[str, Any]:
    """``evaluate_problems``' summary for the first ``eval_num_problems`` rows of ``dataset``; before the first
    optimizer step, the stored summary of an identical earlier evaluation when there is one (``evaluation_cache``)."""
    from trl_stepwise.evaluation import evaluate_problems

    args = trainer.args
    rows = [dict(r) for r in dataset.select(range(min(args.eval_num_problems, len(dataset))))]
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=args.max_step_tokens, batch_size=args.eval_batch_size)
    engine = trainer.generation_engine()
    key = None
    if args.cache_start_evaluation and trainer.state.global_step == 0:
        key, cached = _on_main(trainer, lambda: _look_up(trainer, rows, sampling, engine))
        if cached is not None:
            logger.info(
                "Evaluation of the untrained model on %d problems reused (%s); --cache_start_evaluation false "
                "computes it again.",
                len(rows),
                evaluation_cache.describe(key),
            )
            return cached
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
        engine=engine,
    )
    if key and trainer.is_world_process_zero():
        kept = {name: summary[name] for name in EVAL_SUMMARY_KEYS}
        model_name = getattr(trainer.accelerator.unwrap_model(trainer.model).config, "_name_or_path", None)
        evaluation_cache.store(key, kept, {"model": model_name, "problems": len(rows)})
    return summary


def _look_up(trainer: Any, rows: list[dict], sampling: SamplingConfig, engine: Any) -> tuple[str | None, Any]:
    """``(key, stored summary or None)`` of this evaluation."""
    key = evaluation_cache.start_evaluation_key(trainer, rows, sampling, engine)
    return key, evaluation_cache.load(key) if key else None


def _on_main(trainer: Any, compute: Any) -> Any:
    """``compute()`` on the main process only (hashing the weights once), its value on every process: all of them
    then decide alike."""
    if trainer.accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    box = [compute() if trainer.is_world_process_zero() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def named_eval_set(trainer: Any, dataset: Any) -> Any:
    """The eval set to use: ``dataset``, or the one of several it names (as the Trainer passes it); a dict of several
    stays a dict."""
    if dataset is None:
        raise ValueError("evaluate() needs an eval_dataset (set it on the trainer or pass one).")
    if isinstance(dataset, str):
        return trainer.eval_dataset[dataset]
    return dataset
