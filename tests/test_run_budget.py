"""A run with a wall-clock budget stops training where one more step and the final evaluation would pass it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tiny_training import make_config
from transformers import TrainerControl, TrainerState

from trl_stepwise import StepwiseReinforceTrainer
from trl_stepwise.trainer.run_budget import RunBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _step(budget: RunBudget, clock: Clock, step: int, seconds: float) -> bool:
    clock.now += seconds
    control = TrainerControl()
    budget.on_step_end(None, TrainerState(global_step=step), control)
    return control.should_training_stop


def test_stops_at_the_last_step_that_leaves_time_for_the_final_evaluation():
    clock = Clock()
    budget = RunBudget(100.0, started=0.0, clock=clock)
    clock.now = 20.0  # start-up, then the evaluations before training: 20 s in two sets
    budget.on_evaluate(None, TrainerState(global_step=0), None, metrics={"eval_a_wall_seconds": 12.0})
    budget.on_evaluate(None, TrainerState(global_step=0), None, metrics={"eval_b_wall_seconds": 8.0, "x": 5.0})
    assert budget.evaluation_seconds == 20.0
    stops = [_step(budget, clock, step, 10.0) for step in range(1, 6)]  # steps end at 30, 40, 50, 60, 70 s
    # at 70 s: one more step (10 s) and the final evaluation (20 s) end at 100 s, within the budget
    assert stops == [False] * 5
    assert _step(budget, clock, 6, 10.0) and budget.stopped_at == 6  # at 80 s: they would end at 110 s


def test_no_time_is_kept_for_a_final_evaluation_that_will_not_run():
    clock = Clock()
    budget = RunBudget(100.0, started=0.0, clock=clock, final_evaluation=False)
    clock.now = 20.0
    budget.on_evaluate(None, TrainerState(global_step=0), None, metrics={"eval_wall_seconds": 20.0})
    assert [_step(budget, clock, step, 10.0) for step in range(1, 8)] == [False] * 7  # at 90 s: one more ends at 100
    assert _step(budget, clock, 8, 10.0)


def test_a_slow_step_counts_for_the_next_and_later_evaluations_do_not():
    clock = Clock()
    budget = RunBudget(70.0, started=0.0, clock=clock)
    budget.on_evaluate(None, TrainerState(global_step=4), None, metrics={"eval_wall_seconds": 50.0})
    assert budget.evaluation_seconds == 0.0
    assert not _step(budget, clock, 1, 10.0)  # the first step: nothing measured yet
    assert not _step(budget, clock, 2, 30.0)  # at 40 s: one more 30 s step ends at 70 s, within the budget
    assert _step(budget, clock, 3, 5.0)  # at 45 s: the slowest recent step (30 s), not this one (5 s), counts


@pytest.mark.parametrize("budget_seconds", [1e9, 1e-3])
def test_the_trainer_stops_early_only_when_the_budget_says_so(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, budget_seconds
):
    args = make_config(tmp_path, max_steps=4)
    budget = RunBudget(budget_seconds, started=0.0)
    budget.started = budget.clock()
    trainer = StepwiseReinforceTrainer(
        model=make_tiny_model(),
        args=args,
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        callbacks=[budget],
    )
    trainer.train()
    # a budget that is already spent stops at the first step with a measured step time (the second)
    assert trainer.state.global_step == (4 if budget_seconds > 1 else 2)


@pytest.mark.parametrize("eval_on_start", [False, True])
def test_a_budget_without_a_start_evaluation_says_the_final_one_is_not_covered(eval_on_start, caplog):
    budget = RunBudget(600.0, started=0.0)
    with caplog.at_level("WARNING", logger="trl_stepwise.trainer.run_budget"):
        budget.on_train_begin(SimpleNamespace(eval_on_start=eval_on_start), TrainerState(), TrainerControl())
    warned = [r.getMessage() for r in caplog.records if "--eval_on_start false" in r.getMessage()]
    assert len(warned) == (0 if eval_on_start else 1)
    assert eval_on_start or "--run_budget_minutes 10 " in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="trl_stepwise.trainer.run_budget"):
        RunBudget(600.0, started=0.0, final_evaluation=False).on_train_begin(
            SimpleNamespace(eval_on_start=False), TrainerState(), TrainerControl()
        )
    assert not caplog.records  # no final evaluation: nothing is left out


def test_a_resumed_run_keeps_time_for_its_final_evaluation():
    """On resume the evaluation before training runs at the checkpoint's step, not at step 0: it still measures the
    final one."""
    clock = Clock()
    budget = RunBudget(100.0, started=0.0, clock=clock)
    budget.on_train_begin(SimpleNamespace(eval_on_start=True), TrainerState(global_step=16), TrainerControl())
    clock.now = 20.0
    budget.on_evaluate(None, TrainerState(global_step=16), None, metrics={"eval_wall_seconds": 20.0})
    assert budget.evaluation_seconds == 20.0
    assert [_step(budget, clock, step, 10.0) for step in range(17, 22)] == [False] * 5  # at 70 s: ends at 100 s
    assert _step(budget, clock, 22, 10.0)
    budget.on_evaluate(None, TrainerState(global_step=22), None, metrics={"eval_wall_seconds": 50.0})
    assert budget.evaluation_seconds == 20.0  # an evaluation after a step of this run does not count
