"""Reference guidance: worked solutions played as episodes, and which groups get one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from scripted_engine import ScriptedEngine, forced_text

from trl_stepwise.engines import StopPolicy
from trl_stepwise.engines.reference import ReferenceEngine
from trl_stepwise.envs import Episode, MathEnv
from trl_stepwise.grading import Verdict
from trl_stepwise.guidance import failed_groups, play_references, reference_text
from trl_stepwise.prompting import FewShotExample, PromptBuilder
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

EXAMPLE = FewShotExample("Tom has 2 apples and buys 3 more. How many?", ["2+3 = <<2+3=5>>5\n", "The answer is: 5\n"])
ROW = {
    "question": "Ann has 4 pens and buys 5 more, then doubles them. How many pens?",
    "answer": "18",
    "solution": "She has 4+5 = <<4+5=9>>9 pens.\nThen 9*2 = <<9*2=18>>18 pens.\n#### 18",
}
REFERENCE = "She has 4+5 = <<4+5=9>>9 pens.\nThen 9*2 = <<9*2=18>>18 pens.\nThe answer is: 18\n"


def _rollout(tokenizer, engine, max_step_tokens: int = 40) -> StepwiseRollout:
    builder = PromptBuilder(tokenizer, [EXAMPLE], k=1)
    return StepwiseRollout(None, tokenizer, builder, SamplingConfig(max_step_tokens=max_step_tokens), engine=engine)


def _make_env():
    return MathEnv("gsm8k", max_steps=5)


def test_reference_text_is_the_worked_solution_in_steps():
    assert reference_text(ROW, "gsm8k") == REFERENCE
    assert reference_text({"question": "q", "answer": "18"}, "gsm8k") is None  # final answer only
    assert reference_text({"question": "q", "answer": "18", "solution": "#### 18"}, "gsm8k") is None  # no steps


def test_reference_episode_is_what_a_policy_writing_the_solution_would_get(tokenizer):
    """Same ids, loss mask, steps and verdict as a streaming engine that samples the solution's tokens."""
    rollout = _rollout(tokenizer, ReferenceEngine(tokenizer, {}, {tokenizer.eos_token_id}))
    (reference,) = play_references(rollout, _make_env, [ROW], [7], [REFERENCE])
    scripted = ScriptedEngine(
        tokenizer, tokenizer(REFERENCE, add_special_tokens=False)["input_ids"], StopPolicy.STREAMING
    )
    (sampled,) = _rollout(tokenizer, scripted).run(_make_env, [ROW], group_ids=[7])
    assert tokenizer.decode(reference.completion_ids) == REFERENCE
    assert reference.completion_ids == sampled.completion_ids
    assert reference.policy_mask == sampled.policy_mask and reference.step_index == sampled.step_index
    assert forced_text(tokenizer, reference) == "9>>918>>18"  # the calculator's results (and their repeat) are masked
    assert reference.episode.verdict.correct and reference.episode.group_id == 7
    assert [s.calc_calls for s in reference.episode.steps] == [1, 1, 0]


def test_reference_that_disagrees_with_the_calculator_ends_there(tokenizer):
    """A solution whose annotation the calculator corrects stops matching the sequence: the engine ends it."""
    wrong = REFERENCE.replace("<<4+5=9>>9", "<<4+5=8>>8")
    engine = ReferenceEngine(tokenizer, {0: wrong}, {tokenizer.eos_token_id})
    (trajectory,) = _rollout(tokenizer, engine).run(_make_env, [ROW])
    assert engine.diverged == [0]
    assert tokenizer.decode(trajectory.completion_ids).startswith("She has 4+5 = <<4+5=9>>")
    assert not trajectory.episode.verdict or not trajectory.episode.verdict.correct


def test_reference_respects_the_step_token_limit(tokenizer):
    """The loop's limits hold for references too: a step cut at max_step_tokens, the rest in the next step."""
    rollout = _rollout(tokenizer, ReferenceEngine(tokenizer, {}, {tokenizer.eos_token_id}), max_step_tokens=5)
    (reference,) = play_references(rollout, lambda: MathEnv("gsm8k", max_steps=2), [ROW], [0], [REFERENCE])
    assert len(reference.episode.steps) == 2
    assert all(step.num_tokens <= 5 for step in reference.episode.steps)
    assert not reference.episode.verdict or not reference.episode.verdict.correct


def _trajectory(group_id, correct: bool | None):
    verdict = None if correct is None else Verdict(correct, None, "1", "scripted")
    return SimpleNamespace(episode=Episode(episode_id=0, group_id=group_id, row={}, verdict=verdict))


def test_failed_groups_picks_the_last_episode_of_each_group_with_no_correct_episode():
    trajectories = [
        _trajectory(0, False),
        _trajectory(0, None),  # no verdict (ran out of steps): a failure
        _trajectory(1, False),
        _trajectory(1, True),
        _trajectory(2, False),
        _trajectory(2, False),
    ]
    assert failed_groups(trajectories) == [1, 5]
    assert failed_groups([_trajectory(None, False)]) == []  # episodes outside a group are left alone


@pytest.mark.parametrize("stop_token_ids", [set(), ()])
def test_reference_engine_needs_an_end_of_turn_token(tokenizer, stop_token_ids):
    with pytest.raises(ValueError, match="end-of-turn"):
        ReferenceEngine(tokenizer, {0: REFERENCE}, stop_token_ids)
