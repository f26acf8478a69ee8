"""Evaluation: interval maths, summaries of synthetic records, gold scoring, and real batched runs on tiny models."""

from __future__ import annotations

import json
import re
from functools import partial
from types import SimpleNamespace

import pytest

from trl_stepwise import calculator
from trl_stepwise.data import load_math_dataset
from trl_stepwise.envs import EndReason, EnvSession, MathEnv
from trl_stepwise.evaluation import (
    episode_record,
    evaluate_gold,
    evaluate_problems,
    summarize,
    wilson_interval,
)
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout

CALC = re.compile(r"<<([^<>=\n]+)=([^<>\n]*)>>")


# --- wilson_interval -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "total", "expected"),
    [(5, 10, (0.2366, 0.7634)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (81, 263, (0.2553, 0.3662))],
)
def test_wilson_interval_matches_hand_computed_values(successes, total, expected):
    low, high = wilson_interval(successes, total)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(50, 100, z=1.0), wilson_interval(50, 100, z=2.576)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


# --- summarize -------------------------------------------------------------------------------------------------------


def record(problem, sample, answer, correct, end="answer", level=None, subject=None, steps=2, tokens=10, calls=0):
    out = {
        "problem_index": problem,
        "sample_index": sample,
        "final_answer": answer,
        "correct": correct,
        "end_reason": end,
        "num_steps": steps,
        "num_tokens": tokens,
        "calc_calls": calls,
        "calc_errors": 0,
    }
    if level is not None:
        out["level"] = level
    if subject is not None:
        out["subject"] = subject
    return out


def test_summarize_single_sample_counts_and_breakdowns():
    records = [
        record(0, 0, "3", True, level=1, subject="Algebra", calls=2),
        record(1, 0, "4", False, level=1, subject="Geometry"),
        record(2, 0, None, False, end="max_steps", level=2, subject="Algebra", steps=10, tokens=100),
        record(3, 0, None, False, end="eos", level=2, subject="Algebra"),
    ]
    summary = summarize(list(reversed(records)))  # order must not matter
    assert (summary["correct"], summary["total"], summary["accuracy"]) == (1, 4, 0.25)
    assert (summary["unparsable"], summary["truncated"]) == (2, 1)  # eos without answer is unparsable, not truncated
    assert summary["accuracy_ci_low"] < 0.25 < summary["accuracy_ci_high"]
    assert summary["end_reasons"] == {"answer": 0.5, "eos": 0.25, "max_steps": 0.25}
    assert summary["mean_steps"] == pytest.approx(4.0) and summary["mean_tokens"] == pytest.approx(32.5)
    assert summary["calc_calls"] == 2
    assert summary["per_level"] == {
        "1": {"correct": 1, "total": 2, "accuracy": 0.5},
        "2": {"correct": 0, "total": 2, "accuracy": 0.0},
    }
    assert summary["per_subject"]["Algebra"] == {"correct": 1, "total": 3, "accuracy": pytest.approx(1 / 3)}
    assert "maj@1" not in summary and "pass@1" not in summary
    json.dumps(summary)


def test_summarize_several_samples_majority_and_pass():
    records = [
        # problem 0: first sample wrong, majority right (2 of 3), pass
        record(0, 0, "5", False),
        record(0, 1, "6", True),
        record(0, 2, "6", True),
        # problem 1: first right, majority wrong, pass
        record(1, 0, "1", True),
        record(1, 1, "2", False),
        record(1, 2, "2", False),
        # problem 2: nothing parsed -> no vote, fail
        record(2, 0, None, False, end="max_steps"),
        record(2, 1, None, False, end="eos"),
        record(2, 2, None, False, end="eos"),
        # problem 3: tie 1-1 (+ one unparsed) -> the answer seen first wins
        record(3, 0, "9", True),
        record(3, 1, None, False, end="eos"),
        record(3, 2, "8", False),
    ]
    summary = summarize(records, num_samples=3)
    assert summary["accuracy"] == 0.5  # first samples: 0 wrong, 1 right, 2 wrong, 3 right
    assert summary["maj@3"] == 0.5  # problems 0 and 3
    assert summary["pass@3"] == 0.75
    assert summary["mean_sample_accuracy"] == pytest.approx(4 / 12)
    assert summary["episodes"] == 12 and summary["total"] == 4
    assert (summary["unparsable"], summary["truncated"]) == (1, 1)  # counted over first samples only


def test_summarize_empty():
    summary = summarize([])
    assert summary["total"] == 0 and summary["accuracy"] == 0.0 and summary["mean_steps"] == 0.0


# --- records and gold ------------------------------------------------------------------------------------------------

ROW = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "7", "solution": "", "level": 1, "id": "x"}


def test_episode_record_is_json_and_complete():
    session = EnvSession(MathEnv(), ROW)
    session.tool_insert("He has 3+4 = <<3+4=")
    session.step("He has 3+4 = <<3+4=7>>7 apples.\n", num_tokens=9)
    session.step("The answer is: 7\n", num_tokens=5)
    rec = episode_record(session.episode, problem_index=3, sample_index=1)
    assert json.loads(json.dumps(rec)) == rec
    assert rec["completion"] == "He has 3+4 = <<3+4=7>>7 apples.\nThe answer is: 7\n"
    assert rec["steps"] == ["He has 3+4 = <<3+4=7>>7 apples.\n", "The answer is: 7\n"]
    assert (rec["final_answer"], rec["correct"], rec["reason"]) == ("7", True, "string_equal")
    assert rec["end_reason"] == "answer"
    assert (rec["num_tokens"], rec["calc_calls"], rec["level"], rec["id"]) == (14, 1, 1, "x")
    assert "subject" not in rec


def test_evaluate_gold_scores_reference_solutions():
    rows = load_math_dataset("gsm8k", "test", limit=5).to_list()
    wrong = {**rows[0], "solution": rows[0]["solution"].replace(f"#### {rows[0]['answer']}", "#### 123456")}
    summary, records = evaluate_gold([*rows, wrong], partial(MathEnv, flavour="gsm8k"), "gsm8k")
    assert [r["correct"] for r in records] == [True] * 5 + [False]
    assert records[-1]["final_answer"] == "123456" and records[-1]["reason"] == "numeric_mismatch"
    assert summary["correct"] == 5 and summary["total"] == 6 and summary["unparsable"] == 0
    assert all(r["end_reason"] == "answer" and r["steps"][-1].startswith("The answer is:") for r in records)


def test_evaluate_gold_reports_solutions_longer_than_max_steps():
    rows = load_math_dataset("arithmetic:level=3", "test", limit=2).to_list()  # 3 calculation steps + answer
    summary, records = evaluate_gold(rows, partial(MathEnv, flavour="gsm8k", max_steps=2), "arithmetic")
    assert summary["correct"] == 0 and summary["truncated"] == 2
    assert all(r["end_reason"] == EndReason.MAX_STEPS.value and r["num_steps"] == 2 for r in records)


# --- direct mode in the rollout --------------------------------------------------------------------------------------


def test_direct_mode_step_ends_only_after_the_answer_line():
    direct = SimpleNamespace(step_delimiter=None)
    assert not StepwiseRollout._step_ended(direct, "First 3+4 = 7.\n")
    assert not StepwiseRollout._step_ended(direct, "First 3+4 = 7.\nThe answer is: 7")
    assert StepwiseRollout._step_ended(direct, "First 3+4 = 7.\nThe answer is: 7\n")
    assert StepwiseRollout._step_ended(SimpleNamespace(step_delimiter="\n"), "First 3+4 = 7.\n")


# --- real runs on a tiny random model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(make_tiny_model, tokenizer):
    """A 2-layer random Llama with the embedded tokenizer: real batched decoding in well under a second per step."""
    return make_tiny_model().eval(), tokenizer


@pytest.fixture(scope="module")
def arithmetic_rows():
    return load_math_dataset("arithmetic:level=1", "test", limit=4).to_list()


def builder(tokenizer, k: int = 1) -> PromptBuilder:
    examples = load_math_dataset("arithmetic:level=1", "fewshot", limit=20)
    return PromptBuilder(tokenizer, examples, k=k, flavour="arithmetic")


def test_evaluate_problems_tiny_model_records_and_totals(tiny, arithmetic_rows):
    model, tokenizer = tiny
    sampling = SamplingConfig(temperature=1.0, max_step_tokens=6, batch_size=8, seed=0)
    make_env = partial(MathEnv, flavour="gsm8k", max_steps=3)
    summary, records = evaluate_problems(
        model, tokenizer, arithmetic_rows, builder(tokenizer), make_env, sampling, num_samples=2, progress=False
    )
    assert len(records) == 4 * 2
    assert [(r["problem_index"], r["sample_index"]) for r in records] == [(p, s) for p in range(4) for s in range(2)]
    for rec in records:
        assert rec["question"] == arithmetic_rows[rec["problem_index"]]["question"]
        assert rec["reference"] == arithmetic_rows[rec["problem_index"]]["answer"]
        assert rec["completion"] == "".join(rec["steps"]) and rec["completion"]
        assert 1 <= rec["num_steps"] <= 3 and rec["end_reason"] in {e.value for e in EndReason}
        assert rec["num_tokens"] >= rec["num_policy_tokens"] >= 1 and rec["level"] == 1
        json.dumps(rec)
    assert summary["total"] == 4 and summary["episodes"] == 8 and summary["num_samples"] == 2
    assert summary["correct"] == sum(r["correct"] for r in records if r["sample_index"] == 0)
    assert sum(summary["end_reasons"].values()) == pytest.approx(1.0)
    assert summary["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in records) / 8)
    assert "maj@2" in summary and "pass@2" in summary
    assert summary["wall_seconds"] > 0 and summary["tokens_per_second"] > 0
    assert summary["generated_tokens"] == sum(r["num_policy_tokens"] for r in records)


def test_evaluate_problems_direct_mode_is_one_step(tiny, arithmetic_rows):
    model, tokenizer = tiny
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=12, batch_size=4)
    make_env = partial(MathEnv, flavour="gsm8k", max_steps=1)
    rows = arithmetic_rows[:2]
    summary, records = evaluate_problems(
        model, tokenizer, rows, builder(tokenizer), make_env, sampling, progress=False, step_delimiter=None
    )
    assert len(records) == 2 and summary["total"] == 2
    for rec in records:
        assert rec["num_steps"] == 1
        # a random model writes no answer: the single step runs to the token limit (or EOS) across any newlines
        assert rec["end_reason"] == "eos" or rec["num_policy_tokens"] == 12


# --- the real embedded model -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_arithmetic_level1_with_calculator():
    from trl_stepwise.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer()
    rows = load_math_dataset("arithmetic:level=1", "test", limit=4).to_list()
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=48, batch_size=4)
    make_env = partial(MathEnv, flavour="gsm8k", max_steps=4, calculator=True)
    summary, records = evaluate_problems(
        model, tokenizer, rows, builder(tokenizer, k=2), make_env, sampling, progress=False, calculator=True
    )
    assert len(records) == 4 and summary["total"] == 4
    for rec, row in zip(records, rows, strict=True):
        assert rec["completion"] == "".join(rec["steps"]) and rec["question"] == row["question"]
    assert any(r["end_reason"] == "answer" and r["final_answer"] is not None for r in records)
    insertions = 0
    for rec in records:
        for expression, result in CALC.findall(rec["completion"]):
            value = calculator.evaluate_expression(expression).value
            if value is not None:  # the calculator answered, so it (not the model) wrote the result
                assert result == value, rec["completion"]
                insertions += 1
    assert 1 <= insertions <= summary["calc_calls"] - summary["calc_errors"]
