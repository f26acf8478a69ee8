"""Answer extraction and grading: equivalence table, hostile inputs, thread safety and the bundled gold solutions."""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from trl_stepwise import grading
from trl_stepwise.grading import Verdict, extract_final_answer, extract_gsm8k_reference, grade, grade_solution

DATA_DIR = pathlib.Path(os.environ.get("TRL_STEPWISE_DATA_DIR") or pathlib.Path(__file__).parents[1] / "data")
HANG_GUARD_S = 10.0  # generous: these tests catch hangs, they are not benchmarks


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"bundled data not found: {path}")
    with path.open() as f:
        return [json.loads(line) for line in f]


# (prediction, reference, correct)
GRADE_CASES = [
    # GSM8K-style numbers
    ("18", "18", True),
    ("18.0", "18", True),
    ("18.00", "18", True),
    ("$18", "18", True),
    ("\\$18", "18", True),
    ("18 dollars", "18", True),
    ("18.", "18", True),
    ("1,000", "1000", True),
    ("1000", "1,000", True),
    ("1,234,567", "1234567", True),
    ("1/2", "0.5", True),
    ("50%", "50", True),
    ("50\\%", "50", True),
    ("50%", "0.5", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("3", "-3", False),
    ("−3", "-3", True),
    ("1e3", "1000", True),
    ("2.5E-1", "0.25", True),
    ("1e3", "100", False),
    ("17", "18", False),
    ("18.01", "18", False),
    ("0.333", "\\frac13", False),
    ("x = 5", "5", True),
    ("5 x", "5", False),
    ("$\\frac12$", "0.5", True),
    ("\\(\\frac{1}{2}\\)", "0.5", True),
    ("1" * 60, "1" * 60, True),
    ("1" * 60, "1" * 59 + "2", False),
    ("1" * 59 + "0.0", "1" * 59 + "0", True),
    ("9" * 40 + "8", "9" * 41, False),
    # LaTeX numbers
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac12", "0.5", True),
    ("\\tfrac{1}{2}", "\\frac12", True),
    ("-\\frac{3}{8}", "-0.375", True),
    ("\\frac{3}{8}", "-0.375", False),
    ("\\frac 59", "\\frac{5}{9}", True),
    ("10,\\!080", "10080", True),
    ("\\$32,\\!348", "32348", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("30", "30^\\circ", True),
    ("31^\\circ", "30", False),
    ("5.4 \\text{ cents}", "5.4", True),
    # symbolic
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\sqrt{3}", "\\frac{\\sqrt{2}}{2}", False),
    ("(1, 2]", "(1,2]", True),
    ("[1,2]", "(1,2]", False),
    ("(1,2)", "(1, 2)", True),
    ("(2,1)", "(1, 2)", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("2k+2", "2(k+1)", True),
    ("q-p", "p - q", False),
    ("6-5i", "6 - 5i", True),
    ("y=3+2x", "y = 2x + 3", True),
    ("1\\frac{4}{5}", "1.8", True),
    ("\\pi", "3.14159", False),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}", True),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\end{pmatrix}", True),
    # multiple choice and words
    ("\\text{(A)}", "A", True),
    ("(A)", "\\text{(A)}", True),
    ("(B)", "\\text{(A)}", False),
    ("Evelyn", "\\text{Evelyn}", True),
    ("\\text{odd}", "\\text{even}", False),
    ("neve", "\\text{even}", False),  # a word is not a product of symbols
    # garbage and missing answers
    (None, "5", False),
    ("", "5", False),
    ("   ", "5", False),
    ("garbage }{ \\frac{", "5", False),
    ("five", "5", False),
    ("\\boxed{", "5", False),
    ("1e999999999", "5", False),
    # the whole answer line handed to grade(): the phrase must not reach the symbolic parser
    ("The answer is: $6\\sqrt{2}$", "6\\sqrt{2}", True),
    ("The answer is: 6\\sqrt{2}", "6\\sqrt{2}", True),
    ("The answer is: $x^2+1$", "x^2+1", True),
    ("The answer is: $x^2+2$", "x^2+1", False),
    ("The answer is: 8e-06", "8e-06", True),
    ("The answer is: 8e-05", "8e-06", False),
    ("The answer is: $\\boxed{\\text{Evelyn}}$.", "\\text{Evelyn}", True),
    ("The answer is: \\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("The answer is: p - q", "p - q", True),
    ("The answer is: q - p", "p - q", False),
    ("The answer is:", "5", False),
    # chat models' answer lines handed to grade(): the marker must not reach the number or symbolic parsers
    ("**Answer:** 48115525", "48115525", True),
    ("**Answer:** 48115526", "48115525", False),
    ("**Answer:** $\\frac{3}{4}$", "\\frac34", True),
    ("**Answer:** $\\frac{3}{5}$", "\\frac34", False),
    ("**Final answer: 18**", "18", True),
    ("Final Answer: $\\boxed{6\\sqrt{2}}$", "6\\sqrt{2}", True),
    ("Answer: 19", "18", False),
    ("#### 1,024", "1024", True),
    ("**Answer:**", "5", False),
    # scientific notation, plain and LaTeX
    ("8e-06", "0.000008", True),
    ("8 \\times 10^{-6}", "8e-06", True),
    ("8\\cdot10^{-6}", "0.000008", True),
    ("8 \\times 10^{-5}", "8e-06", False),
    ("1.8 \\times 10^{3}", "1800", True),
    # mixed numbers: a whole number directly before a proper fraction is added to it (1 4/5 = 9/5)
    ("1\\frac{4}{5}", "\\frac{9}{5}", True),
    ("1 \\frac45", "1.8", True),
    ("1 4/5", "1.8", True),
    ("-2\\frac{1}{2}", "-2.5", True),
    ("1\\frac{4}{5}", "0.8", False),
    ("1\\frac{4}{5}", "\\frac{4}{5}", False),
    # fractions with units or a percent sign
    ("\\frac{14}{3} dollars", "\\frac{14}{3}", True),
    ("\\frac{14}{3} \\text{ cm}", "\\frac{14}{3}", True),
    ("\\frac{1}{3}\\%", "\\frac{1}{3}", True),
    ("\\frac{1}{3} dollars", "\\frac{2}{3}", False),
]


@pytest.mark.parametrize(("prediction", "reference", "correct"), GRADE_CASES)
def test_grade_table(prediction: str | None, reference: str, correct: bool) -> None:
    verdict = grade(prediction, reference)
    assert isinstance(verdict, Verdict)
    assert verdict.correct is correct, verdict


def test_grade_table_is_large_and_balanced() -> None:
    assert len(GRADE_CASES) >= 60
    assert sum(c for *_, c in GRADE_CASES) >= 20 and sum(not c for *_, c in GRADE_CASES) >= 20


@pytest.mark.parametrize(
    ("prediction", "reference", "reason"),
    [
        ("18", "18", "string_equal"),
        ("18.0", "18", "numeric_equal"),
        ("17", "18", "numeric_mismatch"),
        (None, "18", "no_answer"),
        ("", "18", "no_answer"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", "symbolic_equal"),
        ("(2,1)", "(1,2)", "symbolic_mismatch"),
        ("9^{9^{9^{9}}}", "5", "too_large"),
        ("9**9**9", "5", "too_large"),
        ("x" * 10_000, "5", "too_long"),
    ],
)
def test_grade_reasons(prediction: str | None, reference: str, reason: str) -> None:
    assert grade(prediction, reference).reason == reason


def test_grade_reports_normalised_forms() -> None:
    verdict = grade("$1,000.$", "\\$1,000")
    assert verdict == Verdict(True, "1,000", "1,000", "string_equal")
    assert grade(None, "\\text{(B)}") == Verdict(False, None, "B", "no_answer")


@pytest.mark.parametrize(
    ("prediction", "reference"), [("5", None), (18, "18"), ("5", 5), (object(), "5"), ("\\frac{", "\\sqrt{")]
)
def test_bad_argument_types_give_a_verdict_not_an_exception(prediction: object, reference: object) -> None:
    verdict = grade(prediction, reference)  # type: ignore[arg-type]
    assert isinstance(verdict, Verdict)
    assert verdict.correct is (prediction == 18 or prediction == "5" and reference == 5)


def test_fast_paths_do_not_import_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("symbolic path used")

    monkeypatch.setattr(grading, "_math_verify_equal", boom)
    for prediction, reference in [("18 dollars", "18"), ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("17", "18")]:
        assert grade(prediction, reference).reason.startswith("numeric_")
    start = time.perf_counter()
    for i in range(2_000):
        grade(f"The value is {i}", str(i))  # not a number: only the fast checks before symbolic may run
        grade(f"{i}.0", str(i))
    assert time.perf_counter() - start < HANG_GUARD_S


# --- extraction ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so she has 18 left.\nThe answer is: 18", "18"),
        ("The answer is 18.", "18"),
        ("Thus the final answer is 42", "42"),
        ("the answer is: $18.", "$18"),
        ("The answer is: 18 dollars. Next question: how many?", "18 dollars"),
        ("We get $\\boxed{5}$.", "5"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "\\left\\{ 1, 2 \\right\\}"),
        ("\\boxed 2.", "2"),
        ("\\fbox{7}", "7"),
        ("First \\boxed{1}, then \\boxed{2}", "2"),
        ("\\boxed{3}. The answer is: 4", "4"),
        ("The answer is: 4, i.e. \\boxed{3}", "3"),
        ("The answer is $\\boxed{5}$.", "5"),
        ("The answer is: 1\nThe answer is: 2", "2"),
        ("\\boxed{}", None),
        ("\\boxed{7} and then \\boxed{}", "7"),
        ("\\boxed{unclosed", None),
        ("no answer here", None),
        ("", None),
        ("The answer is:", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_extract_gsm8k_reference() -> None:
    assert extract_gsm8k_reference("She has 48/2 = <<48/2=24>>24 left.\n#### 1,024") == "1024"
    assert extract_gsm8k_reference("#### -5") == "-5"
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_reference("The answer is 5")


def test_grade_solution() -> None:
    assert grade_solution("2 + 3 = 5.\nThe answer is: 5", "5") == Verdict(True, "5", "5", "string_equal")
    assert grade_solution("I think \\boxed{4}, no wait, \\boxed{\\frac{10}{2}}", "5").correct
    assert not grade_solution("\\boxed{5}, no wait, \\boxed{4}", "5").correct
    assert grade_solution("I give up.", "5") == Verdict(False, None, "5", "no_answer")


# --- hostile inputs ---

HOSTILE = [
    "9^{9^{9^{9}}}",
    "9^9^9",
    "9**(9**9)",
    "10^{10^{10}}+1",
    "(10^{1000})^{1000}",
    "99999999999!",
    "1e999999999",
    "9" * 10_000,
    "x" * 10_000,
    "(" * 400 + "1" + ")" * 400,
    "\\frac{" * 3_000,
    "(x+1)^{500}",
    "\\left(" * 300 + "1",
]


@pytest.mark.parametrize("prediction", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_prediction_returns_quickly(prediction: str) -> None:
    start = time.perf_counter()
    verdict = grade(prediction, "5", timeout_s=1.0)
    assert time.perf_counter() - start < HANG_GUARD_S
    assert not verdict.correct


def test_hostile_solution_text_returns_quickly() -> None:
    texts = [
        "\\boxed{" * 5_000,
        "The answer is " * 3_000,
        "\\boxed{" + "{" * 10_000 + "}" * 10_000 + "}",
        "a" * 100_000,
    ]
    start = time.perf_counter()
    verdicts = [grade_solution(text, "5", timeout_s=1.0) for text in texts]
    assert time.perf_counter() - start < HANG_GUARD_S
    assert not any(v.correct for v in verdicts)


def _spin(*args: object, **kwargs: object) -> bool:
    while True:
        pass


@pytest.mark.parametrize("in_thread", [False, True], ids=["main_thread", "worker_thread"])
def test_symbolic_timeout_works_in_any_thread(monkeypatch: pytest.MonkeyPatch, in_thread: bool) -> None:
    import math_verify

    grade("(1,2)", "(1,2]")  # warm math-verify up outside the measured call
    monkeypatch.setattr(math_verify, "verify", _spin)
    run = (lambda f: ThreadPoolExecutor(1).submit(f).result()) if in_thread else (lambda f: f())
    start = time.perf_counter()
    verdict = run(lambda: grade("(1,2)", "(1,2]", timeout_s=0.3))
    elapsed = time.perf_counter() - start
    assert verdict.reason == "timeout" and not verdict.correct
    assert 0.3 <= elapsed < HANG_GUARD_S
    time.sleep(0.3)  # a stray late Timeout would surface here and fail the test
    assert run(lambda: grade("18.0", "18")).correct


def test_grading_from_many_threads_matches_main_thread() -> None:
    cases = [(p, r) for p, r, _ in GRADE_CASES]
    expected = [grade(p, r).correct for p, r in cases]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: grade(*c).correct, cases))
    assert got == expected
    assert threading.active_count() < 10


# --- bundled gold solutions ---


def test_gsm8k_test_references_grade_against_themselves() -> None:
    rows = read_jsonl(DATA_DIR / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    failures = []
    for row in rows:
        reference = extract_gsm8k_reference(row["answer"])
        text = row["answer"].split("####")[0] + f"The answer is: {reference}"
        if not grade_solution(text, reference).correct:
            failures.append(reference)
    assert failures == []


def test_math500_gold_solutions_grade_correct() -> None:
    rows = read_jsonl(DATA_DIR / "math" / "math500_test.jsonl")
    assert len(rows) == 500
    failures = []
    for row in rows:
        verdict = grade_solution(row["solution"], row["answer"])
        if not verdict.correct:
            failures.append((row["unique_id"], row["answer"], verdict))
    print(f"MATH-500 gold pass rate: {500 - len(failures)}/500; failures: {failures}")
    assert len(failures) <= 5, failures


def test_symbolic_grading_is_quiet(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """math-verify warns that its own timeout is off; ours (``time_limit``) is on, so the warning is noise."""
    import math_verify.grader
    import math_verify.parser

    monkeypatched = pytest.MonkeyPatch()
    for module in (math_verify.parser, math_verify.grader):  # as in a fresh process: the warning not yet shown
        monkeypatched.setattr(module, "TIMEOUT_WARNING_SHOWN", False, raising=False)
    try:
        with caplog.at_level("DEBUG"):
            assert grade("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}").reason == "symbolic_equal"
    finally:
        monkeypatched.undo()
    captured = capfd.readouterr()
    assert "Timeout is disabled" not in captured.out + captured.err + caplog.text


def test_gold_answers_in_every_written_form_are_accepted_and_wrong_ones_rejected() -> None:
    """The first answers of GSM8K test and MATH-500 through ``benchmarks/grader_acceptance.py`` (all of them there)."""
    import importlib.util

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "grader_acceptance.py"
    spec = importlib.util.spec_from_file_location("grader_acceptance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gsm8k = [extract_gsm8k_reference(row["answer"]) for row in read_jsonl(DATA_DIR / "gsm8k" / "test.jsonl")]
    math500 = [row["answer"] for row in read_jsonl(DATA_DIR / "math" / "math500_test.jsonl")]
    for name, answers in (("gsm8k", gsm8k[:150]), ("math500", math500[:100])):
        result = module.run(name, answers, timeout_s=2.0)
        assert result["misses"] == {} and result["false_accepts"] == [], result
        assert len(result["accepted"]) >= 15 and all(total > 0 for _, total in result["rejected"].values())


# --- answer markers of chat models ---

# (solution text, what extract_final_answer returns): the explicit marker nearest the end wins
CHAT_MARKERS = [
    ("**Answer:** 48115525", "48115525"),
    ("**Answer:** $\\frac{3}{4}$", "$\\frac{3}{4}$"),
    ("**Answer**: 18", "18"),
    ("**Final Answer:** 18", "18"),
    ("**Final answer: 18**", "18"),
    ("***Final Answer:*** 18", "18"),
    ("__Answer:__ 18", "18"),
    ("*Answer:* 18.", "18"),
    ("- **Answer:** 18", "18"),
    ("1. **Answer:** 18", "18"),
    ("> **Answer:** 18", "18"),
    ("Answer: 18 square feet per day", "18 square feet per day"),
    ("### Answer: 18", "18"),
    ("Final answer: 18", "18"),
    ("FINAL ANSWER: 18", "18"),
    ("Answer: 18", "18"),
    ("Answer: 18. I hope this helps!", "18"),
    ("Answer: 18 apples", "18 apples"),
    ("Answer: \\text{Evelyn}", "\\text{Evelyn}"),
    ("**Answer:** \\begin{pmatrix} -2 \\\\ 5 \\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ 5 \\end{pmatrix}"),
    ("**Answer:** $x \\in \\mathbb{R}$", "$x \\in \\mathbb{R}$"),
    ("Final Answer: $\\boxed{18}$", "18"),
    ("Final Answer: The final answer is $18$. I hope it is correct.", "$18$"),
    ("The final answer is $\\boxed{6\\sqrt{2}}$", "6\\sqrt{2}"),
    ("So the farm earns $\\boxed{48115525}$ dollars in total.", "48115525"),
    ("The answer is: **18**", "18"),
    ("Therefore, the answer is **18**.", "18"),
    ("#### 18", "18"),
    ("#### 1,024", "1,024"),
    ("#### $\\frac{3}{4}$", "$\\frac{3}{4}$"),
    ("### Final Answer\n18", "18"),
    ("Final Answer:\n18", "18"),
    ("### Final Answer\n\n$\\frac{3}{4}$\n", "$\\frac{3}{4}$"),
    ("**Final Answer**\n\n\\[ 6\\sqrt{2} \\]", "\\[ 6\\sqrt{2} \\]"),
    ("**Final Answer**\n\\[\n\\frac{3}{4}\n\\]", "\\frac{3}{4}"),
    ("**Final Answer:**\n$$\n48115525\n$$\nDone.", "48115525"),
    ("**Answer**\n**18**", "18"),
    ("**Final Answer**\n\\[\n\\boxed{18}\n\\]", "18"),
    # the last marker wins, whatever its kind
    ("Answer: 17\nLet me check that again: 4 + 14 = 18.\n**Final Answer:** 18", "18"),
    ("**Answer:** 17\nWait, I forgot the pears.\nThe answer is: 18", "18"),
    ("The answer is: 17\n#### 18", "18"),
    ("\\boxed{17}\n**Final Answer:** 18", "18"),
    ("**Final Answer:** 18\nActually \\boxed{17}", "17"),
    ("### Final Answer\n17\n\nOn second thought:\n### Final Answer\n18", "18"),
    # not markers: bold text, headings, prose and empty labels
    ("**5 apples** remain", None),
    ("Step 1: **3 + 4 = 7**", None),
    ("#### Step 1: add the apples\n3 + 4 = 7", None),
    ("#### 1. Compute the total\nShe buys 3 + 4 = 7 apples.", None),
    ("#### Summary\nShe has 7 apples.", None),
    ("### Final Answer\nThe total number of apples she has left is 18.", None),
    ("Answer: First we add 3 and 4 to get 7 apples, then she buys more.", None),
    ("Answering takes two steps: 3 + 4 = 7.", None),
    ("Answers: 7 and 8", None),
    ("**Final Answer**", None),
    ("**Final Answer**\n" * 3, None),
    ("### Final Answer\n### Summary\nShe has 7 apples.", None),
    ("**Answer:**", None),
    ("**Final Answer**\n\n### Step 1\n3 + 4 = 7", None),
    ("**Final Answer**\n\\[\n18", None),  # display math never closed
    ("Answer:\n5 + 3 = 8\nShe then buys more.", None),  # our plain prompt's "Answer:" opens the solution
    ("Question: How many?\nAnswer:\n18", None),
    ("The final answer: 18 apples", None),  # "answer" does not open the line
]


@pytest.mark.parametrize(("text", "expected"), CHAT_MARKERS)
def test_extract_final_answer_chat_markers(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


CHAT_SOLUTION = "Step 1: 3 + 4 = 7 apples.\nStep 2: 7 * 2 = 14 pears.\n\n"


@pytest.mark.parametrize(
    ("final_line", "reference", "wrong_reference"),
    [
        ("**Answer:** 48115525", "48115525", "48115526"),
        ("**Answer:** 48,115,525", "48115525", "4811552"),
        ("**Answer:** $48,115,525$", "48115525", "48115524"),
        ("**Answer:** $\\frac{3}{4}$", "\\frac34", "\\frac35"),
        ("**Answer:** $6\\sqrt{2}$", "6\\sqrt{2}", "6\\sqrt{3}"),
        ("**Final Answer:** 18", "18", "7"),
        ("**Final answer: 48115525**", "48115525", "48115526"),
        ("Final answer: 18", "18", "14"),
        ("Final Answer: $\\boxed{48115525}$", "48115525", "48115526"),
        ("The final answer is $\\boxed{6\\sqrt{2}}$", "6\\sqrt{2}", "6"),
        ("Therefore, the total is $\\boxed{\\frac{3}{4}}$ of the cake.", "\\frac{3}{4}", "4"),
        ("#### 48115525", "48115525", "48115526"),
        ("Answer: 18", "18", "7"),
        ("### Final Answer\n48115525", "48115525", "48115526"),
        ("**Final Answer**\n\\[\n\\frac{3}{4}\n\\]", "\\frac{3}{4}", "\\frac{4}{3}"),
        ("**Answer**\n**48115525**", "48115525", "14"),
        ("**Answer:** \\text{Evelyn}", "\\text{Evelyn}", "\\text{Emily}"),
    ],
)
def test_chat_answer_markers_grade_correct(final_line: str, reference: str, wrong_reference: str) -> None:
    verdict = grade_solution(CHAT_SOLUTION + final_line, reference)
    assert verdict.correct, verdict
    assert not grade_solution(CHAT_SOLUTION + final_line, wrong_reference).correct  # not an intermediate (7, 14)


@pytest.mark.parametrize(
    ("final_line", "reference"),
    [
        ("**Answer:** 48115525", "48115525"),
        ("**Final answer: 18**", "18"),
        ("Final Answer: $\\boxed{18}$", "18"),
        ("#### 1,024", "1024"),
        ("### Final Answer\n48115525", "48115525"),
    ],
)
def test_chat_answer_markers_take_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, final_line: str, reference: str
) -> None:
    """A number after a chat marker is read as that number, not found by math-verify's last-number fallback."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("symbolic path used")

    monkeypatch.setattr(grading, "_math_verify_equal", boom)
    verdict = grade_solution(CHAT_SOLUTION + final_line, reference)
    assert verdict.correct and verdict.reason in ("string_equal", "numeric_equal"), verdict
    assert grade(final_line, reference).reason in ("string_equal", "numeric_equal")


@pytest.mark.parametrize(
    ("text", "reference"),
    [
        # bold intermediate results are not answers
        ("**5 apples** remain after lunch.\nShe buys 7 more, so the answer is 12.", "5"),
        ("Step 1: **3 + 4 = 7**\nStep 2: 7 + 2 = 9\n**Final Answer:** 9", "7"),
        ("We find **x = 7** first.\nThen y = 2x = 14.\n\n**Answer:** 14", "7"),
        # the final marker holds a wrong value while an intermediate equals the gold
        ("Step 1: 3 + 4 = 7\n**Final Answer:** 8", "7"),
        ("She has $\\boxed{7}$ apples before lunch.\n**Final Answer:** 9", "7"),
        ("#### 7\nWait, she also buys 2 more.\n#### 9", "7"),
        # an earlier marker is overridden by the last one
        ("**Answer:** 7\nWait, I forgot the 2 pears.\n**Final Answer:** 9", "7"),
        ("Answer: 7\n\n### Final Answer\n9", "7"),
        # no marker at all: an intermediate number, bold or not, is not an answer
        ("Step 1: **3 + 4 = 7**", "7"),
        ("So she has **7** apples.", "7"),
        ("#### 1. Add the apples\n3 + 4 = 7", "7"),
        ("#### 1. Add the apples\n3 + 4 = 7", "1"),
        ("### Final Answer\nShe has 3 + 4 = 7 apples.", "7"),
        ("Answer: First, 3 + 4 = 7 apples.", "7"),
    ],
)
def test_intermediate_results_are_not_answers(text: str, reference: str) -> None:
    assert not grade_solution(text, reference).correct
    assert not grade(text, reference).correct or extract_final_answer(text) is None


def test_last_marker_overrides_earlier_ones() -> None:
    assert grade_solution("**Answer:** 7\nWait, I forgot the 2 pears.\n**Final Answer:** 9", "9").correct
    assert grade_solution("Answer: 7\n\n### Final Answer\n9", "9").correct
    assert grade_solution("#### 7\nWait, she also buys 2 more.\n#### 9", "9").correct
    assert grade_solution("**5 apples** remain after lunch.\nShe buys 7 more, so the answer is 12.", "12").correct


def test_project_answer_format_is_unchanged() -> None:
    """Our own prompt's "The answer is: N" line reads as before, markdown or chat markers earlier on or not."""
    assert grade_solution("2 + 3 = 5.\nThe answer is: 5", "5") == Verdict(True, "5", "5", "string_equal")
    assert grade_solution("**Answer:** 4\nNo: 2 + 3 = 5.\nThe answer is: 5", "5").correct
    assert not grade_solution("**Answer:** 5\nNo: 2 + 2 = 4.\nThe answer is: 4", "5").correct
    assert extract_final_answer("Answer the question.\nThe answer is: 18 dollars. Next question: how many?") == (
        "18 dollars"
    )
    assert extract_final_answer("### Step 1\n3 + 4 = 7\n### Step 2\nThe answer is: 7") == "7"


def test_hostile_chat_marker_texts_return_quickly() -> None:
    texts = [
        "**Answer:**" * 5_000,
        "Answer:\n" * 20_000,
        "**Final Answer**\n" * 10_000,
        "#### " * 20_000,
        "####\n" * 20_000,
        " " * 100_000 + "Answer",
        "\t" * 50_000 + "x",
        "*" * 100_000,
        "_" * 100_000 + "\n",
        "**Final Answer**\n" + "\\[\n" * 20_000,
        "**Final Answer**\n" + "\n" * 100_000 + "18",
        "Answer: " + "a " * 50_000,
    ]
    start = time.perf_counter()
    verdicts = [grade_solution(text, "5", timeout_s=1.0) for text in texts]
    verdicts += [grade(text[:9_000], "5", timeout_s=1.0) for text in texts]
    assert time.perf_counter() - start < HANG_GUARD_S
    assert not any(v.correct for v in verdicts)
