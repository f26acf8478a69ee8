"""Training output: compact metric lines instead of dicts, one progress bar, samples written above it."""

from __future__ import annotations

from tiny_training import length_reward, make_config

from trl_stepwise.trainer import StepwiseReinforceTrainer
from trl_stepwise.trainer.progress import (
    CompactPrinterCallback,
    CompactProgressCallback,
    format_eval_line,
    format_log,
    format_train_line,
)


def test_train_line_shows_the_watched_metrics_in_order() -> None:
    logs = {"loss": 0.00123, "reward": 0.4125, "accuracy": 0.3125, "kl": 0.0021, "end/eos": 0.0, "epoch": 0.1}
    assert format_train_line(logs, 3, 16) == "step 3/16 | loss 0.00123 | reward 0.412 | acc 31.2% | kl 0.0021"


def test_eval_line_per_set_with_counts_and_interval() -> None:
    logs = {
        "eval_gsm8k_accuracy": 0.31,
        "eval_gsm8k_correct": 62.0,
        "eval_gsm8k_total": 200.0,
        "eval_gsm8k_accuracy_ci_low": 0.248,
        "eval_gsm8k_accuracy_ci_high": 0.379,
        "eval_accuracy": 0.5,
    }
    assert format_eval_line(logs, 0).splitlines() == [
        "eval (step 0) gsm8k: accuracy 31.0% (62/200, 95% CI 24.8%-37.9%)",
        "eval (step 0): accuracy 50.0%",
    ]
    assert format_log({"train_runtime": 812.4, "train_loss": 0.01}, 16, 16) == (
        "training done: 16 steps in 812 s, mean loss 0.01"
    )
    assert format_log({"total_flos": 1.0}, 1, 1) is None


def test_trainer_prints_compact_lines_not_dicts(tiny_model, tokenizer, arithmetic_problems, tmp_path, capsys) -> None:
    trainer = StepwiseReinforceTrainer(
        model=tiny_model,
        args=make_config(tmp_path, max_steps=2, num_completions_to_print=1, log_rollouts=False),
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    kinds = {type(c) for c in trainer.callback_handler.callbacks}
    assert CompactPrinterCallback in kinds and not {CompactProgressCallback} & kinds  # disable_tqdm=True here
    trainer.train()
    out = capsys.readouterr().out
    assert "{'" not in out  # no dict-formatted logs
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"]
    assert all("reward" in line and "acc" in line for line in lines)
    assert "training done: 2 steps" in out and "[step 1] sample, reward" in out


def test_progress_bar_callback_is_the_compact_one(tiny_model, tokenizer, arithmetic_problems, tmp_path) -> None:
    trainer = StepwiseReinforceTrainer(
        model=tiny_model,
        args=make_config(tmp_path, disable_tqdm=False),
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert kinds.count(CompactProgressCallback) == 1 and CompactPrinterCallback not in kinds


def test_an_evaluation_after_training_is_printed_too(capsys) -> None:
    """The bar is closed once training ends; the final evaluation (the recipe's "after" numbers) must still show."""
    from transformers import TrainerState, TrainingArguments

    callback = CompactProgressCallback()
    state = TrainerState(global_step=36, max_steps=36)
    logs = {"eval_gsm8k_accuracy": 0.195, "eval_gsm8k_correct": 39.0, "eval_gsm8k_total": 200.0}
    assert callback.training_bar is None  # as after on_train_end
    callback.on_log(TrainingArguments(output_dir="unused", report_to="none"), state, None, logs=logs)
    assert "eval (step 36) gsm8k: accuracy 19.5% (39/200)" in capsys.readouterr().out
