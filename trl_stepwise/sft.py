"""Supervised fine-tuning baseline with TRL's ``SFTTrainer`` on the same problems and in the same format as RL runs.

RL results mean little without the obvious baseline: train the same model on the same problems by imitating the
reference solutions. To make the comparison fair the SFT examples use exactly the format the stepwise environment
and ``trl-stepwise evaluate`` expect: the bundled system prompt, the question as the user turn, and the reference
solution converted by :func:`trl_stepwise.prompting.solution_to_steps` (one step per line, ``<<expr=result>>``
calculator annotations kept, a final ``The answer is: N`` line) as the assistant turn. The data is TRL's
conversational prompt-completion format, so ``SFTTrainer`` computes the loss on the completion only by default.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from trl_stepwise.data import dataset_flavour, load_math_dataset
from trl_stepwise.models import build_quantization_config, load_model, load_tokenizer
from trl_stepwise.prompting import _is_answer_step, load_system_prompt, solution_to_steps
from trl_stepwise.quiet import quiet_data_progress_bars
from trl_stepwise.trainer.checkpoints import resolve_resume_checkpoint
from trl_stepwise.usage import UsageError, parse_recipe_args, report_usage_error

logger = logging.getLogger(__name__)

SUMMARY_FILE = "run_summary.json"


class SFTDataError(ValueError):
    """The problems cannot be turned into SFT examples (no worked solutions); the message says how to fix it."""


def _no_solution_message(reason: str) -> str:
    return (
        f"SFT needs a worked solution for every problem, but {reason}. Add the step-by-step solution of each "
        "problem in a 'solution' field (or 'rationale'/'explanation', or GSM8K-style 'answer' text ending in "
        "'#### N'), or pass --solution_field <field> to name the field that holds it. Datasets with final answers "
        "only can still be used for RL (recipes/reinforce_gsm8k.py), which needs no reference solutions."
    )


def sft_dataset(
    rows: Dataset | Iterable[Mapping[str, Any]], flavour: str, system_prompt: str | None = None
) -> Dataset:
    """Normalised problem rows -> conversational prompt-completion examples in the stepwise format.

    ``prompt`` is ``[system, user question]`` and ``completion`` is ``[assistant: "".join(steps)]``, so the model is
    trained on exactly the text the stepwise environment reads back line by line. ``system_prompt`` is a bundled
    prompt name or a file (as ``trl-stepwise evaluate --system_prompt``); None -> the flavour's bundled prompt.
    Rows whose solution gives no steps ending in an answer line (empty solution, MATH's empty ``\\boxed{}``) are
    dropped and counted in the log; if no row has a solution at all, :class:`SFTDataError` says how to add them.
    """
    if not isinstance(rows, Dataset):
        rows = Dataset.from_list([dict(row) for row in rows])
    if "solution" not in rows.column_names:
        raise SFTDataError(_no_solution_message(f"the dataset has no 'solution' column (it has {rows.column_names})"))
    system = load_system_prompt(system_prompt, flavour)
    examples, dropped = [], 0
    for row in rows:
        solution = row["solution"]
        steps = solution_to_steps(row, flavour) if solution and solution.strip() else []
        if not steps or not _is_answer_step(steps[-1]):
            dropped += 1
            continue
        examples.append(
            {
                "prompt": [{"role": "system", "content": system}, {"role": "user", "content": row["question"]}],
                "completion": [{"role": "assistant", "content": "".join(steps)}],
            }
        )
    if not examples:
        raise SFTDataError(_no_solution_message(f"none of its {len(rows)} rows has one that converts to steps"))
    if dropped:
        logger.warning("Dropped %d of %d problems whose solution gives no stepwise answer.", dropped, len(rows))
    logger.info("Built %d SFT examples (flavour %s).", len(examples), flavour)
    return Dataset.from_list(examples)


@dataclass
class SFTScriptArguments:
    """Data options of the SFT baseline recipe (the model comes from ModelConfig, the training from SFTConfig)."""

    dataset_name: str = field(
        default="gsm8k",
        metadata={
            "help": "Training problems with worked solutions: gsm8k, math, arithmetic:level=N, a hub id, or a local "
            "JSONL/Parquet file."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training problems."})
    question_field: str | None = field(default=None, metadata={"help": "Dataset field holding the problem text."})
    answer_field: str | None = field(default=None, metadata={"help": "Dataset field holding the final answer."})
    solution_field: str | None = field(
        default=None, metadata={"help": "Dataset field holding the worked solution (default: solution/rationale)."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Bundled prompt name (gsm8k, math, arithmetic) or a text file; default: the dataset's. Evaluate "
            "with the same --system_prompt."
        },
    )


def _final_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The last logged training loss (the run's mean loss hides where it ended)."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else None


@dataclass
class PreparedSFT:
    """What an SFT run needs that can be checked before the model loads."""

    rows: Dataset
    train: Dataset
    flavour: str
    quantization: Any
    resume_from_checkpoint: str | None


def prepare_sft(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> PreparedSFT:
    """Check the input and build the SFT data before any model loads; errors name the flag (``UsageError``)."""
    try:
        quantization = build_quantization_config(model_args.load_in_4bit, model_args.load_in_8bit, model_args.use_peft)
    except ValueError as err:
        flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        raise UsageError(f"{flag} true: {err}") from err
    if training_args.max_steps == 0 or (training_args.max_steps < 0 and training_args.num_train_epochs <= 0):
        raise UsageError(
            f"--max_steps {training_args.max_steps} --num_train_epochs {training_args.num_train_epochs}: nothing to "
            "train; set --max_steps N > 0 or --num_train_epochs > 0."
        )
    try:
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    except ValueError as err:
        raise UsageError(str(err)) from err
    flavour = dataset_flavour(script_args.dataset_name)
    try:
        rows = load_math_dataset(
            script_args.dataset_name,
            split=script_args.dataset_train_split,
            question_field=script_args.question_field,
            answer_field=script_args.answer_field,
            solution_field=script_args.solution_field,
            limit=script_args.train_limit,
        )
        train = sft_dataset(rows, flavour, script_args.system_prompt)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--dataset_name {script_args.dataset_name}: {err}") from err
    return PreparedSFT(rows, train, flavour, quantization, resume)


def run_sft(
    script_args: SFTScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    prepared: PreparedSFT | None = None,
) -> dict[str, Any]:
    """Fine-tune on the reference solutions, save model + tokenizer to ``output_dir`` and write ``run_summary.json``.

    The model is loaded by :mod:`trl_stepwise.models` (so no name means the embedded SmolLM2-135M-Instruct, and
    4-bit needs LoRA), then handed to ``SFTTrainer`` with the LoRA config from ``model_args``.
    """
    started = time.perf_counter()
    prepared = prepared or prepare_sft(script_args, training_args, model_args)
    quantization, flavour, rows, train = prepared.quantization, prepared.flavour, prepared.rows, prepared.train

    # We load the model ourselves (embedded default, clear errors); model_init_kwargs still reach from_pretrained.
    model_kwargs = dict(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = None
    if model_args.attn_implementation is not None:
        model_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    if training_args.trust_remote_code:
        model_kwargs.setdefault("trust_remote_code", True)
    model = load_model(
        model_args.model_name_or_path,
        dtype=model_args.dtype or "float32",
        quantization_config=quantization,
        **model_kwargs,
    )
    tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    result = trainer.train(resume_from_checkpoint=prepared.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # also saves the tokenizer (left padding, for generation)
    summary = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_examples": len(train),
        "dropped_problems": len(rows) - len(train),
        "epochs": training_args.num_train_epochs if training_args.max_steps <= 0 else None,
        "global_steps": trainer.state.global_step,
        "final_train_loss": _final_loss(trainer.state.log_history),
        "mean_train_loss": result.training_loss,
        "dataset_name": script_args.dataset_name,
        "flavour": flavour,
        "model_name_or_path": model_args.model_name_or_path,
    }
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        logger.info("Run summary: %s", summary)
    return summary


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The SFT recipe: parse flags and ``--config``, check every input before the model loads (one line, exit code
    2 on a mistake), then train."""
    prog = prog or Path(sys.argv[0]).name
    quiet_data_progress_bars()
    try:
        # SFTConfig defaults to bf16, which refuses to start on a CPU: default to what the machine supports
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        script_args, training_args, model_args = parse_recipe_args(
            (SFTScriptArguments, SFTConfig, ModelConfig), argv, prog=prog, defaults={"bf16": bf16}
        )
        prepared = prepare_sft(script_args, training_args, model_args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        return report_usage_error(prog, err)
    run_sft(script_args, training_args, model_args, prepared)
    return 0
