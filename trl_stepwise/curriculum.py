"""A curriculum over problem sources: easy generated arithmetic first, harder sets once the policy is ready.

Each stage names a problem source (``arithmetic:level=1``, ``gsm8k_easy``, ``gsm8k``, any loader name or file).
The curriculum is promoted to the next stage when the rolling training accuracy reaches the stage's threshold
after at least ``min_steps`` optimizer steps in the stage, or unconditionally after ``max_steps``. Its state (stage,
steps in stage, sampling cursors) is saved in checkpoints, so a resumed run continues in the same stage.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from trl_stepwise.data import load_math_dataset


@dataclass
class Stage:
    source: str
    threshold: float = 0.7
    min_steps: int = 5
    max_steps: int | None = None


class Curriculum:
    """Chooses which problems the trainer sees next."""

    def __init__(self, stages: Sequence[Stage], window: int = 64, seed: int = 0) -> None:
        if not stages:
            raise ValueError("A curriculum needs at least one stage.")
        self.stages = list(stages)
        self.window = window
        self.seed = seed
        self.stage = 0
        self.steps_in_stage = 0
        self.cursors: dict[str, int] = {}
        self.recent: deque[float] = deque(maxlen=window)
        self._pools: dict[str, Dataset] = {}

    @classmethod
    def from_lists(
        cls,
        sources: Sequence[str],
        thresholds: Sequence[float] | None = None,
        min_steps: int = 5,
        max_steps: int | None = None,
        window: int = 64,
        seed: int = 0,
    ) -> Curriculum:
        """Build from flat lists, as given on the command line or in a YAML recipe."""
        thresholds = list(thresholds or [0.7] * len(sources))
        if len(thresholds) == 1:
            thresholds = thresholds * len(sources)
        if len(thresholds) != len(sources):
            raise ValueError(
                f"curriculum_thresholds has {len(thresholds)} values for {len(sources)} stages: give one per stage "
                "or a single value for all."
            )
        stages = [Stage(s, t, min_steps, max_steps) for s, t in zip(sources, thresholds, strict=True)]
        return cls(stages, window=window, seed=seed)

    @property
    def current(self) -> Stage:
        return self.stages[self.stage]

    @property
    def rolling_accuracy(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def sample(self, n: int, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
        """The next ``n`` problems of the current stage for process ``rank`` (disjoint across processes; generated
        problems are never repeated)."""
        source = self.current.source
        base = self.cursors.get(source, 0)
        self.cursors[source] = base + n * world_size
        start = base + rank * n
        if source.startswith("arithmetic"):
            from trl_stepwise.arithmetic import arithmetic_dataset, parse_arithmetic_spec

            spec = {k: v for k, v in parse_arithmetic_spec(source).items() if k not in ("n", "start")}
            return [dict(r) for r in arithmetic_dataset(split="train", n=n, start=start, **spec)]
        pool = self.pool(source)
        order = self._order(source, len(pool))
        return [dict(pool[order[(start + i) % len(pool)]]) for i in range(n)]

    def update(self, accuracies: Sequence[float]) -> bool:
        """Record one optimizer step's episode accuracies; returns True when the stage was promoted."""
        self.recent.extend(accuracies)
        self.steps_in_stage += 1
        stage = self.current
        ready = self.steps_in_stage >= stage.min_steps and len(self.recent) >= min(self.window, 8)
        passed = ready and self.rolling_accuracy >= stage.threshold
        timed_out = stage.max_steps is not None and self.steps_in_stage >= stage.max_steps
        if (passed or timed_out) and self.stage < len(self.stages) - 1:
            self.stage += 1
            self.steps_in_stage = 0
            self.recent.clear()
            return True
        return False

    def few_shot_rows(self, n: int = 64) -> list[dict[str, Any]]:
        """Solved examples for prompts, from the first stage's source (its few-shot split for generated problems)."""
        source = self.stages[0].source
        if source.startswith("arithmetic"):
            from trl_stepwise.arithmetic import arithmetic_dataset, parse_arithmetic_spec

            spec = {k: v for k, v in parse_arithmetic_spec(source).items() if k not in ("n", "start")}
            return [dict(r) for r in arithmetic_dataset(split="fewshot", n=n, **spec)]
        pool = self.pool(source)
        return [dict(pool[i]) for i in self._order(source, len(pool))[:n]]

    def placeholder_dataset(self, size: int = 1_000_000) -> Dataset:
        """Index rows for the Trainer's dataloader; the problems themselves come from ``sample``."""
        return Dataset.from_dict({"question": [""] * size, "answer": [""] * size})

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "steps_in_stage": self.steps_in_stage,
            "cursors": dict(self.cursors),
            "recent": list(self.recent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.steps_in_stage = int(state["steps_in_stage"])
        self.cursors = dict(state["cursors"])
        self.recent = deque(state.get("recent", []), maxlen=self.window)

    def check_sources(self) -> None:
        """Load every stage's problems now (before a model is loaded): a bad stage name fails here, naming it."""
        for stage in self.stages:
            try:
                if stage.source.startswith("arithmetic"):
                    from trl_stepwise.arithmetic import parse_arithmetic_spec

                    parse_arithmetic_spec(stage.source)
                else:
                    self.pool(stage.source)
            except (ValueError, FileNotFoundError) as err:
                raise ValueError(
                    f"--curriculum {stage.source}: {err} Stages are arithmetic:level=N, gsm8k_easy, a bundled name "
                    "or a data file."
                ) from err

    def pool(self, source: str) -> Dataset:
        """The training problems of a stage source that is not generated (loaded once): what ``sample`` draws from."""
        if source not in self._pools:  # gsm8k_easy is a dataset name too (data.EASY_GSM8K_MAX_CALCULATIONS)
            self._pools[source] = load_math_dataset(source, split="train")
        return self._pools[source]

    def _order(self, source: str, size: int) -> list[int]:
        order = list(range(size))
        random.Random(f"{self.seed}-{source}").shuffle(order)
        return order
