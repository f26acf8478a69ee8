"""How often ``grading.grade`` accepts a correct answer written the way a model writes it, and rejects wrong ones.

Every gold answer of the bundled GSM8K test split and MATH-500 is rewritten in each form below (plain, ``$..$``,
``\\boxed{}``, "The answer is: ..", thousands separators, units, currency signs, decimal / fraction / percent /
scientific / mixed-number forms where they are equal, and the answer lines of chat models: "**Answer:** ..",
"Final answer: ..", "#### ..", "### Final Answer" over the answer, ..) and graded against the gold answer; then wrong
answers (gold + 1, gold x 10, another problem's answer, gold + 1 under a chat marker, gold only as a bold intermediate
result in the working) are graded and must all be rejected. Prints one table per data set and writes
``benchmarks/results/grader_acceptance.json``. Not a timing benchmark: about a minute on one core.

    python benchmarks/grader_acceptance.py [--limit N] [--timeout_s 2]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/grader_acceptance.py` from anywhere
    sys.path.insert(0, str(ROOT))

from trl_stepwise.data import load_math_dataset  # noqa: E402
from trl_stepwise.grading import _normalize, _parse_number, grade, grade_solution  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "grader_acceptance.json"
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LATEX_FRACTION = re.compile(r"(-)?\\[dt]?frac\{(\d+)\}\{(\d+)\}")


def gold_value(answer: str) -> Fraction | None:
    """The exact value of a plain number or simple fraction gold answer (None for anything symbolic)."""
    answer = answer.strip()
    if _PLAIN_NUMBER.fullmatch(answer):
        return Fraction(Decimal(answer))
    match = _LATEX_FRACTION.fullmatch(answer)
    if match:
        value = Fraction(int(match[2]), int(match[3]))
        return -value if match[1] else value
    return None


def _decimal(value: Fraction) -> str | None:
    """Terminating decimal of ``value`` (None if it repeats), always with a decimal point."""
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return None
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text if "." in text else text + ".0"


def _thousands(value: Fraction, sep: str) -> str | None:
    if value.denominator != 1 or abs(value) < 1000:
        return None
    return f"{value.numerator:,}".replace(",", sep)


def _scientific(value: Fraction) -> str | None:
    decimal = _decimal(value)
    if decimal is None or value == 0:
        return None
    return format(Decimal(decimal).normalize(), "e")  # 18 -> 1.8e+1, 0.000008 -> 8e-6


def _scientific_latex(value: Fraction) -> str | None:
    text = _scientific(value)
    if text is None:
        return None
    mantissa, exponent = text.split("e")
    return f"{mantissa} \\times 10^{{{int(exponent)}}}"


def _fraction(value: Fraction) -> str | None:
    if value.denominator == 1:
        return None
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _mixed(value: Fraction, latex: bool = True) -> str | None:
    if value.denominator == 1 or abs(value) < 1:
        return None
    whole, rest = divmod(abs(value.numerator), value.denominator)
    fraction = f"\\frac{{{rest}}}{{{value.denominator}}}" if latex else f" {rest}/{value.denominator}"
    return f"{'-' if value < 0 else ''}{whole}{fraction}"


def _plain(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else (_decimal(value) or _fraction(value) or "")


# Working whose numbers (7, 14, 3, 4, 2) are intermediate results: never an answer, bold or not.
WORKING = "Step 1: **3 + 4 = 7** apples.\nStep 2: 7 * 2 = 14 pears.\n\n"
# Wrong answers that are whole solutions: graded with grade_solution (extraction, then grade), as a reward is.
SOLUTION_KINDS = {"gold as bold working, no marker", "gold as bold working, gold + 1 as **Final Answer:**"}

# form name -> writer(gold text, exact value or None) -> the prediction text, or None when the form does not apply
FORMS: dict[str, Callable[[str, Fraction | None], str | None]] = {
    "plain": lambda a, v: a,
    "$..$": lambda a, v: f"${a}$",
    "\\(..\\)": lambda a, v: f"\\({a}\\)",
    "\\boxed{}": lambda a, v: f"\\boxed{{{a}}}",
    "The answer is: ..": lambda a, v: f"The answer is: {a}",
    "The answer is: $..$": lambda a, v: f"The answer is: ${a}$.",
    "The answer is: $\\boxed{}$": lambda a, v: f"The answer is: $\\boxed{{{a}}}$.",
    "thousands 1,234": lambda a, v: None if v is None else _thousands(v, ","),
    "thousands 1{,}234": lambda a, v: None if v is None else _thousands(v, "{,}"),
    "thousands 1,\\!234": lambda a, v: None if v is None else _thousands(v, ",\\!"),
    "unit word (.. dollars)": lambda a, v: None if v is None else f"{a} dollars",
    "unit \\text{ cm}": lambda a, v: None if v is None else f"{a} \\text{{ cm}}",
    "currency \\$..": lambda a, v: None if v is None else f"\\${_plain(v)}",
    "currency $.. (bare)": lambda a, v: None if v is None else f"The answer is: ${_plain(v)}",
    "decimal": lambda a, v: None if v is None else _decimal(v),
    "fraction": lambda a, v: None if v is None else _fraction(v),
    "percent (..%)": lambda a, v: None if v is None else f"{_plain(v)}\\%",
    "scientific": lambda a, v: None if v is None else _scientific(v),
    "scientific \\times 10^{n}": lambda a, v: None if v is None else _scientific_latex(v),
    "mixed number": lambda a, v: None if v is None else _mixed(v),
    "mixed number, plain 1 4/5": lambda a, v: None if v is None else _mixed(v, latex=False),
    # answer lines of chat models (read by grading's answer markers, never by a last-number fallback)
    "**Answer:** ..": lambda a, v: f"**Answer:** {a}",
    "**Answer:** $..$": lambda a, v: f"**Answer:** ${a}$",
    "**Final Answer:** ..": lambda a, v: f"**Final Answer:** {a}",
    "**Final answer: ..**": lambda a, v: f"**Final answer: {a}**",
    "Final answer: ..": lambda a, v: f"Final answer: {a}",
    "Answer: $..$.": lambda a, v: f"Answer: ${a}$.",
    "Final Answer: $\\boxed{}$": lambda a, v: f"Final Answer: $\\boxed{{{a}}}$",
    "The final answer is $\\boxed{}$. I hope..": lambda a, v: (
        f"The final answer is $\\boxed{{{a}}}$. I hope it is correct."
    ),
    "\\boxed{} inside the last line": lambda a, v: f"So the result is $\\boxed{{{a}}}$ in total.",
    "#### .. (GSM8K's marker, numbers)": lambda a, v: None if v is None else f"#### {a}",
    "### Final Answer / ..": lambda a, v: f"### Final Answer\n{a}",
    "**Final Answer** / \\[..\\]": lambda a, v: f"**Final Answer**\n\\[\n{a}\n\\]",
    "**Answer** / **..**": lambda a, v: f"**Answer**\n**{a if v is not None else f'${a}$'}**",
    "working, then **Answer:** ..": lambda a, v: f"{WORKING}**Answer:** {a}",
}


def wrong_answers(answers: list[str], i: int) -> Iterator[tuple[str, str]]:
    """(kind, wrong answer) pairs for problem ``i``: must all be rejected."""
    value = gold_value(answers[i])
    if value is not None:
        yield "gold + 1", _plain(value + 1)
        if value != 0:
            yield "gold x 10", _plain(value * 10)
        yield "gold + 1 in \\boxed{}", f"\\boxed{{{_plain(value + 1)}}}"
        yield "gold + 1 as The answer is: $..$", f"The answer is: ${_plain(value + 1)}$."
        if value.denominator != 1:
            yield "rounded up to a whole number", _plain(value.numerator // value.denominator + 1)
        wrong = _plain(value + 1)
        yield "gold + 1 as **Answer:** ..", f"**Answer:** {wrong}"
        yield "gold + 1 as #### ..", f"#### {wrong}"
        yield "gold + 1 as ### Final Answer / ..", f"### Final Answer\n{wrong}"
        yield (
            "gold + 1 after an earlier **Answer:** gold",
            f"**Answer:** {answers[i]}\nWait, let me recheck.\n\n#### {wrong}",
        )
        yield (
            "gold as bold working, gold + 1 as **Final Answer:**",
            f"Step 1: **{answers[i]}**\n**Final Answer:** {wrong}",
        )
    yield "gold as bold working, no marker", f"Step 1: 3 + 4 = 7.\nSo there are **{answers[i]}** left.\n"
    for j in (i + 1, i + 7):
        other = answers[j % len(answers)]
        if _different(other, answers[i]):
            yield "another problem's answer", other
            break


def _different(a: str, b: str) -> bool:
    """Clearly different answers: not the same text, nor the same number (symbolic twins are rare and left in)."""
    if _normalize(a) == _normalize(b):
        return False
    try:
        na, nb = _parse_number(_normalize(a)), _parse_number(_normalize(b))
    except Exception:
        return True
    return not (na is not None and nb is not None and na.value == nb.value)


def run(name: str, answers: list[str], timeout_s: float) -> dict:
    accepted: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    rejected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    misses: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    false_accepts: list[tuple[str, str, str]] = []
    for i, answer in enumerate(answers):
        value = gold_value(answer)
        for form, write in FORMS.items():
            prediction = write(answer, value)
            if prediction is None:
                continue
            verdict = grade(prediction, answer, timeout_s=timeout_s)
            accepted[form][1] += 1
            accepted[form][0] += verdict.correct
            if not verdict.correct:
                misses[form].append((prediction, answer, verdict.reason))
        for kind, wrong in wrong_answers(answers, i):
            verdict = (grade_solution if kind in SOLUTION_KINDS else grade)(wrong, answer, timeout_s=timeout_s)
            rejected[kind][1] += 1
            rejected[kind][0] += not verdict.correct
            if verdict.correct:
                false_accepts.append((wrong, answer, verdict.reason))
    return {
        "dataset": name,
        "accepted": {k: tuple(v) for k, v in accepted.items()},
        "rejected": {k: tuple(v) for k, v in rejected.items()},
        "misses": {k: v[:20] for k, v in misses.items()},
        "false_accepts": false_accepts[:50],
    }


def print_table(result: dict) -> None:
    print(f"\n## {result['dataset']}\n")
    print("| correct answer written as | accepted | rate |")
    print("|---|---:|---:|")
    for form, (ok, total) in result["accepted"].items():
        print(f"| {form} | {ok}/{total} | {100 * ok / total:.1f}% |")
    print("\n| wrong answer | rejected | rate |")
    print("|---|---:|---:|")
    for kind, (ok, total) in result["rejected"].items():
        print(f"| {kind} | {ok}/{total} | {100 * ok / total:.1f}% |")
    for form, rows in result["misses"].items():
        for prediction, answer, reason in rows[:5]:
            print(f"  miss [{form}] {prediction!r} vs {answer!r}: {reason}")
    for wrong, answer, reason in result["false_accepts"][:10]:
        print(f"  FALSE ACCEPT {wrong!r} vs {answer!r}: {reason}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="Only the first N answers of each data set.")
    parser.add_argument("--timeout_s", type=float, default=2.0, help="Time limit of one grade call.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    started = time.perf_counter()
    results = []
    for name, split in (("gsm8k", "test"), ("math500", "test")):
        answers = load_math_dataset(name, split, limit=args.limit)["answer"]
        result = run(f"{name} {split} ({len(answers)} gold answers)", answers, args.timeout_s)
        print_table(result)
        results.append(result)
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"results": results, "seconds": seconds}, indent=2) + "\n")
    total_false = sum(len(r["false_accepts"]) for r in results)
    total_miss = sum(sum(t - ok for ok, t in r["accepted"].values()) for r in results)
    return 1 if total_false or total_miss else 0


if __name__ == "__main__":
    sys.exit(main())
