"""A curriculum over problem sources: easy generated arithmetic first, harder sets once the policy is ready.

Each stage names a problem source (``arithmetic:level=1``, ``gsm8k_easy``, ``gsm8k``, any loader name or file).
The curriculum is promoted to the next stage when the rolling training accuracy reaches the stage's threshold
after at least ``min_steps`` optimizer steps in the stage, or unconditionally after ``max_steps``. Its state (stage,
steps in stage, sampling cursors) is saved in checkpoints, so a resumed run continues in the same stage.

``replay`` keeps earlier stages in the mix: that fraction of each step's problems comes from the stages already
passed (in turn). A harder stage the policy cannot yet solve gives no learning signal at all (every episode of a
group fails, so every advantage is 0); the replayed problems keep the policy learning while it gets there, and keep
it from forgetting. Only the current stage's episodes count towards its promotion. Each row says its stage in
``STAGE_COLUMN``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from trl_stepwise.data import load_math_dataset

STAGE_COLUMN = "curriculum_stage"


@dataclass
class Stage:
    source: str
    threshold: float = 0.7
    min_steps: int = 5
    max_steps: int | None = None


class Curriculum:
    """Chooses which problems the trainer sees next."""

    def __init__(self, stages: Sequence[Stage], window: int = 64, seed: int = 0, replay: float = 0.0) -> None:
        if not stages:
            raise ValueError("A curriculum needs at least one stage.")
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"curriculum replay={replay}: a fraction of each step's problems, in [0, 1).")
        self.stages = list(stages)
        self.replay = replay
        self.replayed = 0  # earlier-stage problems drawn so far: picks whose turn it is
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
        replay: float = 0.0,
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
        return cls(stages, window=window, seed=seed, replay=replay)

    @classmethod
    def from_config(cls, args: Any) -> Curriculum:
        """Build from a ``StepwiseReinforceConfig``'s ``curriculum*`` fields (the recipe and the trainer both do)."""
        return cls.from_lists(
            args.curriculum,
            args.curriculum_thresholds,
            min_steps=args.curriculum_min_steps,
            max_steps=args.curriculum_max_steps,
            window=args.curriculum_window,
            replay=args.curriculum_replay,
            seed=args.seed,
        )

    @property
    def current(self) -> Stage:
        return self.stages[self.stage]

    @property
    def rolling_accuracy(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def sample(self, n: int, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
        """The next ``n`` problems for process ``rank``: the current stage's, and ``replay`` of them from earlier
        stages once there are any (disjoint across processes; generated problems are never repeated)."""
        earlier = round(n * self.replay) if self.stage > 0 else 0
        rows = self._draw(self.stage, n - earlier, rank, world_size)
        for i in range(earlier):
            rows.extend(self._draw((self.replayed + i) % self.stage, 1, rank, world_size))
        self.replayed += earlier
        return rows

    def _draw(self, stage: int, n: int, rank: int, world_size: int) -> list[dict[str, Any]]:
        source = self.stages[stage].source
        base = self.cursors.get(source, 0)
        self.cursors[source] = base + n * world_size
        start = base + rank * n
        if source.startswith("arithmetic"):
            from trl_stepwise.arithmetic import arithmetic_dataset, parse_arithmetic_spec

            spec = {k: v for k, v in parse_arithmetic_spec(source).items() if k not in ("n", "start")}
            rows = [dict(r) for r in arithmetic_dataset(split="train", n=n, start=start, **spec)]
        else:
            pool = self.pool(source)
            order = self._order(source, len(pool))
            rows = [dict(pool[order[(start + i) % len(pool)]]) for i in range(n)]
        return [{**row, STAGE_COLUMN: stage} for row in rows]

    def update(self, accuracies: Sequence[float], stages: Sequence[int | None] | None = None) -> bool:
        """Record one optimizer step's episode accuracies (``stages``: each episode's stage; replayed episodes do not
        count); returns True when the stage was promoted."""
        if stages is not None:
            accuracies = [a for a, s in zip(accuracies, stages, strict=True) if s is None or s == self.stage]
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
            "replayed": self.replayed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.steps_in_stage = int(state["steps_in_stage"])
        self.cursors = dict(state["cursors"])
        self.recent = deque(state.get("recent", []), maxlen=self.window)
        self.replayed = int(state.get("replayed", 0))

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
