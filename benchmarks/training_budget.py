"""Training for a wall-clock budget, side by side on pinned cores, and the reward curves it leaves: what the
learning studies (``main_job_study.py``, ``learning_per_cpu_hour.py``, ``env_trainers.py``) share."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from transformers import TrainerCallback


class BudgetCallback(TrainerCallback):
    """Stop training at the first step end after ``seconds`` of wall-clock time since ``on_train_begin``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0.0
        self.cpu_started = 0.0
        self.elapsed = 0.0
        self.cpu_seconds = 0.0
        self.steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.elapsed = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started
        self.steps = state.global_step
        if self.elapsed >= self.seconds:
            control.should_training_stop = True
        return control


EPISODES_RATIO = "dynamic_sampling/episodes_generated_per_trained"


def episodes_played(log_history: list[dict], steps: int, num_iterations: int, episodes_per_step: int) -> int:
    """Episodes generated, not trained on: a batch serves ``num_iterations`` optimizer steps, and dynamic sampling
    plays more than it trains on (its logged generated/trained ratio, averaged over the logs)."""
    batches = -(-steps // num_iterations)
    ratios = [e[EPISODES_RATIO] for e in log_history if EPISODES_RATIO in e]
    mean_ratio = sum(ratios) / len(ratios) if ratios else 1.0
    return round(batches * mean_ratio * episodes_per_step)


class CurveCallback(TrainerCallback):
    """Record every logged reward (and accuracy, loss, curriculum stage and the step's generation and optimisation
    seconds, where logged) with the wall-clock minutes since training began."""

    KEYS = ("reward", "accuracy", "loss", "curriculum/stage", "time/generation_s", "time/optimisation_s")

    def __init__(self, budget: BudgetCallback) -> None:
        self.budget = budget
        self.points: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            point = {"step": state.global_step, "minutes": (time.perf_counter() - self.budget.started) / 60}
            point.update({k: float(logs[k]) for k in self.KEYS if k in logs})
            self.points.append(point)


def run_on_cores(commands: list[list[str]], check: bool = True) -> list[int]:
    """Run the commands at the same time, each pinned to its own core with one thread; their exit codes.
    ``check``: fail (SystemExit) if any fails."""
    cores = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = []
    for index, command in enumerate(commands):
        core = {cores[index % len(cores)]}
        processes.append(
            subprocess.Popen(command, env=env, preexec_fn=lambda core=core: os.sched_setaffinity(0, core))
        )
    codes = [p.wait() for p in processes]
    failed = [" ".join(c) for c, code in zip(commands, codes, strict=True) if code != 0]
    if check and failed:
        raise SystemExit("a parallel part failed:\n" + "\n".join(failed))
    return codes


def plot_reward_curves(
    runs: dict[str, list[dict[str, float]]], path: Path, window: int, title: str = "Training reward"
) -> None:
    """Reward against wall-clock minutes, one colour per run (faint: per step; solid: rolling mean of ``window``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8 if len(runs) > 2 else 7, 4.5 if len(runs) > 2 else 4))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10").colors
    for index, (label, points) in enumerate(runs.items()):
        if not points:
            continue
        color = colors[index % len(colors)]
        minutes = [p["minutes"] for p in points]
        rewards = [p["reward"] for p in points]
        smooth = [
            sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(minutes, rewards, color=color, alpha=0.25, linewidth=1)
        ax.plot(
            minutes,
            smooth,
            color=color,
            linewidth=2,
            marker="o",
            markersize=3,
            label=f"{label} (mean of {window} steps)",
        )
    ax.set_xlabel("wall-clock minutes of training")
    ax.set_ylabel("mean reward (correctness) per step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(runs.values()):
        ax.legend(fontsize="small" if len(runs) > 4 else None)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
