"""Curriculum promotion, sampling and resume; the arithmetic environment on its own."""

from __future__ import annotations

import json

import pytest

from trl_stepwise.curriculum import STAGE_COLUMN, Curriculum, Stage
from trl_stepwise.envs import MathEnv
from trl_stepwise.prompting import gsm8k_solution_to_steps
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer
from trl_stepwise.trainer.saving import STATE_FILE


def two_stage(**kwargs) -> Curriculum:
    return Curriculum(
        [Stage("arithmetic:level=1", 0.5, 2, kwargs.get("max_steps")), Stage("arithmetic:level=2")], window=8
    )


def test_promotes_only_after_min_steps_and_threshold():
    curriculum = two_stage()
    assert not curriculum.update([1.0] * 8)  # accuracy 1.0 but only one step in the stage
    assert curriculum.stage == 0
    assert curriculum.update([1.0] * 8)  # second step: min_steps reached, rolling accuracy 1.0 >= 0.5
    assert curriculum.stage == 1 and curriculum.steps_in_stage == 0 and not curriculum.recent


def test_low_accuracy_stays_until_max_steps_and_last_stage_is_final():
    curriculum = two_stage(max_steps=3)
    assert not curriculum.update([0.0] * 8) and not curriculum.update([0.0] * 8)
    assert curriculum.update([0.0] * 8)  # forced by max_steps
    for _ in range(5):
        assert not curriculum.update([1.0] * 8)
    assert curriculum.stage == 1


def test_samples_follow_the_stage_never_repeat_and_differ_across_processes():
    curriculum = two_stage()
    rank0, rank1 = curriculum.sample(4, rank=0, world_size=2), curriculum.sample(4, rank=1, world_size=2)
    later = curriculum.sample(4)
    questions = [r["question"] for r in rank0 + rank1 + later]
    assert len(set(questions)) == 12
    assert {r["level"] for r in rank0 + later} == {1}
    curriculum.update([1.0] * 8)
    curriculum.update([1.0] * 8)
    assert {r["level"] for r in curriculum.sample(4)} == {2}


def test_state_dict_round_trip_continues_sampling_where_it_stopped():
    curriculum = two_stage()
    curriculum.sample(3)
    curriculum.update([1.0, 0.0])
    restored = two_stage()
    restored.load_state_dict(json.loads(json.dumps(curriculum.state_dict())))
    assert restored.stage == curriculum.stage and restored.steps_in_stage == 1
    assert restored.rolling_accuracy == pytest.approx(0.5)
    assert restored.sample(2) == curriculum.sample(2)


def test_replay_mixes_passed_stages_in_and_only_the_current_stage_counts_for_promotion():
    """After a promotion, half of each step's problems come from the earlier stages in turn; their episodes are left
    out of the rolling accuracy that decides the next promotion."""
    stages = [Stage("arithmetic:level=1", 0.0, 1), Stage("arithmetic:level=2", 0.0, 1)]
    curriculum = Curriculum([*stages, Stage("arithmetic:level=3", 0.9, 1)], window=8, replay=0.5)
    first = curriculum.sample(4)
    assert [row[STAGE_COLUMN] for row in first] == [0, 0, 0, 0]  # nothing passed yet: nothing to replay
    assert curriculum.update([0.0] * 8, [0] * 8) and curriculum.update([0.0] * 8, [1] * 8)
    assert curriculum.stage == 2
    rows = curriculum.sample(4) + curriculum.sample(4)
    assert [row[STAGE_COLUMN] for row in rows] == [2, 2, 0, 1, 2, 2, 0, 1]
    questions = [row["question"] for row in first + rows]
    assert len(set(questions)) == len(questions)  # the replayed stages continue from their own cursors
    # replayed episodes all correct, current-stage episodes all wrong: no promotion (0.0 < 0.9)
    assert not curriculum.update([1.0] * 4 + [0.0] * 4, [0] * 4 + [2] * 4)
    assert curriculum.rolling_accuracy == 0.0
    restored = Curriculum(curriculum.stages, window=8, replay=0.5)
    restored.load_state_dict(json.loads(json.dumps(curriculum.state_dict())))
    assert [r["question"] for r in restored.sample(4)] == [r["question"] for r in curriculum.sample(4)]


def test_thresholds_must_match_stages():
    with pytest.raises(ValueError, match="one per stage"):
        Curriculum.from_lists(["arithmetic:level=1", "gsm8k"], [0.5, 0.6, 0.7])


def test_trainer_logs_stage_and_resume_continues_in_the_same_stage(make_tiny_model, tokenizer, tmp_path):
    def config(max_steps: int) -> StepwiseReinforceConfig:
        return StepwiseReinforceConfig(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            num_generations=2,
            max_step_tokens=4,
            max_episode_steps=1,
            n_few_shot=1,
            env_flavour="arithmetic",
            use_cpu=True,
            report_to=[],
            save_strategy="steps",
            save_steps=2,
            disable_tqdm=True,
            num_completions_to_print=0,
            kl_coef=0.0,
            log_rollouts=False,
            curriculum=["arithmetic:level=1", "arithmetic:level=2", "gsm8k"],
            curriculum_thresholds=[0.0],
            curriculum_min_steps=1,
        )

    few_shot = [
        {"question": "Ann has 2 pens and buys 3. How many?", "answer": "5", "solution": "2+3 = <<2+3=5>>5\n#### 5"}
    ]
    first = StepwiseReinforceTrainer(make_tiny_model(), config(2), processing_class=tokenizer)
    shot = first.prompt_builder.pool[0]  # no few-shot set given: solved examples of the first stage's few-shot split
    assert shot.steps[-1].startswith("The answer is:") and "<<" in shot.steps[0]
    first.train()
    stages = [h["curriculum/stage"] for h in first.state.log_history if "curriculum/stage" in h]
    assert stages == [0.0, 1.0]  # threshold 0, but promotion waits for 8 episodes in the rolling window
    saved = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())["curriculum"]
    assert saved["stage"] == 1 and saved["cursors"] == {"arithmetic:level=1": 4}

    second = StepwiseReinforceTrainer(
        make_tiny_model(), config(3), processing_class=tokenizer, few_shot_dataset=few_shot
    )
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.state.global_step == 3
    assert second.curriculum.stage == 1  # resumed in stage 1; one step (4 episodes) is too few to promote again
    assert second.curriculum.cursors == {"arithmetic:level=1": 4, "arithmetic:level=2": 2}


def test_arithmetic_env_draws_reproducible_problems_and_grades_their_reference():
    first, second = MathEnv("arithmetic", level=2, split="test"), MathEnv("arithmetic", level=2, split="test")
    (a, _), (b, _) = first.reset(), second.reset()
    assert a == b
    assert first.reset()[0] != a  # the next draw moves on
    assert MathEnv("arithmetic", level=2, split="test", start=1).reset()[0] == first.reset(seed=1)[0]
    env = MathEnv("arithmetic", level=1, split="test")
    _, info = env.reset()
    row = info["row"]
    for step in gsm8k_solution_to_steps(row["solution"].replace("The answer is: ", "#### ")):
        observation, reward, terminated, truncated, info = env.step(step)
        if terminated or truncated:
            break
    assert terminated and reward == 1.0 and info["end_reason"] == "answer"
