"""What the training recipes share: their script arguments and the run itself (model, data, trainer, evals).

The recipes in ``recipes/`` stay thin (``main`` parses, checks and runs), in the style of TRL's example scripts. Every
input mistake (a flag, a YAML key, a data set, a checkpoint, a curriculum stage) is found by ``prepare_reinforce``
before any model loads and ends as one line with exit code 2; nothing is written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig, get_peft_config

from trl_stepwise.curriculum import Curriculum
from trl_stepwise.data import dataset_flavour, load_math_dataset
from trl_stepwise.models import build_quantization_config
from trl_stepwise.prompting import AlternatingExamples, has_worked_solutions, load_system_prompt
from trl_stepwise.quiet import quiet_data_progress_bars
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer
from trl_stepwise.trainer.checkpoints import resolve_resume_checkpoint
from trl_stepwise.trainer.run_budget import RunBudget
from trl_stepwise.trainer.setup import check_engine_setup
from trl_stepwise.usage import UsageError, check_writable, parse_recipe_args, report_usage_error

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
    few_shot_dataset_name: list[str] | None = field(
        default=None,
        metadata={
            "help": "Source of few-shot examples (default: the training set; arithmetic: fewshot split); several "
            "names alternate in the prompt, one example from each in turn (e.g. gsm8k arithmetic:level=1)."
        },
    )
    question_field: str | None = field(default=None, metadata={"help": "Dataset field holding the problem text."})
    answer_field: str | None = field(default=None, metadata={"help": "Dataset field holding the final answer."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training problems."})
    eval_at_end: bool = field(default=True, metadata={"help": "Evaluate once more after training."})
    run_budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock minutes for the whole run, start-up to the end of the final evaluation: training "
            "also stops (max_steps stays the upper bound) at the first step end after which one more step and the "
            "final evaluation (as long as the one before training) would run past it. Default: max_steps alone."
        },
    )


def _load(flag: str, name: str, **kwargs: Any):
    """``load_math_dataset`` whose errors name the flag that chose the data set."""
    try:
        return load_math_dataset(name, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"{flag} {name}: {err}") from err


def load_problem_sets(script_args: ReinforceScriptArguments):
    """Training, evaluation and few-shot problem sets, with the field mapping applied."""
    fields = {"question_field": script_args.question_field, "answer_field": script_args.answer_field}
    train = _load(
        "--dataset_name",
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        limit=script_args.train_limit,
        **fields,
    )
    names = script_args.eval_dataset_name or [script_args.dataset_name]
    if isinstance(names, str):
        names = [names]
    sets = {
        _metric_name(name): _load(
            "--eval_dataset_name", name, split=script_args.dataset_test_split, limit=script_args.eval_limit, **fields
        )
        for name in names
    }
    evaluation = next(iter(sets.values())) if len(sets) == 1 else sets
    few_shot_names = _few_shot_names(script_args)
    if not few_shot_names:
        return train, evaluation, train
    few_shot_sets = tuple(
        _load("--few_shot_dataset_name", name, split="fewshot" if name.startswith("arithmetic") else "train")
        for name in few_shot_names
    )
    few_shot = few_shot_sets[0] if len(few_shot_sets) == 1 else AlternatingExamples(few_shot_sets)
    return train, evaluation, few_shot


def _few_shot_names(script_args: ReinforceScriptArguments) -> list[str]:
    """The few-shot sources named (a YAML string is one name); a generated training set is its own default."""
    names = script_args.few_shot_dataset_name
    if isinstance(names, str):
        names = [names]
    if not names and script_args.dataset_name.startswith("arithmetic"):
        names = [script_args.dataset_name]
    return list(names or [])


def _metric_name(dataset_name: str) -> str:
    """A short key for metric names: 'arithmetic:level=1,2,n=200' -> 'arithmetic', 'data/my.jsonl' -> 'my'."""
    return Path(dataset_name.split(":", 1)[0]).stem or dataset_name


@dataclass
class PreparedRun:
    """Everything a reinforce run needs that can be checked before the model loads."""

    train: Any
    evaluation: Any
    few_shot: Any
    curriculum: Any
    resume_from_checkpoint: str | None


def prepare_reinforce(
    script_args: ReinforceScriptArguments, training_args: StepwiseReinforceConfig, model_args: ModelConfig
) -> PreparedRun:
    """Check the input and load the data, before any model: raises ``UsageError``/``ValueError`` naming the flag."""
    try:
        quantization = build_quantization_config(model_args.load_in_4bit, model_args.load_in_8bit, model_args.use_peft)
    except ValueError as err:
        flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        raise UsageError(f"{flag} true: {err}") from err
    if quantization is not None:
        training_args.model_init_kwargs = {
            **(training_args.model_init_kwargs or {}),
            "quantization_config": quantization,
        }
    check_writable(training_args.output_dir, "--output_dir", is_dir=True)
    if script_args.run_budget_minutes is not None and not script_args.run_budget_minutes > 0:
        raise UsageError(
            f"--run_budget_minutes {script_args.run_budget_minutes}: a budget must be more than 0 minutes; drop the "
            "flag to train for max_steps."
        )
    try:
        check_engine_setup(
            training_args, get_peft_config(model_args), model_args.load_in_4bit, model_args.load_in_8bit
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    if training_args.env_flavour is None:
        training_args.env_flavour = dataset_flavour(script_args.dataset_name)
    if training_args.distill_coef > 0 and not training_args.teacher_model:
        raise UsageError(
            f"--distill_coef {training_args.distill_coef} needs a teacher: set --teacher_model (a hub id or a "
            "local folder), or --distill_coef 0."
        )
    try:
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        load_system_prompt(training_args.system_prompt, training_args.env_flavour)
    except ValueError as err:
        raise UsageError(f"--system_prompt {training_args.system_prompt}: {err}") from err
    curriculum = None
    if training_args.curriculum:  # before the problem sets load: a misspelt stage fails at once
        curriculum = Curriculum.from_config(training_args)
        curriculum.check_sources()
    train, evaluation, few_shot = load_problem_sets(script_args)
    named = script_args.few_shot_dataset_name
    for name, rows in zip(_few_shot_names(script_args), AlternatingExamples.sources_of(few_shot), strict=False):
        if named and training_args.n_few_shot != 0 and not has_worked_solutions(rows, training_args.env_flavour):
            raise UsageError(
                f"--few_shot_dataset_name {name}: its rows have no worked solutions (final answers only), so the "
                "prompt would teach the model to answer without steps; name a source with worked solutions (e.g. "
                "gsm8k, math, arithmetic:level=1) or drop the flag (the trainer then falls back to bundled worked "
                "examples)."
            )
    return PreparedRun(train, evaluation, few_shot, curriculum, resume)


def build_reinforce_trainer(
    training_args: StepwiseReinforceConfig,
    model_args: ModelConfig,
    prepared: PreparedRun,
    model: Any = None,
    processing_class: Any = None,
    callbacks: list | None = None,
) -> StepwiseReinforceTrainer:
    """The recipe's trainer; ``model`` (an already built model, e.g. a test's tiny one) replaces
    ``model_args.model_name_or_path``, and ``callbacks`` are added (e.g. a benchmark's wall-clock budget)."""
    return StepwiseReinforceTrainer(
        model=model if model is not None else model_args.model_name_or_path,
        args=training_args,
        train_dataset=prepared.train,
        eval_dataset=prepared.evaluation,
        processing_class=processing_class,
        few_shot_dataset=prepared.few_shot,
        peft_config=get_peft_config(model_args),
        curriculum=prepared.curriculum,
        callbacks=callbacks,
    )


def run_reinforce(
    script_args: ReinforceScriptArguments,
    training_args: StepwiseReinforceConfig,
    model_args: ModelConfig,
    prepared: PreparedRun | None = None,
    started_at: float | None = None,
) -> dict:
    """Train with stepwise REINFORCE, evaluating before (``eval_on_start``) and after; returns the final metrics.
    ``started_at``: when the run began (``time.monotonic``), for ``run_budget_minutes`` (default: now)."""
    started = time.monotonic()
    prepared = prepared or prepare_reinforce(script_args, training_args, model_args)
    budget = None
    if script_args.run_budget_minutes is not None:
        budget = RunBudget(
            60 * script_args.run_budget_minutes,
            started=started_at if started_at is not None else started,
            final_evaluation=script_args.eval_at_end,
        )
    trainer = build_reinforce_trainer(training_args, model_args, prepared, callbacks=[budget] if budget else None)
    trainer.train(resume_from_checkpoint=prepared.resume_from_checkpoint)
    if budget is not None and budget.stopped_at is not None:
        logger.warning(
            "Training stopped at step %d of %d: one more step and the final evaluation would pass "
            "--run_budget_minutes %g.",
            budget.stopped_at,
            training_args.max_steps,
            script_args.run_budget_minutes,
        )
    metrics = trainer.evaluate() if script_args.eval_at_end else {}
    trainer.plot_curves()  # again, now with the final evaluation
    trainer.save_model(training_args.output_dir)
    summary = {"wall_seconds": time.monotonic() - started, **metrics}
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("Run summary: %s", summary)
    return summary


INPUT_ERRORS = (UsageError, ValueError, FileNotFoundError)  # DatasetFieldError and the config's checks are ValueErrors


def main(
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    default_dataset: str = "gsm8k",
    default_eval_dataset: str | None = None,
) -> int:
    """A reinforce recipe end to end: parse flags and ``--config``, check every input before the model loads (one
    line and exit code 2 on a mistake), then train. ``default_*`` replace the gsm8k defaults (the MATH recipe)."""
    started = time.monotonic()
    prog = prog or Path(sys.argv[0]).name
    quiet_data_progress_bars()
    try:
        script_args, training_args, model_args = parse_recipe_args(
            (ReinforceScriptArguments, StepwiseReinforceConfig, ModelConfig), argv, prog=prog
        )
        if script_args.dataset_name == "gsm8k" and default_dataset != "gsm8k":  # unless the config names other data
            script_args.dataset_name = default_dataset
            script_args.eval_dataset_name = script_args.eval_dataset_name or default_eval_dataset
        prepared = prepare_reinforce(script_args, training_args, model_args)
    except INPUT_ERRORS as err:
        return report_usage_error(prog, err)
    run_reinforce(script_args, training_args, model_args, prepared, started_at=started)
    return 0
