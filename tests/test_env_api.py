"""The gymnasium-shaped environment API: registry, seeded resets, the math environments ported onto it, environment
replies and tool results as masked tokens (token level, with a scripted engine), and user tools."""

from __future__ import annotations

import time

import pytest
from scripted_engine import ScriptedEngine

from trl_stepwise import envs
from trl_stepwise.engines import StopPolicy
from trl_stepwise.envs import (
    EndReason,
    Env,
    EnvSession,
    FunctionTool,
    MathEnv,
    make,
    play_scripted,
    register,
    registry,
    tool,
)
from trl_stepwise.prompting import FewShotExample, PromptBuilder
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

ROW = {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?", "answer": "72"}
CORRECT = ["In May she sold 48/2 = 24 clips.\n", "In total 48 + 24 = 72 clips.\n", "The answer is: 72"]
EXAMPLE = FewShotExample("Tom has 2 apples and buys 3 more. How many?", ["2+3 = <<2+3=5>>5\n", "The answer is: 5\n"])


class GuessEnv(Env):
    """Guess a number from 1 to 9 drawn from the seed; replies "Higher."/"Lower." after a wrong guess."""

    max_steps = 4

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target = self.rng.randint(1, 9)
        return "Guess my number (1-9).", {}

    def step(self, action):
        guess = int(action.strip() or 0)
        if guess == self.target:
            return "", 1.0, True, False, {"correct": True, "final_answer": str(guess)}
        return ("Higher.\n" if guess < self.target else "Lower.\n"), 0.0, False, False, {}


@pytest.fixture
def guess_id():
    register("test-guess", GuessEnv, overwrite=True)
    yield "test-guess"
    registry.pop("test-guess")


# -- registry and resets -------------------------------------------------------------------------------------------


def test_make_builds_registered_ids_with_defaults_and_overrides(guess_id):
    assert {"gsm8k", "math", "arithmetic"} <= set(registry)
    env = make("gsm8k", max_steps=3)
    assert isinstance(env, MathEnv) and env.max_steps == 3 and env.spec.id == "gsm8k"
    assert make("math").max_steps == 15 and make("math").tools == ()
    assert isinstance(make(guess_id), GuessEnv)
    with pytest.raises(KeyError, match="unknown environment id 'nope'"):
        make("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(guess_id, GuessEnv)


def test_seeded_resets_are_identical(guess_id):
    """The episodes of one group start identically: same seed, same problem (and a fresh env changes nothing)."""
    starts = [make("arithmetic", level=2).reset(seed=5) for _ in range(2)]
    assert starts[0] == starts[1] and starts[0][0]
    assert make("arithmetic", level=2).reset(seed=6)[0] != starts[0][0]
    targets = []
    for _ in range(3):
        env = make(guess_id)
        env.reset(seed=11)
        targets.append(env.target)
    assert len(set(targets)) == 1


@pytest.mark.parametrize(
    ("steps", "rewards", "ends", "end_reason"),
    [
        (CORRECT, [0.0, 0.0, 1.0], [False, False, True], EndReason.ANSWER),
        (["In May 96.\n", "The answer is: 144"], [0.0, 0.0], [False, True], EndReason.ANSWER),
        (["Thinking.\n"] * 3, [0.0, 0.0, 0.0], [False, False, True], EndReason.MAX_STEPS),
    ],
)
def test_math_env_on_the_api_ends_and_scores_episodes(steps, rewards, ends, end_reason):
    env = make("gsm8k", max_steps=3)
    problem, _ = env.reset(options=ROW)
    assert problem == ROW["question"]
    results = [env.step(text) for text in steps]
    assert [r for _, r, *_ in results] == rewards
    assert [t or u for _, _, t, u, _ in results] == ends
    assert results[-1][4]["end_reason"] == end_reason
    assert results[-1][2] == (end_reason == EndReason.ANSWER)  # terminated vs truncated
    assert all(obs == "" for obs, *_ in results)
    episode = play_scripted(lambda: make("gsm8k", max_steps=3), ROW, steps).episode
    assert episode.end_reason == end_reason and episode.final_reward == rewards[-1]


def test_scripted_policy_session_records_replies_rewards_and_verdict(guess_id):
    env = make(guess_id)
    env.reset(seed=3)
    target = env.target
    wrong = 1 if target != 1 else 2
    session = play_scripted(lambda: make(guess_id), {"seed": 3}, [f"{wrong}\n", f"{target}\n"])
    episode = session.episode
    assert episode.end_reason == EndReason.ANSWER and episode.verdict.correct and episode.final_reward == 1.0
    reply = "Higher.\n" if wrong < target else "Lower.\n"
    assert episode.completion == f"{wrong}\n{reply}{target}\n"
    assert [s.from_policy for s in episode.steps[0].segments] == [True, False]
    assert episode.row["question"] == "Guess my number (1-9)."
    # the session ends an episode at the environment's step limit, as truncated
    session = play_scripted(lambda: make(guess_id), {"seed": 3}, [f"{wrong}\n"] * 4)
    assert session.episode.end_reason == EndReason.MAX_STEPS and not session.episode.verdict


# -- replies and tools as masked tokens --------------------------------------------------------------------------


ENGINE_KINDS = list(StopPolicy)  # transformers, server, vLLM in process


def _rollout(tokenizer, script_text: str, stop_policy: StopPolicy, **kwargs) -> tuple[StepwiseRollout, ScriptedEngine]:
    ids = tokenizer(script_text, add_special_tokens=False)["input_ids"]
    engine = ScriptedEngine(tokenizer, ids, stop_policy)
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    return StepwiseRollout(
        None, tokenizer, builder, SamplingConfig(max_step_tokens=40), engine=engine, **kwargs
    ), engine


def _forced_text(tokenizer, trajectory) -> str:
    ids = [t for t, p in zip(trajectory.completion_ids, trajectory.policy_mask, strict=True) if not p]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("stop_policy", ENGINE_KINDS)
def test_environment_replies_are_masked_tokens_and_the_next_step_follows_them(tokenizer, guess_id, stop_policy):
    env = make(guess_id)
    env.reset(seed=4)
    target = env.target
    wrong = 9 if target != 9 else 1
    # the script runs on past the first step: what was sampled without the reply is dropped and sampled again after
    rollout, engine = _rollout(tokenizer, f"{wrong}\n{target}\n", stop_policy)
    (trajectory,) = rollout.run(lambda: make(guess_id), [{"seed": 4}])
    reply = "Lower.\n" if wrong > target else "Higher.\n"
    assert tokenizer.decode(trajectory.completion_ids) == f"{wrong}\n{reply}{target}\n"
    assert _forced_text(tokenizer, trajectory) == reply
    mask = trajectory.policy_mask
    policy_text = tokenizer.decode([t for t, p in zip(trajectory.completion_ids, mask, strict=True) if p])
    assert policy_text == f"{wrong}\n{target}\n"
    assert trajectory.episode.completion == f"{wrong}\n{reply}{target}\n"
    assert [s.text for s in trajectory.episode.steps] == [f"{wrong}\n{reply}", f"{target}\n"]
    assert trajectory.episode.verdict.correct and trajectory.episode.final_reward == 1.0
    # reply tokens belong to the step they answer; the next step's tokens to the next one
    assert [i for i, p in zip(trajectory.step_index, mask, strict=True) if not p] == [0] * mask.count(False)
    assert trajectory.step_index[-1] == 1
    assert all(lp == 0.0 for lp, p in zip(trajectory.sampling_logps, mask, strict=True) if not p)
    assert rollout.stats.forced_tokens == mask.count(False)


@tool()
def convert(arguments: str) -> str:
    """`3 km in m` -> `3000 m`."""
    factors = {"km": 1000.0, "m": 1.0, "cm": 0.01}
    value, unit, _, target = arguments.split()
    return f"{float(value) * factors[unit] / factors[target]:g} {target}"


class ConvertEnv(Env):
    """Answer a unit question; offers the converter (and the calculator) as tools."""

    tools = (convert, envs.CalculatorTool())
    max_steps = 3

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "How many metres are 3 km?", {}

    def step(self, action):
        done = "answer" in action
        return "", float(done and "3000" in action), done, False, {"correct": done and "3000" in action}


@pytest.mark.parametrize("stop_policy", ENGINE_KINDS)
def test_a_user_tool_result_is_inserted_as_masked_tokens(tokenizer, stop_policy):
    script = "That is <convert>3 km in m</convert> so 1+2 = <<1+2= parts.\nThe answer is 3000\n"  # the tools fill in
    rollout, engine = _rollout(tokenizer, script, stop_policy)
    (trajectory,) = rollout.run(ConvertEnv, [{}])
    completion = trajectory.episode.completion
    assert completion.startswith("That is <convert>3 km in m</convert> 3000 m so 1+2 = <<1+2=3>>3 parts.\n")
    assert _forced_text(tokenizer, trajectory) == " 3000 m3>>3"
    step = trajectory.episode.steps[0]
    assert step.calc_calls == 2 and step.calc_errors == 0
    assert [s.from_policy for s in step.segments] == [True, False, True, False, True]
    assert trajectory.episode.verdict.correct
    if stop_policy is StopPolicy.STREAMING:  # cut at the tools' calls as the tokens came, without stop strings
        assert all(request.stop_strings == () for request in engine.requests)
    elif stop_policy is StopPolicy.ENVIRONMENT:  # the engine was asked to pause at the tools' own stop strings only
        assert "<convert>" in engine.requests[0].stop_strings and "<<" in engine.requests[0].stop_strings
        assert "</convert>" in engine.requests[1].stop_strings


def test_tool_errors_limits_and_timeouts_are_shown_not_raised():
    def lookup(arguments: str) -> str:
        return {"pi": "3.14159"}[arguments]

    table = FunctionTool(lookup, max_chars=5)
    assert table.stop_strings("Pi is <lookup>") == ("</lookup>",)
    assert table.stop_strings("Pi is ") == ("<lookup>",)
    assert table.insert("Pi is <lookup>pi") is None  # no complete call yet
    assert table.insert("Pi is <lookup>tau</lookup>").text == " error: KeyError: 'tau'"
    assert table.insert("Pi is <lookup>pi</lookup>").error == "too_large"
    assert FunctionTool(lookup).insert("Pi is <lookup> pi </lookup>").text == " 3.14159"

    def slow(arguments: str) -> str:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pass
        return "late"

    started = time.monotonic()
    result = FunctionTool(slow, timeout_s=0.2).insert("<slow>x</slow>")
    assert result.error == "timeout" and "longer than 0.2s" in result.text
    assert time.monotonic() - started < 2
    with pytest.raises(ValueError, match="must be a word"):
        FunctionTool(lookup, name="two words")


def test_calculator_tool_keeps_the_calculator_behaviour():
    calc = envs.CalculatorTool()
    assert calc.stop_strings("So ") == ("<<",) and calc.stop_strings("So <<4*5") == ("=", ">>")
    assert calc.insert("So <<4*5=").text == "20>>20"
    failed = calc.insert("So <<4/0=")
    assert failed.text is None and failed.error == "division_by_zero"
    session = EnvSession(make("gsm8k"), ROW)
    assert session.tool_insert("So <<4/0=") == (None, True)
    session.step("So <<4/0=x>>x\n")
    assert session.episode.steps[0].calc_calls == 1 and session.episode.steps[0].calc_errors == 1
