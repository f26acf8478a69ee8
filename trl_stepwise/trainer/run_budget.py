"""Train for a wall-clock budget: stop where one more step would leave no time for the final evaluation.

How many steps fit into a run's minutes depends on the machine (a CPU with bfloat16 hardware trains a main-job step
~1.5x faster than one without). ``max_steps`` stays the upper bound; with a budget, training also stops at the first
step end after which one more step (the slowest of the last few) and the final evaluation (as long as the
evaluations before the first step took, on resume too, stored with them when they were reused) would run past it.
Every process stops at the same step: the main process decides.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from transformers import TrainerCallback

logger = logging.getLogger(__name__)
RECENT_STEPS = 3  # the slowest of the last few steps: one long episode can make a step much longer than the median


class RunBudget(TrainerCallback):
    """Stops training so that the run, started at ``started`` (``clock`` seconds), ends within ``budget_seconds``."""

    def __init__(
        self,
        budget_seconds: float,
        started: float,
        clock: Callable[[], float] = time.monotonic,
        final_evaluation: bool = True,
    ) -> None:
        self.budget_seconds = budget_seconds
        self.final_evaluation = final_evaluation  # without one (eval_at_end false), no time is kept for it
        self.started = started
        self.clock = clock
        self.evaluation_seconds = 0.0  # the evaluations before the first step: what the final one will take
        self.first_step = 0  # the global step training (re)starts from: a resumed run evaluates there
        self.recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self.last_step_end: float | None = None
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step
        if self.final_evaluation and not getattr(args, "eval_on_start", False):
            logger.warning(
                "--run_budget_minutes %g with --eval_on_start false: no evaluation before training measures how long "
                "the final one takes, so the budget keeps no time for it and the run ends that much later; use "
                "--eval_on_start true (computed once, then reused) or a smaller budget.",
                self.budget_seconds / 60,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == self.first_step and self.last_step_end is None and metrics:
            self.evaluation_seconds += sum(v for k, v in metrics.items() if k.endswith("_wall_seconds"))

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        if self.last_step_end is not None:
            self.recent_steps.append(now - self.last_step_end)
        self.last_step_end = now
        if self.recent_steps and _agreed(self._out_of_time(now)):
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def _out_of_time(self, now: float) -> bool:
        needed = max(self.recent_steps) + (self.evaluation_seconds if self.final_evaluation else 0.0)
        return now - self.started + needed > self.budget_seconds


def _agreed(decision: bool) -> bool:
    """The main process's decision, on every process (clocks differ a little; all must stop at the same step)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if PartialState().num_processes == 1:
        return decision
    box = [decision]
    broadcast_object_list(box, from_process=0)
    return box[0]
