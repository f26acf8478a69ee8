"""The math environment driven by scripted policies (lists of step strings): no tokenizer, no model.

``MathEnv`` is stepped directly (``reset(options=row)``, 5-tuple ``step`` of a ``StepText`` action) where the test is
about what the environment returns, and through an ``EnvSession`` (as the rollout loop plays it) where it is about
the recorded episode: steps, tool calls, the split of per-step and final rewards.
"""

from __future__ import annotations

import pytest

from trl_stepwise.envs import (
    FLAVOURS,
    CalculatorTool,
    EndReason,
    Env,
    EnvSession,
    Flavour,
    MathEnv,
    Segment,
    StepText,
    make,
    make_limited,
    play_scripted,
    register_flavour,
)

QUESTION = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell in total?"
ROW = {"question": QUESTION, "answer": "72", "solution": "48/2 = 24\n48 + 24 = 72"}
CORRECT = ["In May she sold 48/2 = 24 clips.\n", "In total 48 + 24 = 72 clips.\n", "The answer is: 72"]


def run(env: MathEnv, steps: list[str], row: dict | None = None, **action) -> list[tuple]:
    """Reset on ``row`` and feed the scripted steps; returns every (observation, reward, terminated, truncated,
    info). ``action`` (``eos``, ``num_tokens``, ``segments``) is attached to every step."""
    env.reset(options=row or ROW)
    return [env.step(StepText(text, **action)) for text in steps]


def done(result: tuple) -> bool:
    return result[2] or result[3]


def session(env: MathEnv, row: dict | None = None) -> EnvSession:
    return EnvSession(env, row or ROW)


# -- end conditions --------------------------------------------------------------------------------------------------


def test_answer_ends_episode_and_is_graded():
    env = MathEnv()
    results = run(env, CORRECT)
    assert [done(r) for r in results] == [False, False, True]
    obs, reward, terminated, truncated, info = results[-1]
    assert terminated and not truncated  # only a final answer terminates; the other ends truncate
    assert info["end_reason"] == EndReason.ANSWER == "answer"
    assert info["final_answer"] == "72"
    assert info["verdict"].correct and info["correct"]
    assert reward == 1.0
    assert all(r[0] == "" for r in results)  # the math environment never replies
    episode = play_scripted(MathEnv, ROW, CORRECT).episode
    assert episode.done and episode.correct and episode.completion == "".join(CORRECT)
    assert [s.text for s in episode.steps] == CORRECT and episode.row["question"] == QUESTION
    assert episode.final_reward == 1.0 and episode.step_rewards == [0.0, 0.0, 0.0]
    assert episode.row["solution"] == ROW["solution"]


def test_eos_ends_episode_without_answer():
    env = MathEnv()
    _, reward, terminated, truncated, info = run(env, ["She sold 24 in May.\n"], eos=True)[-1]
    assert truncated and not terminated and info["end_reason"] == EndReason.EOS
    assert info["final_answer"] is None and not info["verdict"].correct and not info["correct"]
    assert reward == 0.0
    played = session(MathEnv())
    assert played.step("She sold 24 in May.\n", eos=True) == ("", True)
    assert played.episode.end_reason == EndReason.EOS and not played.episode.correct


def test_episode_not_graded_yet_is_not_correct():
    played = session(MathEnv())
    played.step(CORRECT[0])
    assert played.episode.verdict is None and not played.episode.correct
    env = MathEnv()
    env.reset(options=ROW)
    _, _, _, _, info = env.step(CORRECT[0])
    assert info["end_reason"] is None and info["verdict"] is None and "correct" not in info


def test_empty_step_with_eos_ends_with_eos():
    played = session(MathEnv())
    played.step("In May she sold 24.\n", num_tokens=7)
    reply, finished = played.step("", eos=True, num_tokens=1)
    assert finished and reply == "" and played.episode.end_reason == EndReason.EOS
    assert played.episode.steps[-1].text == "" and played.episode.steps[-1].segments == []
    assert played.episode.completion == "In May she sold 24.\n"
    assert played.episode.num_tokens == 8
    env = MathEnv()
    env.reset(options=ROW)
    env.step(StepText("In May she sold 24.\n", num_tokens=7))
    _, _, _, truncated, info = env.step(StepText("", eos=True, num_tokens=1))
    assert truncated and info["end_reason"] == EndReason.EOS and info["num_tokens"] == 8


def test_max_steps_ends_episode():
    env = MathEnv(max_steps=3)
    results = run(env, ["Step one.\n", "Step two.\n", "Step three.\n"])
    assert [done(r) for r in results] == [False, False, True]
    assert results[-1][4]["end_reason"] == EndReason.MAX_STEPS and results[-1][3]  # truncated
    assert [r[4]["end_reason"] for r in results[:-1]] == [None, None]


def test_flavour_default_max_steps():
    assert MathEnv().max_steps == 10
    assert MathEnv(flavour="math").max_steps == 15
    assert MathEnv(flavour="arithmetic").max_steps == 6
    env = MathEnv()
    results = run(env, ["More thinking.\n"] * 10)
    assert [done(r) for r in results] == [False] * 9 + [True]


def test_token_budget_reached_or_exceeded():
    env = MathEnv(max_episode_tokens=10)
    env.reset(options=ROW)
    assert not done(env.step(StepText("a\n", num_tokens=4)))
    assert not done(env.step(StepText("b\n", num_tokens=5)))
    result = env.step(StepText("c\n", num_tokens=1))  # exactly the budget
    assert done(result) and result[4]["end_reason"] == EndReason.TOKEN_BUDGET and result[4]["num_tokens"] == 10

    env.reset(options=ROW)
    result = env.step(StepText("a\n", num_tokens=25))  # one step over
    assert done(result) and result[4]["end_reason"] == EndReason.TOKEN_BUDGET


def test_steps_without_num_tokens_never_exhaust_budget():
    env = MathEnv(max_episode_tokens=1, max_steps=2)
    results = run(env, ["a\n", "b\n"])  # a plain string action carries no token count
    assert results[-1][4]["end_reason"] == EndReason.MAX_STEPS


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
    env = MathEnv(max_steps=1, max_episode_tokens=10)
    env.reset(options=ROW)
    result = env.step(StepText(text, **kwargs))
    assert done(result) and result[4]["end_reason"] == expected
    played = session(MathEnv(max_steps=1, max_episode_tokens=10))
    assert played.step(text, **kwargs)[1] and played.episode.end_reason == expected


def test_step_after_done_raises():
    env = MathEnv()
    run(env, ["The answer is: 72"])
    with pytest.raises(RuntimeError, match=r"finished episode \(end_reason=answer\)"):
        env.step("More.\n")
    env.reset(options=ROW)  # a reset starts a fresh episode
    assert env.step("Step.\n")[4]["num_steps"] == 1
    played = session(MathEnv())
    played.step("The answer is: 72")
    with pytest.raises(RuntimeError, match="finished episode"):
        played.step("More.\n")
    assert len(played.episode.steps) == 1


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match="reset"):
        MathEnv().step("Hello.\n")


def test_reset_needs_a_question_and_an_answer():
    with pytest.raises(ValueError, match="options"):
        MathEnv().reset()  # only the arithmetic flavour draws its own problems
    with pytest.raises(ValueError, match="without an answer"):
        MathEnv().reset(options={"question": QUESTION})
    question, info = MathEnv().reset(options=ROW)
    assert question == QUESTION and info["answer"] == "72" and info["row"] == ROW


def test_custom_answer_patterns():
    env = MathEnv(answer_patterns=[r"\\boxed\{"])
    assert not done(run(env, ["The answer is: 72\n"])[-1])  # the default pattern is replaced, not extended
    _, reward, terminated, _, info = run(env, ["Total: \\boxed{72}"])[-1]
    assert terminated and info["end_reason"] == EndReason.ANSWER and reward == 1.0


# -- rewards ---------------------------------------------------------------------------------------------------------


def test_wrong_answer_gets_zero():
    env = MathEnv()
    _, reward, terminated, _, info = run(env, ["In May she sold 48*2 = 96.\n", "The answer is: 144"])[-1]
    assert terminated and info["final_answer"] == "144" and not info["verdict"].correct
    assert reward == 0.0 and info["reward_components"]["correctness_reward"] == 0.0


def test_format_reward_weight():
    env = MathEnv(format_reward_weight=0.5)
    assert run(env, CORRECT)[-1][1] == pytest.approx(1.5)
    _, reward, _, _, info = run(env, ["The answer is: 144"])[-1]
    assert reward == pytest.approx(0.5) and info["reward_components"]["format_reward"] == 1.0
    _, reward, _, _, info = run(env, ["I give up."], eos=True)[-1]
    assert reward == 0.0 and info["reward_components"]["format_reward"] == 0.0


def test_step_penalty_scales_with_number_of_steps():
    env = MathEnv(step_penalty=0.1)
    _, reward, _, _, info = run(env, CORRECT)[-1]
    assert reward == pytest.approx(1.0 - 0.3)
    assert info["reward_components"]["step_penalty"] == pytest.approx(-0.3)
    assert run(env, ["The answer is: 72"])[-1][1] == pytest.approx(0.9)


def test_user_reward_function_with_weight_gets_trl_columns():
    calls = []

    def short_reward(completions, prompts, answer, solution, **kwargs):
        calls.append({"completions": completions, "prompts": prompts, "answer": answer, "solution": solution})
        return [1.0 if len(c) < 100 else 0.0 for c in completions]

    env = MathEnv(reward_funcs=[short_reward], reward_weights=[2.0])
    _, reward, _, _, info = run(env, CORRECT)[-1]
    assert reward == pytest.approx(1.0 + 2.0)
    assert info["reward_components"]["short_reward"] == 1.0
    assert calls == [
        {"completions": ["".join(CORRECT)], "prompts": [QUESTION], "answer": ["72"], "solution": [ROW["solution"]]}
    ]
    episode = play_scripted(lambda: MathEnv(reward_funcs=[short_reward], reward_weights=[2.0]), ROW, CORRECT).episode
    assert episode.final_reward == pytest.approx(3.0) and episode.reward_components["short_reward"] == 1.0


def test_user_reward_none_counts_as_zero():
    def not_applicable(completions, **kwargs):
        return [None for _ in completions]

    env = MathEnv(reward_funcs=[not_applicable], reward_weights=[5.0])
    _, reward, _, _, info = run(env, CORRECT)[-1]
    assert reward == 1.0
    assert "not_applicable" not in info["reward_components"]


def test_user_reward_name_clash_keeps_both_components():
    def correctness_reward(completions, **kwargs):
        return [0.25 for _ in completions]

    env = MathEnv(reward_funcs=[correctness_reward])
    _, reward, _, _, info = run(env, CORRECT)[-1]
    assert reward == pytest.approx(1.25)
    assert info["reward_components"]["correctness_reward"] == 1.0
    assert info["reward_components"]["correctness_reward_2"] == 0.25


def test_mismatched_reward_weights_rejected():
    with pytest.raises(ValueError, match="reward_weights"):
        MathEnv(reward_funcs=[lambda completions, **kw: [0.0]], reward_weights=[1.0, 2.0])


def test_step_reward_fn_is_stored_and_returned():
    seen = []

    def step_reward(question, steps_so_far, step_text):
        seen.append((question, list(steps_so_far), step_text))
        return 0.1 * (len(steps_so_far) + 1)

    env = MathEnv(step_reward_fn=step_reward)
    results = run(env, CORRECT)
    assert [r[1] for r in results] == pytest.approx([0.1, 0.2, 0.3 + 1.0])
    assert [r[4]["step_reward"] for r in results] == pytest.approx([0.1, 0.2, 0.3])
    assert results[-1][4]["final_reward"] == 1.0
    assert seen[2] == (QUESTION, CORRECT[:2], CORRECT[2])
    episode = play_scripted(lambda: MathEnv(step_reward_fn=step_reward), ROW, CORRECT).episode
    assert episode.step_rewards == pytest.approx([0.1, 0.2, 0.3])  # the session keeps the two parts apart
    assert episode.final_reward == 1.0


# -- flavours and formatting -----------------------------------------------------------------------------------------


def test_math_flavour_boxed_answer():
    env = MathEnv(flavour="math")
    row = {"question": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"}
    results = run(env, ["Common denominator: 2/4 + 1/4.\n", "So the sum is $\\boxed{\\frac{3}{4}}$."], row=row)
    _, reward, terminated, _, info = results[-1]
    assert terminated and info["end_reason"] == EndReason.ANSWER
    assert info["verdict"].correct and reward == 1.0
    assert not env.calculator and env.tools == ()


def test_math_flavour_also_accepts_answer_is():
    env = MathEnv(flavour="math")
    _, reward, terminated, _, _ = run(env, ["The answer is: 72"])[-1]
    assert terminated and reward == 1.0


def test_unknown_flavour_rejected():
    with pytest.raises(ValueError, match="unknown flavour"):
        MathEnv(flavour="chess")


def test_register_flavour():
    flavour = Flavour("test-arith", answer_patterns=FLAVOURS["gsm8k"].answer_patterns, max_steps=4, calculator=True)
    register_flavour(flavour)
    try:
        env = MathEnv(flavour="test-arith")
        assert env.max_steps == 4 and env.calculator
        assert [type(t) for t in env.tools] == [CalculatorTool]
        with pytest.raises(ValueError, match="already registered"):
            register_flavour(flavour)
    finally:
        FLAVOURS.pop("test-arith")


def test_registered_flavour_is_accepted_by_prompts_and_config():
    """One registry: a flavour registered once is known to the environment, the prompts and the trainer config."""
    from trl_stepwise.prompting import PromptBuilder, load_system_prompt, solution_to_steps
    from trl_stepwise.trainer import StepwiseReinforceConfig

    register_flavour(
        Flavour(
            "test-latex",
            answer_patterns=FLAVOURS["math"].answer_patterns,
            max_steps=5,
            calculator=False,
            system_prompt="math",
            solution_format="latex",
        )
    )
    try:
        assert load_system_prompt(None, "test-latex") == load_system_prompt(None, "math")
        row = {"question": "What is 1 + 1?", "answer": "2", "solution": "We add: $1 + 1 = \\boxed{2}$."}
        assert solution_to_steps(row, "test-latex") == solution_to_steps(row, "math")
        builder = PromptBuilder(None, [row], k=1, flavour="test-latex")
        assert builder.pool[0].steps == solution_to_steps(row, "math")
        config = StepwiseReinforceConfig(output_dir="unused", use_cpu=True, report_to=[], env_flavour="test-latex")
        assert config.env_flavour == "test-latex"
        with pytest.raises(ValueError, match="env_flavour='chess'"):
            StepwiseReinforceConfig(output_dir="unused", use_cpu=True, report_to=[], env_flavour="chess")
    finally:
        FLAVOURS.pop("test-latex")


def test_custom_step_delimiter():
    env = MathEnv(step_delimiter="\n\n")
    assert env.step_delimiter == "\n\n"
    env.reset(options=ROW)
    assert not env.step("In May 48/2 = 24.\n\n")[4]["step_truncated"]
    assert env.step("Total 72.\n")[4]["step_truncated"]  # a single newline does not close a "\n\n" step
    _, reward, terminated, _, info = env.step("The answer is: 72")
    assert terminated and reward == 1.0 and not info["step_truncated"]  # the final step needs no delimiter
    steps = ["In May 48/2 = 24.\n\n", "Total 72.\n", "The answer is: 72"]
    episode = play_scripted(lambda: MathEnv(step_delimiter="\n\n"), ROW, steps).episode
    assert [s.text for s in episode.steps] == steps  # recorded verbatim
    assert episode.completion == "In May 48/2 = 24.\n\nTotal 72.\nThe answer is: 72"
    assert episode.steps[1].segments == [Segment("Total 72.\n", True)]


def test_default_delimiter_flags_cut_steps():
    env = MathEnv()
    results = run(env, ["Half of 48 is 24.\n", "In total 48 + 24 = 7"])
    assert [r[4]["step_truncated"] for r in results] == [False, True]


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
    env = MathEnv(flavour=flavour, max_steps=2)
    _, _, terminated, truncated, info = run(env, [text])[-1]
    assert terminated is ends and not truncated
    if ends:
        assert info["end_reason"] == EndReason.ANSWER and info["final_answer"] == final_answer
        assert info["verdict"].correct


def test_segments_must_match_step_text():
    env = MathEnv()
    env.reset(options=ROW)
    with pytest.raises(ValueError, match="segments"):
        env.step(StepText("48/2 = 24\n", segments=[Segment("48/2 = ", True), Segment("25\n", True)]))
    segments = [Segment("48/2 = <<48/2=", True), Segment("24>>24", False), Segment("\n", True)]
    assert not done(env.step(StepText("48/2 = <<48/2=24>>24\n", segments=segments)))
    played = session(MathEnv())
    played.step("48/2 = <<48/2=24>>24\n", segments=segments)
    assert played.episode.steps[0].segments == segments


def test_math_env_is_an_env_on_the_one_api():
    env = make("gsm8k")
    assert isinstance(env, MathEnv) and isinstance(env, Env) and env.spec.id == "gsm8k"
    question, info = env.reset(options=ROW)
    assert question == QUESTION and info["row"]["solution"] == ROW["solution"]
    limited = make_limited("gsm8k", max_steps=2, max_episode_tokens=50, tools=False)  # the caller's limits
    assert (limited.max_steps, limited.max_episode_tokens, tuple(limited.tools)) == (2, 50, ())
    assert len(run(limited, ["a\n", "b\n"])) == 2 and EnvSession(limited, ROW).tools == []


# -- calculator (a tool the session offers) ----------------------------------------------------------------------


def test_calculator_tool_counts_calls_and_errors():
    played = session(MathEnv())
    assert played.tool_insert("In May she sold 48/2 = <<48/2=") == ("24>>24", True)
    assert played.tool_insert("In May she sold 24 clips.") == (None, False)  # nothing pending: not a call
    assert played.tool_insert("Then <<48+*=")[0] is None  # malformed: a call and an error
    played.step("In May she sold 48/2 = <<48/2=24>>24 clips.\n")
    assert (played.episode.steps[0].calc_calls, played.episode.steps[0].calc_errors) == (2, 1)

    played.step("Total 72.\n")  # counters are per step
    assert (played.episode.steps[1].calc_calls, played.episode.steps[1].calc_errors) == (0, 0)


def test_calculator_off_inserts_nothing():
    played = session(MathEnv(flavour="math"))
    assert played.tool_insert("48/2 = <<48/2=") == (None, False)
    played.step("48/2 = 24\n")
    assert played.episode.steps[0].calc_calls == 0
    on = session(MathEnv(flavour="math", calculator=True))
    assert on.tool_insert("<<48/2=") == ("24>>24", True)
    assert session(MathEnv(), ROW).tools and not EnvSession(MathEnv(), ROW, tools=False).tools


def test_calculator_tool_after_done_raises():
    played = play_scripted(MathEnv, ROW, ["The answer is: 72"])
    with pytest.raises(RuntimeError, match="finished"):
        played.tool_insert("<<1+1=")


# -- several episodes side by side, as the rollout loop plays them -----------------------------------------------


def _rows(n: int) -> list[dict]:
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "id": f"q{i}"} for i in range(n)]


def test_sessions_with_mixed_finish_times():
    rows = _rows(3)
    scripts = {
        0: ["The answer is: 0"],
        1: ["1 + 1\n", "= 2\n", "The answer is: 2"],
        2: ["2 + 2 = 4\n", "The answer is: 5"],
    }
    sessions = [
        EnvSession(MathEnv(), row, i, group) for i, (row, group) in enumerate(zip(rows, [7, 7, 8], strict=True))
    ]
    first = [s.episode for s in sessions]

    active_history = []
    turn = 0
    while not all(s.done for s in sessions):
        for i, played in enumerate(sessions):
            if not played.done:
                played.step(scripts[i][turn], num_tokens=3)
        active_history.append([i for i, s in enumerate(sessions) if not s.done])
        turn += 1

    assert active_history == [[1, 2], [1], []]
    episodes = [s.episode for s in sessions]
    assert all(a is b for a, b in zip(first, episodes, strict=True))
    assert [e.episode_id for e in episodes] == [0, 1, 2]
    assert [e.group_id for e in episodes] == [7, 7, 8]
    assert [e.row["id"] for e in episodes] == ["q0", "q1", "q2"]
    assert [len(e.steps) for e in episodes] == [1, 3, 2]
    assert [e.verdict.correct for e in episodes] == [True, True, False]
    assert [e.final_reward for e in episodes] == [1.0, 1.0, 0.0]
    assert [e.num_tokens for e in episodes] == [3, 9, 6]
