"""Built-in reward functions (TRL's batched signature) and the weighting in combine_rewards."""

from __future__ import annotations

import pytest

from trl_stepwise.rewards import combine_rewards, correctness_reward, format_reward

COMPLETIONS = ["24 + 48 = 72\nThe answer is: 72", "The answer is: 70", "I am not sure."]
ANSWERS = ["72", "72", "72"]


def test_correctness_reward_batched():
    assert correctness_reward(COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 0.0]


def test_correctness_reward_accepts_trl_extra_columns_and_chat_completions():
    chat = [[{"role": "assistant", "content": "So \\boxed{72}"}], [{"role": "assistant", "content": "\\boxed{7}"}]]
    scores = correctness_reward(chat, answer=["72", "72"], prompts=["q", "q"], solution=["s", "s"], trainer_state=None)
    assert scores == [1.0, 0.0]


def test_correctness_reward_none_without_reference():
    assert correctness_reward(COMPLETIONS[:2], answer=[None, "72"]) == [None, 0.0]


def test_correctness_reward_length_mismatch():
    with pytest.raises(ValueError, match="answers"):
        correctness_reward(COMPLETIONS, answer=["72"])


def test_format_reward():
    completions = ["The answer is: 72", "so $\\boxed{3}$", "the total is 72", ""]
    assert format_reward(completions, answer=["72"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_combine_rewards_weights_and_components():
    rows = [{"question": "q", "answer": a} for a in ANSWERS]
    totals, components = combine_rewards([correctness_reward, format_reward], [1.0, 0.5], COMPLETIONS, rows)
    assert totals == pytest.approx([1.5, 0.5, 0.0])
    assert components == [
        {"correctness_reward": 1.0, "format_reward": 1.0},
        {"correctness_reward": 0.0, "format_reward": 1.0},
        {"correctness_reward": 0.0, "format_reward": 0.0},
    ]


def test_combine_rewards_default_weights_are_one():
    rows = [{"answer": a} for a in ANSWERS]
    totals, _ = combine_rewards([correctness_reward, format_reward], None, COMPLETIONS, rows)
    assert totals == pytest.approx([2.0, 1.0, 0.0])


def test_combine_rewards_none_counts_as_zero_and_is_not_a_component():
    def only_first(completions, **kwargs):
        return [3.0] + [None] * (len(completions) - 1)

    totals, components = combine_rewards([only_first], [2.0], ["a", "b"], [{}, {}])
    assert totals == [6.0, 0.0]
    assert components == [{"only_first": 3.0}, {}]


def test_combine_rewards_passes_columns_as_lists_once_per_batch():
    calls = []

    def spy(completions, prompts, answer, level, **kwargs):
        calls.append((completions, prompts, answer, level, sorted(kwargs)))
        return [0.0] * len(completions)

    rows = [{"answer": "1", "level": 2, "prompt": "ignored"}, {"answer": "2", "level": None, "extra": True}]
    combine_rewards([spy], None, ["x", "y"], rows, prompts=["p1", "p2"])
    # missing keys become None, TRL-reserved columns ("prompt") are not forwarded as columns
    assert calls == [(["x", "y"], ["p1", "p2"], ["1", "2"], [2, None], ["extra"])]


def test_combine_rewards_duplicate_names_get_suffixes():
    def score(completions, **kwargs):
        return [1.0] * len(completions)

    totals, components = combine_rewards([score, score], [1.0, 2.0], ["a"], [{}])
    assert totals == [3.0]
    assert components == [{"score": 1.0, "score_2": 1.0}]


@pytest.mark.parametrize(
    ("funcs", "weights", "completions", "rows", "match"),
    [
        ([format_reward], [1.0, 2.0], ["a"], [{}], "weights"),
        ([format_reward], None, ["a", "b"], [{}], "rows"),
        ([lambda completions, **kw: [1.0]], None, ["a", "b"], [{}, {}], "returned 1 scores"),
    ],
)
def test_combine_rewards_rejects_mismatched_lengths(funcs, weights, completions, rows, match):
    with pytest.raises(ValueError, match=match):
        combine_rewards(funcs, weights, completions, rows)
