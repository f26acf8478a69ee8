"""Readable training output: one progress bar (reward and accuracy in its postfix) and one compact line per log.

transformers prints every log as a Python dict (20+ keys per step, half of them timings), interleaved with the bar.
Here each log becomes one line of the numbers a user watches (``step 3/16 | loss 0.0012 | reward 0.41 | acc 31.2%
| kl 0.0021 | ...``) and each evaluation one line with its confidence interval; every metric still reaches
``trainer.state.log_history``, ``report_to`` integrations and the training curves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = [
    "CompactPrinterCallback",
    "CompactProgressCallback",
    "format_eval_line",
    "format_train_line",
    "show_reward_on_progress_bar",
    "use_compact_logs",
]

# (log key, label, format); shown in this order when present
TRAIN_FIELDS = (
    ("loss", "loss", "{:.4g}"),
    ("reward", "reward", "{:.3f}"),
    ("accuracy", "acc", "{:.1%}"),
    ("kl", "kl", "{:.4f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("grad_norm", "grad", "{:.3g}"),
    ("learning_rate", "lr", "{:.2g}"),
    ("tokens_per_episode", "tokens/ep", "{:.1f}"),
    ("curriculum/stage", "stage", "{:.0f}"),
    ("time/generation_s", "gen", "{:.1f}s"),
    ("time/scoring_s", "score", "{:.1f}s"),
    ("time/optimisation_s", "opt", "{:.1f}s"),
)


def _format(value: object, spec: str) -> str:
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_train_line(logs: Mapping[str, object], step: int, max_steps: int) -> str:
    """One line for a training log: the step, then the metrics of ``TRAIN_FIELDS`` that are present."""
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    parts += [f"{label} {_format(logs[key], spec)}" for key, label, spec in TRAIN_FIELDS if key in logs]
    return " | ".join(parts)


def format_eval_line(logs: Mapping[str, object], step: int) -> str:
    """One line per evaluated set: ``eval (step 0) gsm8k: accuracy 31.0% (62/200, 95% CI 24.8-37.9%)``."""
    lines = []
    for key in logs:
        if not (key.startswith("eval") and key.endswith("_accuracy")):
            continue
        prefix = key[: -len("_accuracy")]
        name = prefix[len("eval_") :] if prefix != "eval" else ""
        text = f"eval (step {step}){' ' + name if name else ''}: accuracy {_format(logs[key], '{:.1%}')}"
        correct, total = logs.get(f"{prefix}_correct"), logs.get(f"{prefix}_total")
        low, high = logs.get(f"{prefix}_accuracy_ci_low"), logs.get(f"{prefix}_accuracy_ci_high")
        details = []
        if correct is not None and total is not None:
            details.append(f"{int(correct)}/{int(total)}")
        if low is not None and high is not None:
            details.append(f"95% CI {_format(low, '{:.1%}')}-{_format(high, '{:.1%}')}")
        lines.append(text + (f" ({', '.join(details)})" if details else ""))
    return "\n".join(lines)


def format_log(logs: Mapping[str, object], step: int, max_steps: int) -> str | None:
    """The line(s) for any log of the trainer: evaluation, training step or the end-of-training summary."""
    if any(key.startswith("eval") and key.endswith("_accuracy") for key in logs):
        return format_eval_line(logs, step)
    if "train_runtime" in logs:
        loss = logs.get("train_loss")
        loss_text = f", mean loss {_format(loss, '{:.4g}')}" if loss is not None else ""
        return f"training done: {step} steps in {_format(logs['train_runtime'], '{:.0f}')} s{loss_text}"
    if any(key in logs for key, _, _ in TRAIN_FIELDS):
        return format_train_line(logs, step, max_steps)
    return None


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, with logs written above it as compact lines instead of dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = format_log(logs, state.global_step, state.max_steps)
            if line and self.training_bar is not None:
                self.training_bar.write(line)
            elif line:  # the bar is closed (an evaluation after training): print the line on its own
                print(line, flush=True)


class CompactPrinterCallback(PrinterCallback):
    """With ``disable_tqdm``: the same compact lines, printed."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            line = format_log(logs, state.global_step, state.max_steps)
            if line:
                print(line, flush=True)


def use_compact_logs(trainer: Any) -> None:
    """Swap transformers' dict-printing log callbacks for compact lines (the progress bar itself stays)."""
    for plain, compact in ((ProgressCallback, CompactProgressCallback), (PrinterCallback, CompactPrinterCallback)):
        if any(type(callback) is plain for callback in trainer.callback_handler.callbacks):
            trainer.remove_callback(plain)
            trainer.add_callback(compact)


def show_reward_on_progress_bar(trainer: Any, logs: Mapping[str, float]) -> None:
    """Reward and accuracy of the last step in the bar's postfix."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None and "reward" in logs:
            bar.set_postfix(reward=f"{logs['reward']:.3f}", acc=f"{logs.get('accuracy', 0.0):.3f}")
