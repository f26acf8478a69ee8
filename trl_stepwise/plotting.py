"""A PNG of training reward and evaluation accuracy over optimizer steps, written at the end of training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_training_curves(log_history: Sequence[dict], path: str | Path) -> Path | None:
    """Plot ``reward``/``accuracy`` and every ``eval_*accuracy`` of a Trainer log history; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {
        "train reward": [(h["step"], h["reward"]) for h in log_history if "reward" in h],
        "train accuracy": [(h["step"], h["accuracy"]) for h in log_history if "accuracy" in h],
    }
    for entry in log_history:  # eval_accuracy, or eval_<name>_accuracy with several eval sets
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("accuracy"):
                name = key[len("eval_") : -len("accuracy")].strip("_").replace("_", " ")
                series.setdefault(f"eval accuracy {name}".strip(), []).append((entry["step"], value))
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if label.startswith("eval") else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
