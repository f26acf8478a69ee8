"""Generated arithmetic word problems: determinism, correct references, level control, disjoint splits, specs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import datasets
import pytest

from trl_stepwise.arithmetic import (
    LEVELS,
    SPLIT_SEED_RANGES,
    TEMPLATES,
    arithmetic_dataset,
    generate_problem,
    generate_problems,
    parse_arithmetic_spec,
    split_of_question,
)
from trl_stepwise.calculator import evaluate_expression
from trl_stepwise.grading import grade_solution

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
STEP = re.compile(r"^(\d+)([-+*/])(\d+)$")
COLUMNS = ["question", "answer", "solution", "level", "num_operations", "seed", "id"]


@pytest.fixture(scope="module")
def problems_by_level() -> dict[int, list[dict]]:
    return {level: generate_problems(level, "train", 500) for level in LEVELS}


def _steps(solution: str) -> list[tuple[int, str, int, str]]:
    """(left, op, right, result) of every annotation, asserting the plain `a op b` form on the way."""
    steps = []
    for expr, result in ANNOTATION.findall(solution):
        match = STEP.match(expr)
        assert match, f"annotation {expr!r} is not 'a op b' without spaces"
        steps.append((int(match[1]), match[2], int(match[3]), result))
    return steps


def _unused_numbers(problem: dict) -> int:
    """How many numbers of the question no step uses: the distractors."""
    steps = _steps(problem["solution"])
    used = Counter([steps[0][0], *(right for _, _, right, _ in steps)])
    return (Counter(int(x) for x in re.findall(r"\d+", problem["question"])) - used).total()


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_same_seed_gives_same_problem(level):
    for seed in (0, 7, 123_456, SPLIT_SEED_RANGES["test"][0] + 5):
        assert generate_problem(level, seed) == generate_problem(level, seed)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_different_seeds_give_different_problems(level):
    differ = sum(
        generate_problem(level, s)["question"] != generate_problem(level, s + 1)["question"] for s in range(200)
    )
    assert differ > 0.95 * 200


def test_generation_does_not_depend_on_python_hash_seed():
    """Set iteration order changes with PYTHONHASHSEED; the problems must not."""
    code = (
        "import hashlib, json; from trl_stepwise.arithmetic import generate_problems as g; "
        "print(hashlib.sha256(json.dumps([g(lv, 'train', 30) for lv in (1, 2, 3, 4)]).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        digests.add(
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        )
    local = hashlib.sha256(
        json.dumps([generate_problems(lv, "train", 30) for lv in (1, 2, 3, 4)]).encode()
    ).hexdigest()
    assert digests == {local + "\n"}


# ---------------------------------------------------------------------------------------------- reference solutions


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_reference_solutions_are_correct_and_calculator_consistent(level, problems_by_level):
    for p in problems_by_level[level]:
        solution = p["solution"]
        assert grade_solution(solution, p["answer"]).correct, solution
        lines = solution.split("\n")
        assert solution.endswith("\n") and lines[-1] == "" and all(line.strip() for line in lines[:-1])
        assert lines[-2] == f"The answer is: {p['answer']}"
        assert re.fullmatch(r"\d+", p["answer"])
        previous = None
        for expr, result in ANNOTATION.findall(solution):
            assert evaluate_expression(expr).value == result, (expr, result)
        for left, _op, _right, result in _steps(solution):
            assert re.fullmatch(r"\d+", result) and int(result) >= 0  # non-negative integer
            assert f">>{result}" in solution  # the result is written out after the annotation
            if previous is not None:
                assert left == previous, f"step does not chain on the previous result: {solution}"
            previous = int(result)
        assert str(previous) == p["answer"]
        # one annotated step per line, each "... a op b = <<a op b=r>>r ..."
        for line in lines[:-2]:
            assert line.count("<<") == 1 and re.search(r"(\S+) = <<\1=(\d+)>>\2\b", line), line


def test_a_step_that_miscomputes_would_be_caught():
    """Guard the checks above: a wrong result fails the calculator and a wrong final line fails the grader."""
    p = generate_problem(2, 3)
    expr, result = ANNOTATION.findall(p["solution"])[0]
    assert evaluate_expression(expr).value != str(int(result) + 1)
    assert not grade_solution(f"The answer is: {int(p['answer']) + 1}\n", p["answer"]).correct


# ---------------------------------------------------------------------------------------------------- level control


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_level_sets_the_number_of_operations(level, problems_by_level):
    expected = LEVELS[level].num_operations
    assert expected == level
    for p in problems_by_level[level]:
        assert p["solution"].count("<<") == p["num_operations"] == expected
        assert p["level"] == level


def test_level_one_numbers_stay_small(problems_by_level):
    for p in problems_by_level[1]:
        assert all(2 <= int(x) <= 99 for x in re.findall(r"\d+", p["question"])), p["question"]
        for _left, op, right, _ in _steps(p["solution"]):
            if op in "*/":
                assert right <= 9, p["solution"]


def test_level_two_numbers_are_two_digit_with_one_digit_factors(problems_by_level):
    for p in problems_by_level[2]:
        assert all(2 <= int(x) <= 99 for x in re.findall(r"\d+", p["question"])), p["question"]
        steps = _steps(p["solution"])
        assert 10 <= steps[0][0] <= 99
        for _left, op, right, _ in steps:
            assert 10 <= right <= 99 if op in "+-" else 2 <= right <= 9, p["solution"]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_distractor_count_matches_level(level, problems_by_level):
    """Numbers in the question that no step uses are distractors: none at levels 1-2, 1 at 3, 1-2 at 4."""
    spec = LEVELS[level]
    seen = Counter()
    for p in problems_by_level[level]:
        unused = _unused_numbers(p)
        assert spec.min_distractors <= unused <= spec.max_distractors, p["question"]
        seen[unused] += 1
    assert set(seen) == set(range(spec.min_distractors, spec.max_distractors + 1))


def test_all_four_operations_appear_at_every_level(problems_by_level):
    for level, problems in problems_by_level.items():
        ops = Counter(op for p in problems for _, op, _, _ in _steps(p["solution"]))
        assert set(ops) == set("+-*/"), (level, ops)
        assert min(ops.values()) > 0.1 * sum(ops.values()), (level, ops)


def test_templates_are_varied():
    for op in "+-*/":
        assert len({t.text for t in TEMPLATES if t.op == op}) >= 12, op


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="level"):
        generate_problem(5, 0)


# ---------------------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("level", [1, 2])
def test_test_questions_never_appear_in_training(level):
    train = generate_problems(level, "train", 20_000)
    test = generate_problems(level, "test", 2_000)
    train_questions = {p["question"] for p in train}
    test_questions = {p["question"] for p in test}
    assert len(test_questions) > 0.95 * len(test)
    assert not train_questions & test_questions
    # the construction behind it: each text hashes into exactly the split it was generated for
    assert {split_of_question(q) for q in train_questions} == {"train"}
    assert {split_of_question(q) for q in test_questions} == {"test"}


def test_split_partition_is_balanced_and_stable():
    counts = Counter(split_of_question(f"question {i}") for i in range(3000))
    assert set(counts) == set(SPLIT_SEED_RANGES) and min(counts.values()) > 800
    assert split_of_question("Maria has 3 apples.") == split_of_question("Maria has 3 apples.")


def test_seed_ranges_are_disjoint():
    ranges = sorted(SPLIT_SEED_RANGES.values())
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:], strict=False))


def test_ids_and_seeds_follow_the_split_range():
    problems = generate_problems(2, "test", 3, start=10)
    assert [p["seed"] for p in problems] == [SPLIT_SEED_RANGES["test"][0] + i for i in (10, 11, 12)]
    assert [p["id"] for p in problems] == ["arith-L2-test-10", "arith-L2-test-11", "arith-L2-test-12"]
    assert problems[0] == generate_problem(2, SPLIT_SEED_RANGES["test"][0] + 10)
    assert generate_problem(1, 123)["id"] == "arith-L1-train-123"


def test_unknown_split_and_bad_seed_are_rejected():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        generate_problems(1, "validation", 5)
    with pytest.raises(ValueError, match="unknown split"):
        arithmetic_dataset(1, split="dev", n=2)
    with pytest.raises(ValueError, match="outside every split range"):
        generate_problem(1, -1)
    with pytest.raises(ValueError, match="do not fit"):
        generate_problems(1, "fewshot", 2, start=10**9 - 1)


# ------------------------------------------------------------------------------------------------- dataset and spec


def test_arithmetic_dataset_columns_count_and_round_robin():
    ds = arithmetic_dataset([1, 2, 3], split="fewshot", n=7, start=4)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == COLUMNS and len(ds) == 7
    assert ds["level"] == [1, 2, 3, 1, 2, 3, 1]
    assert ds["seed"] == [SPLIT_SEED_RANGES["fewshot"][0] + i for i in (4, 4, 4, 5, 5, 5, 6)]
    assert ds[1] == generate_problem(2, SPLIT_SEED_RANGES["fewshot"][0] + 4)
    assert all(isinstance(a, str) for a in ds["answer"])


def test_arithmetic_dataset_single_level_default_split():
    ds = arithmetic_dataset(2, n=5)
    assert len(ds) == 5 and set(ds["level"]) == {2}
    assert ds["id"] == [f"arith-L2-train-{i}" for i in range(5)]
    assert len(arithmetic_dataset(1, n=0)) == 0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("arithmetic", {}),
        ("arithmetic:level=2", {"level": 2}),
        ("arithmetic:level=1-3,n=500", {"level": [1, 2, 3], "n": 500}),
        ("arithmetic:level=1,2", {"level": [1, 2]}),
        ("arithmetic:level=1,2,4,n=20", {"level": [1, 2, 4], "n": 20}),
        ("arithmetic:n=50,level=3-4,start=100", {"n": 50, "level": [3, 4], "start": 100}),
        (" arithmetic:level=2-2 ", {"level": 2}),
        ("arithmetic:level=1,distractors=0-1", {"level": 1, "distractors": (0, 1)}),
        ("arithmetic:distractors=2,level=1,2", {"distractors": (2, 2), "level": [1, 2]}),
    ],
)
def test_parse_arithmetic_spec(spec, expected):
    assert parse_arithmetic_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "arith",
        "arithmetic:",
        "arithmetic:level=0",
        "arithmetic:level=5",
        "arithmetic:level=3-1",
        "arithmetic:level=two",
        "arithmetic:n=ten",
        "arithmetic:n=-5",
        "arithmetic:size=5",
        "arithmetic:level=1,n=5,7",
        "arithmetic:level=1,level=2",
        "arithmetic:split=test",
        "arithmetic:distractors=many",
        "arithmetic:distractors=3-1",
        "arithmetic:distractors=1,distractors=2",
    ],
)
def test_parse_arithmetic_spec_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match=r"arithmetic"):
        parse_arithmetic_spec(spec)


def test_parse_error_names_the_accepted_form():
    with pytest.raises(ValueError, match=re.escape("arithmetic:level=1-3,n=500")):
        parse_arithmetic_spec("arithmetic:difficulty=2")


def test_parsed_spec_feeds_arithmetic_dataset():
    ds = arithmetic_dataset(split="test", **parse_arithmetic_spec("arithmetic:level=1-2,n=6"))
    assert ds["level"] == [1, 2, 1, 2, 1, 2] and all(i.split("-")[2] == "test" for i in ds["id"])


def test_distractors_override_the_level_count_and_keep_the_operations():
    """Real word problems often carry an irrelevant number; `distractors=` adds such sentences at any level."""
    ds = arithmetic_dataset(split="train", **parse_arithmetic_spec("arithmetic:level=1,distractors=0-1,n=60"))
    counts = Counter(_unused_numbers(p) for p in ds)
    assert set(counts) == {0, 1} and min(counts.values()) >= 15
    assert set(ds["num_operations"]) == {1} and all(split_of_question(q) == "train" for q in ds["question"])
    with_one = arithmetic_dataset(1, split="test", n=20, distractors=(1, 1))
    assert all(_unused_numbers(p) == 1 for p in with_one)
    assert len(set(with_one["id"]) & set(arithmetic_dataset(1, split="test", n=20)["id"])) == 0  # ids name the mix
