"""The environment driven by scripted policies (lists of step strings): no tokenizer, no model."""

from __future__ import annotations

import pytest

from trl_stepwise.envs import (
    FLAVOURS,
    EndReason,
    EnvBatch,
    Flavour,
    Segment,
    StepAction,
    StepwiseEnv,
    StepwiseMathEnv,
    register_flavour,
)

QUESTION = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell in total?"
ROW = {"question": QUESTION, "answer": "72", "solution": "48/2 = 24\n48 + 24 = 72"}
CORRECT = ["In May she sold 48/2 = 24 clips.\n", "In total 48 + 24 = 72 clips.\n", "The answer is: 72"]


def run(env: StepwiseMathEnv, steps: list[str], row: dict | None = None, **step_kwargs) -> list[tuple]:
    """Reset on `row` and feed the scripted steps; returns every (obs, reward, done, info)."""
    env.reset(**(row or ROW))
    return [env.step(text, **step_kwargs) for text in steps]


# -- end conditions --------------------------------------------------------------------------------------------------


def test_answer_ends_episode_and_is_graded():
    env = StepwiseMathEnv()
    results = run(env, CORRECT)
    assert [done for _, _, done, _ in results] == [False, False, True]
    obs, reward, done, info = results[-1]
    assert info["end_reason"] == EndReason.ANSWER == "answer"
    assert info["final_answer"] == "72"
    assert info["verdict"].correct
    assert reward == 1.0
    assert obs.done and obs.steps == CORRECT and obs.question == QUESTION
    episode = env.episode
    assert episode.done and episode.correct and episode.completion == "".join(CORRECT)
    assert episode.final_reward == 1.0 and episode.step_rewards == [0.0, 0.0, 0.0]
    assert episode.row["solution"] == ROW["solution"]


def test_eos_ends_episode_without_answer():
    env = StepwiseMathEnv()
    _, reward, done, info = run(env, ["She sold 24 in May.\n"], eos=True)[-1]
    assert done and info["end_reason"] == EndReason.EOS
    assert info["final_answer"] is None and not info["verdict"].correct
    assert reward == 0.0
    assert not env.episode.correct


def test_episode_not_graded_yet_is_not_correct():
    env = StepwiseMathEnv()
    env.reset(**ROW)
    env.step(CORRECT[0])
    assert env.episode.verdict is None and not env.episode.correct


def test_empty_step_with_eos_ends_with_eos():
    env = StepwiseMathEnv()
    env.reset(**ROW)
    env.step("In May she sold 24.\n", num_tokens=7)
    _, _, done, info = env.step("", eos=True, num_tokens=1)
    assert done and info["end_reason"] == EndReason.EOS
    assert env.episode.steps[-1].text == "" and env.episode.steps[-1].segments == []
    assert env.episode.completion == "In May she sold 24.\n"
    assert env.episode.num_tokens == 8


def test_max_steps_ends_episode():
    env = StepwiseMathEnv(max_steps=3)
    results = run(env, ["Step one.\n", "Step two.\n", "Step three.\n"])
    assert [done for _, _, done, _ in results] == [False, False, True]
    assert results[-1][3]["end_reason"] == EndReason.MAX_STEPS
    assert [info["end_reason"] for _, _, _, info in results[:-1]] == [None, None]


def test_flavour_default_max_steps():
    assert StepwiseMathEnv().max_steps == 10
    assert StepwiseMathEnv(flavour="math").max_steps == 15
    env = StepwiseMathEnv()
    results = run(env, ["More thinking.\n"] * 10)
    assert [done for _, _, done, _ in results] == [False] * 9 + [True]


def test_token_budget_reached_or_exceeded():
    env = StepwiseMathEnv(max_episode_tokens=10)
    env.reset(**ROW)
    assert not env.step("a\n", num_tokens=4)[2]
    assert not env.step("b\n", num_tokens=5)[2]
    _, _, done, info = env.step("c\n", num_tokens=1)  # exactly the budget
    assert done and info["end_reason"] == EndReason.TOKEN_BUDGET and info["num_tokens"] == 10

    env.reset(**ROW)
    _, _, done, info = env.step("a\n", num_tokens=25)  # one step over
    assert done and info["end_reason"] == EndReason.TOKEN_BUDGET


def test_steps_without_num_tokens_never_exhaust_budget():
    env = StepwiseMathEnv(max_episode_tokens=1, max_steps=2)
    results = run(env, ["a\n", "b\n"])
    assert results[-1][3]["end_reason"] == EndReason.MAX_STEPS


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("The answer is: 72", {"eos": True, "num_tokens": 50}, EndReason.ANSWER),  # answer beats everything
        ("Thinking.\n", {"eos": True, "num_tokens": 50}, EndReason.EOS),  # eos beats token budget and max steps
        ("Thinking.\n", {"num_tokens": 50}, EndReason.TOKEN_BUDGET),  # token budget beats max steps
        ("Thinking.\n", {"num_tokens": 1}, EndReason.MAX_STEPS),
    ],
)
def test_end_reason_priority(text, kwargs, expected):
    env = StepwiseMathEnv(max_steps=1, max_episode_tokens=10)
    env.reset(**ROW)
    _, _, done, info = env.step(text, **kwargs)
    assert done and info["end_reason"] == expected and env.episode.end_reason == expected


def test_step_after_done_raises():
    env = StepwiseMathEnv()
    run(env, ["The answer is: 72"])
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step("More.\n")
    assert len(env.episode.steps) == 1
    env.reset(**ROW)  # a reset starts a fresh episode
    assert not env.done and env.episode.steps == []


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match="reset"):
        StepwiseMathEnv().step("Hello.\n")


def test_custom_answer_patterns():
    env = StepwiseMathEnv(answer_patterns=[r"\\boxed\{"])
    assert not run(env, ["The answer is: 72\n"])[-1][2]  # the default pattern is replaced, not extended
    _, reward, done, info = run(env, ["Total: \\boxed{72}"])[-1]
    assert done and info["end_reason"] == EndReason.ANSWER and reward == 1.0


# -- rewards ---------------------------------------------------------------------------------------------------------


def test_wrong_answer_gets_zero():
    env = StepwiseMathEnv()
    _, reward, done, info = run(env, ["In May she sold 48*2 = 96.\n", "The answer is: 144"])[-1]
    assert done and info["final_answer"] == "144" and not info["verdict"].correct
    assert reward == 0.0 and info["reward_components"]["correctness_reward"] == 0.0


def test_format_reward_weight():
    env = StepwiseMathEnv(format_reward_weight=0.5)
    assert run(env, CORRECT)[-1][1] == pytest.approx(1.5)
    _, reward, _, info = run(env, ["The answer is: 144"])[-1]
    assert reward == pytest.approx(0.5) and info["reward_components"]["format_reward"] == 1.0
    _, reward, _, info = run(env, ["I give up."], eos=True)[-1]
    assert reward == 0.0 and info["reward_components"]["format_reward"] == 0.0


def test_step_penalty_scales_with_number_of_steps():
    env = StepwiseMathEnv(step_penalty=0.1)
    _, reward, _, info = run(env, CORRECT)[-1]
    assert reward == pytest.approx(1.0 - 0.3)
    assert info["reward_components"]["step_penalty"] == pytest.approx(-0.3)
    assert run(env, ["The answer is: 72"])[-1][1] == pytest.approx(0.9)


def test_user_reward_function_with_weight_gets_trl_columns():
    calls = []

    def short_reward(completions, prompts, answer, solution, **kwargs):
        calls.append({"completions": completions, "prompts": prompts, "answer": answer, "solution": solution})
        return [1.0 if len(c) < 100 else 0.0 for c in completions]

    env = StepwiseMathEnv(reward_funcs=[short_reward], reward_weights=[2.0])
    _, reward, _, info = run(env, CORRECT)[-1]
    assert reward == pytest.approx(1.0 + 2.0)
    assert info["reward_components"]["short_reward"] == 1.0
    assert calls == [
        {"completions": ["".join(CORRECT)], "prompts": [QUESTION], "answer": ["72"], "solution": [ROW["solution"]]}
    ]


def test_user_reward_none_counts_as_zero():
    def not_applicable(completions, **kwargs):
        return [None for _ in completions]

    env = StepwiseMathEnv(reward_funcs=[not_applicable], reward_weights=[5.0])
    _, reward, _, info = run(env, CORRECT)[-1]
    assert reward == 1.0
    assert "not_applicable" not in info["reward_components"]


def test_user_reward_name_clash_keeps_both_components():
    def correctness_reward(completions, **kwargs):
        return [0.25 for _ in completions]

    env = StepwiseMathEnv(reward_funcs=[correctness_reward])
    _, reward, _, info = run(env, CORRECT)[-1]
    assert reward == pytest.approx(1.25)
    assert info["reward_components"]["correctness_reward"] == 1.0
    assert info["reward_components"]["correctness_reward_2"] == 0.25


def test_mismatched_reward_weights_rejected():
    with pytest.raises(ValueError, match="reward_weights"):
        StepwiseMathEnv(reward_funcs=[lambda completions, **kw: [0.0]], reward_weights=[1.0, 2.0])


def test_step_reward_fn_is_stored_and_returned():
    seen = []

    def step_reward(question, steps_so_far, step_text):
        seen.append((question, list(steps_so_far), step_text))
        return 0.1 * (len(steps_so_far) + 1)

    env = StepwiseMathEnv(step_reward_fn=step_reward)
    results = run(env, CORRECT)
    assert [r for _, r, _, _ in results] == pytest.approx([0.1, 0.2, 0.3 + 1.0])
    assert env.episode.step_rewards == pytest.approx([0.1, 0.2, 0.3])
    assert env.episode.final_reward == 1.0
    assert seen[2] == (QUESTION, CORRECT[:2], CORRECT[2])


# -- flavours and formatting -----------------------------------------------------------------------------------------


def test_math_flavour_boxed_answer():
    env = StepwiseMathEnv(flavour="math")
    row = {"question": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"}
    results = run(env, ["Common denominator: 2/4 + 1/4.\n", "So the sum is $\\boxed{\\frac{3}{4}}$."], row=row)
    _, reward, done, info = results[-1]
    assert done and info["end_reason"] == EndReason.ANSWER
    assert info["verdict"].correct and reward == 1.0
    assert not env.calculator


def test_math_flavour_also_accepts_answer_is():
    env = StepwiseMathEnv(flavour="math")
    _, reward, done, _ = run(env, ["The answer is: 72"])[-1]
    assert done and reward == 1.0


def test_unknown_flavour_rejected():
    with pytest.raises(ValueError, match="unknown flavour"):
        StepwiseMathEnv(flavour="chess")


def test_register_flavour():
    flavour = Flavour("test-arith", answer_patterns=FLAVOURS["gsm8k"].answer_patterns, max_steps=4, calculator=True)
    register_flavour(flavour)
    try:
        env = StepwiseMathEnv(flavour="test-arith")
        assert env.max_steps == 4 and env.calculator
        with pytest.raises(ValueError, match="already registered"):
            register_flavour(flavour)
    finally:
        FLAVOURS.pop("test-arith")


def test_custom_step_delimiter():
    env = StepwiseMathEnv(step_delimiter="\n\n")
    assert env.step_delimiter == "\n\n"
    env.reset(**ROW)
    _, _, _, info = env.step("In May 48/2 = 24.\n\n")
    assert not info["step_truncated"]
    _, _, _, info = env.step("Total 72.\n")  # a single newline does not close a "\n\n" step
    assert info["step_truncated"]
    obs, reward, done, info = env.step("The answer is: 72")
    assert done and reward == 1.0 and not info["step_truncated"]  # the final step needs no delimiter
    assert obs.steps == ["In May 48/2 = 24.\n\n", "Total 72.\n", "The answer is: 72"]  # recorded verbatim
    assert env.episode.completion == "In May 48/2 = 24.\n\nTotal 72.\nThe answer is: 72"
    assert env.episode.steps[1].segments == [Segment("Total 72.\n", True)]


def test_default_delimiter_flags_cut_steps():
    env = StepwiseMathEnv()
    results = run(env, ["Half of 48 is 24.\n", "In total 48 + 24 = 7"])
    assert [info["step_truncated"] for _, _, _, info in results] == [False, True]


@pytest.mark.parametrize(
    ("flavour", "text", "ends", "final_answer"),
    [
        ("gsm8k", "So the final answer is 72.", True, "72"),
        ("gsm8k", "THE ANSWER IS: 72", True, "72"),
        ("gsm8k", "Now the answer is:\n", False, None),
        ("gsm8k", "So \\boxed{72}.\n", False, None),
        ("math", "So \\boxed{72}.", True, "72"),
        ("math", "So \\fbox{72}.", True, "72"),
        ("math", "Let us compute the boxed value.\n", False, None),
    ],
)
def test_answer_detection_agrees_with_extraction(flavour, text, ends, final_answer):
    env = StepwiseMathEnv(flavour=flavour, max_steps=2)
    _, _, done, info = run(env, [text])[-1]
    assert done is ends
    if ends:
        assert info["end_reason"] == EndReason.ANSWER and info["final_answer"] == final_answer
        assert info["verdict"].correct


def test_segments_must_match_step_text():
    env = StepwiseMathEnv()
    env.reset(**ROW)
    with pytest.raises(ValueError, match="segments"):
        env.step("48/2 = 24\n", segments=[Segment("48/2 = ", True), Segment("25\n", True)])
    segments = [Segment("48/2 = <<48/2=", True), Segment("24>>24", False), Segment("\n", True)]
    env.step("48/2 = <<48/2=24>>24\n", segments=segments)
    assert env.episode.steps[0].segments == segments


def test_env_satisfies_protocol():
    env = StepwiseMathEnv()
    env.reset(**ROW)
    assert isinstance(env, StepwiseEnv)


# -- calculator ------------------------------------------------------------------------------------------------------


def test_calculator_insert_counts_calls_and_errors():
    env = StepwiseMathEnv()
    env.reset(**ROW)
    assert env.calculator_insert("In May she sold 48/2 = <<48/2=") == "24>>24"
    assert env.calculator_insert("In May she sold 24 clips.") is None  # nothing pending: not a call
    assert env.calculator_insert("Then <<48+*=") is None  # malformed: a call and an error
    _, _, _, info = env.step("In May she sold 48/2 = <<48/2=24>>24 clips.\n")
    assert (info["calc_calls"], info["calc_errors"]) == (2, 1)
    assert (env.episode.steps[0].calc_calls, env.episode.steps[0].calc_errors) == (2, 1)

    _, _, _, info = env.step("Total 72.\n")  # counters are per step
    assert (info["calc_calls"], info["calc_errors"]) == (0, 0)


def test_calculator_off_inserts_nothing():
    env = StepwiseMathEnv(flavour="math")
    env.reset(**ROW)
    assert env.calculator_insert("48/2 = <<48/2=") is None
    _, _, _, info = env.step("48/2 = 24\n")
    assert info["calc_calls"] == 0
    on = StepwiseMathEnv(flavour="math", calculator=True)
    on.reset(**ROW)
    assert on.calculator_insert("<<48/2=") == "24>>24"


def test_calculator_insert_after_done_raises():
    env = StepwiseMathEnv()
    run(env, ["The answer is: 72"])
    with pytest.raises(RuntimeError, match="finished"):
        env.calculator_insert("<<1+1=")


# -- batch -----------------------------------------------------------------------------------------------------------


def _rows(n: int) -> list[dict]:
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "id": f"q{i}"} for i in range(n)]


def test_batch_mixed_finish_times():
    rows = _rows(3)
    scripts = {
        0: ["The answer is: 0"],
        1: ["1 + 1\n", "= 2\n", "The answer is: 2"],
        2: ["2 + 2 = 4\n", "The answer is: 5"],
    }
    batch = EnvBatch(lambda: StepwiseMathEnv(), rows, group_ids=[7, 7, 8])
    first = batch.episodes()
    assert batch.active() == [0, 1, 2] and not batch.done

    active_history = []
    turn = 0
    while not batch.done:
        observations = batch.observations()
        assert sorted(observations) == batch.active()
        results = batch.step({i: StepAction(scripts[i][turn], num_tokens=3) for i in observations})
        assert sorted(results) == sorted(observations)
        active_history.append(batch.active())
        turn += 1

    assert active_history == [[1, 2], [1], []]
    episodes = batch.episodes()
    assert all(a is b for a, b in zip(first, episodes, strict=True))
    assert [e.episode_id for e in episodes] == [0, 1, 2]
    assert [e.group_id for e in episodes] == [7, 7, 8]
    assert [e.row["id"] for e in episodes] == ["q0", "q1", "q2"]
    assert [len(e.steps) for e in episodes] == [1, 3, 2]
    assert [e.verdict.correct for e in episodes] == [True, True, False]
    assert [e.final_reward for e in episodes] == [1.0, 1.0, 0.0]
    assert [e.num_tokens for e in episodes] == [3, 9, 6]


def test_batch_rejects_finished_and_unknown_indices_atomically():
    batch = EnvBatch(StepwiseMathEnv, _rows(2))
    batch.step({0: StepAction("The answer is: 0")})
    assert batch.active() == [1]
    with pytest.raises(RuntimeError, match=r"episodes \[0\] are finished"):
        batch.step({0: StepAction("more\n"), 1: StepAction("1 + 1 = 2\n")})
    assert batch.episodes()[1].steps == []  # nothing was stepped
    with pytest.raises(IndexError, match="out of range"):
        batch.step({5: StepAction("x\n")})
    with pytest.raises(RuntimeError, match="finished"):
        batch.calculator_insert(0, "<<1+1=")


def test_batch_step_subset_and_eos():
    batch = EnvBatch(StepwiseMathEnv, _rows(3))
    results = batch.step({2: StepAction("", eos=True, num_tokens=1)})
    assert list(results) == [2] and results[2][3]["end_reason"] == EndReason.EOS
    assert batch.active() == [0, 1]
    assert list(batch.observations()) == [0, 1]


def test_batch_calculator_insert():
    batch = EnvBatch(StepwiseMathEnv, _rows(2))
    assert batch.calculator_insert(1, "<<3*4=") == "12>>12"
    results = batch.step({0: StepAction("a\n"), 1: StepAction("3*4 = <<3*4=12>>12\n")})
    assert results[1][3]["calc_calls"] == 1 and results[0][3]["calc_calls"] == 0


def test_batch_requires_fresh_env_per_row():
    env = StepwiseMathEnv()
    with pytest.raises(ValueError, match="new environment"):
        EnvBatch(lambda: env, _rows(2))
    with pytest.raises(ValueError, match="group_ids"):
        EnvBatch(StepwiseMathEnv, _rows(2), group_ids=[0])
