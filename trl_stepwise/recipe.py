"""What the training recipes share: their script arguments and the run itself (model, data, trainer, evals).

The recipes in ``recipes/`` stay thin (parse, then ``run_reinforce``), in the style of TRL's example scripts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, get_peft_config

from trl_stepwise.data import dataset_flavour, load_math_dataset
from trl_stepwise.models import build_quantization_config
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

logger = logging.getLogger(__name__)


@dataclass
class ReinforceScriptArguments:
    """Data and run options of the stepwise REINFORCE recipes."""

    dataset_name: str = field(
        default="gsm8k",
        metadata={
            "help": "Training problems: gsm8k, math, arithmetic:level=N, a hub id, or a local JSONL/Parquet file."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_dataset_name: list[str] | None = field(
        default=None,
        metadata={
            "help": "Evaluation problems (default: dataset_name), e.g. gsm8k or math500; several names give one "
            "eval_<name>_accuracy each (e.g. 'arithmetic:level=1,2,n=200' gsm8k)."
        },
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Keep only the first N problems of each eval set."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split used for evaluation."})
    few_shot_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Source of few-shot examples (default: the training set; arithmetic: fewshot split)."},
    )
    question_field: str | None = field(default=None, metadata={"help": "Dataset field holding the problem text."})
    answer_field: str | None = field(default=None, metadata={"help": "Dataset field holding the final answer."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training problems."})
    eval_at_end: bool = field(default=True, metadata={"help": "Evaluate once more after training."})


def load_problem_sets(script_args: ReinforceScriptArguments):
    """Training, evaluation and few-shot problem sets, with the field mapping applied."""
    fields = {"question_field": script_args.question_field, "answer_field": script_args.answer_field}
    train = load_math_dataset(
        script_args.dataset_name, split=script_args.dataset_train_split, limit=script_args.train_limit, **fields
    )
    names = script_args.eval_dataset_name or [script_args.dataset_name]
    if isinstance(names, str):
        names = [names]
    sets = {
        _metric_name(name): load_math_dataset(
            name, split=script_args.dataset_test_split, limit=script_args.eval_limit, **fields
        )
        for name in names
    }
    evaluation = next(iter(sets.values())) if len(sets) == 1 else sets
    few_shot_name = script_args.few_shot_dataset_name
    if few_shot_name is None and script_args.dataset_name.startswith("arithmetic"):
        few_shot_name = script_args.dataset_name
    if few_shot_name is None:
        few_shot = train
    else:
        few_shot = load_math_dataset(
            few_shot_name, split="fewshot" if few_shot_name.startswith("arithmetic") else "train"
        )
    return train, evaluation, few_shot


def _metric_name(dataset_name: str) -> str:
    """A short key for metric names: 'arithmetic:level=1,2,n=200' -> 'arithmetic', 'data/my.jsonl' -> 'my'."""
    return Path(dataset_name.split(":", 1)[0]).stem or dataset_name


def run_reinforce(
    script_args: ReinforceScriptArguments, training_args: StepwiseReinforceConfig, model_args: ModelConfig
) -> dict:
    """Train with stepwise REINFORCE, evaluating before (``eval_on_start``) and after; returns the final metrics."""
    quantization = build_quantization_config(model_args.load_in_4bit, model_args.load_in_8bit, model_args.use_peft)
    if quantization is not None:
        training_args.model_init_kwargs = {
            **(training_args.model_init_kwargs or {}),
            "quantization_config": quantization,
        }
    if training_args.env_flavour is None:
        training_args.env_flavour = dataset_flavour(script_args.dataset_name)
    train, evaluation, few_shot = load_problem_sets(script_args)
    started = time.perf_counter()
    trainer = StepwiseReinforceTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        few_shot_dataset=few_shot,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if script_args.eval_at_end else {}
    trainer.plot_curves()  # again, now with the final evaluation
    trainer.save_model(training_args.output_dir)
    summary = {"wall_seconds": time.perf_counter() - started, **metrics}
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("Run summary: %s", summary)
    return summary
