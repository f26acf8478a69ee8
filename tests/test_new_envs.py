"""Countdown and math-with-feedback, driven by scripted policies (no model), plus their token-level rollouts."""

from __future__ import annotations

import pytest
from scripted_engine import ScriptedEngine

from trl_stepwise.countdown import check_countdown, generate_countdown
from trl_stepwise.data import load_math_dataset
from trl_stepwise.engines import StopPolicy
from trl_stepwise.envs import EndReason, make, play_scripted
from trl_stepwise.envs.feedback import FEEDBACK
from trl_stepwise.prompting import PromptBuilder, solution_to_steps
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

COUNTDOWN_ROW = {"numbers": [3, 7, 25], "target": 46}
WORD_ROW = {"question": "Ann has 4 pens and buys 5 more. How many pens?", "answer": "9"}


# -- countdown ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "correct", "reason"),
    [
        ("25+3*7", True, "equal"),
        ("(25 + 3 * 7).", True, "equal"),
        ("25+7*3", True, "equal"),
        ("25+25-4", False, "not_a_given_number"),  # 25 twice, 4 not given
        ("7*7-3", False, "not_a_given_number"),
        ("25+3+7", False, "wrong_value"),
        ("25/0+3", False, "not_a_given_number"),
        ("3.5*7", False, "not_a_given_number"),
        ("25+3*x", False, "syntax"),
        ("", False, "no_answer"),
    ],
)
def test_countdown_verifier_is_exact(expression, correct, reason):
    assert check_countdown(expression, [3, 7, 25], 46) == (correct, reason)


def test_countdown_generator_is_seeded_solvable_and_splits_are_disjoint():
    assert generate_countdown(17) == generate_countdown(17)
    rows = [generate_countdown(seed) for seed in range(200)]
    for row in rows:
        expression = row["solution"].rsplit("#### ", 1)[1]
        assert check_countdown(expression, row["numbers"], row["target"]) == (True, "equal"), row
    train = {r["question"] for r in load_math_dataset("countdown:n=50", split="train")}
    test = load_math_dataset("countdown:n=50", split="test")
    assert not train & set(test["question"]) and set(test["env"]) == {"countdown"}


def test_countdown_scripted_policies():
    solved = play_scripted(
        lambda: make("countdown"), COUNTDOWN_ROW, ["3*7 = 21\n", "21+25 = 46\n", "The answer is: 3*7+25\n"]
    )
    episode = solved.episode
    assert episode.end_reason == EndReason.ANSWER and episode.verdict.correct and episode.final_reward == 1.0
    assert episode.final_answer == "3*7+25" and "46" in episode.row["question"]
    wrong = play_scripted(lambda: make("countdown"), COUNTDOWN_ROW, ["The answer is: 25+7+3\n"]).episode
    assert wrong.end_reason == EndReason.ANSWER and not wrong.verdict.correct and wrong.final_reward == 0.0
    rambling = play_scripted(lambda: make("countdown", max_steps=2), COUNTDOWN_ROW, ["Hmm.\n"] * 3).episode
    assert rambling.end_reason == EndReason.MAX_STEPS and rambling.final_reward == 0.0
    # a generated problem's worked solution (the few-shot format) solves it
    row = generate_countdown(5)
    gold = play_scripted(lambda: make("countdown"), row, solution_to_steps(row, "gsm8k")).episode
    assert gold.verdict.correct


def test_countdown_seeded_reset_without_a_row():
    a, b = make("countdown"), make("countdown")
    assert a.reset(seed=3) == b.reset(seed=3)
    assert a.reset(seed=4)[0] != b.reset(seed=3)[0]


# -- math with feedback ---------------------------------------------------------------------------------------------


def test_feedback_after_a_wrong_answer_and_a_discounted_reward():
    steps = ["4+5 = 8\n", "The answer is: 8\n", "4+5 = 9\n", "The answer is: 9\n"]
    episode = play_scripted(lambda: make("math_feedback", discount=0.5), WORD_ROW, steps).episode
    assert episode.end_reason == EndReason.ANSWER and episode.verdict.correct
    assert episode.final_reward == 0.5  # one wrong attempt
    assert episode.completion == "4+5 = 8\nThe answer is: 8\n" + FEEDBACK + "4+5 = 9\nThe answer is: 9\n"
    assert [s.from_policy for s in episode.steps[1].segments] == [True, False]
    first_try = play_scripted(lambda: make("math_feedback"), WORD_ROW, ["The answer is: 9\n"]).episode
    assert first_try.final_reward == 1.0


def test_feedback_gives_up_after_max_retries():
    steps = ["The answer is: 1\n", "The answer is: 2\n", "The answer is: 3\n"]
    episode = play_scripted(lambda: make("math_feedback", max_retries=1), WORD_ROW, steps).episode
    assert episode.end_reason == EndReason.ANSWER and not episode.verdict.correct and episode.final_reward == 0.0
    assert len(episode.steps) == 2 and episode.completion.count(FEEDBACK) == 1


def test_feedback_env_draws_generated_problems_by_seed():
    a, b = make("math_feedback", level=2), make("math_feedback", level=2)
    assert a.reset(seed=7) == b.reset(seed=7) and a.answer == b.answer


@pytest.mark.parametrize("stop_policy", list(StopPolicy))
def test_feedback_reply_is_masked_and_the_retry_follows_it(tokenizer, stop_policy):
    script = tokenizer("The answer is: 8\nThe answer is: 9\n", add_special_tokens=False)["input_ids"]
    engine = ScriptedEngine(tokenizer, script, stop_policy)
    builder = PromptBuilder(tokenizer, [WORD_ROW | {"solution": "4+5 = 9\n#### 9"}], k=0)
    rollout = StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=30), engine=engine)
    (trajectory,) = rollout.run(lambda: make("math_feedback"), [WORD_ROW])
    assert tokenizer.decode(trajectory.completion_ids) == "The answer is: 8\n" + FEEDBACK + "The answer is: 9\n"
    forced = [t for t, p in zip(trajectory.completion_ids, trajectory.policy_mask, strict=True) if not p]
    assert tokenizer.decode(forced) == FEEDBACK
    assert trajectory.episode.final_reward == 0.5 and trajectory.episode.verdict.correct
