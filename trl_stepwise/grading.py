"""Correctness grading for GSM8K (plain numbers) and MATH (LaTeX) answers (extraction: ``trl_stepwise.answers``).

Grading is a reward signal called thousands of times per minute, so it goes cheapest-first: normalised string
equality, then exact rational comparison of plain numbers (regex + ``fractions``, no sympy), and only then
math-verify/sympy under a thread-safe time limit. Inputs that could blow up inside one uninterruptible C call (huge
powers, factorials) are refused up front. ``grade`` never raises and never hangs: every failure is a ``Verdict`` with a
machine-friendly ``reason``.

``grade`` takes the answer alone or a whole answer line ("The answer is: $6\\sqrt{2}$", ``\\boxed{..}``, chat models'
"**Answer:** 18", "Final answer: 18", "#### 18"; the markers are listed under "extraction" below). Accepted
forms of a number: thousands separators (``1,234``, ``1{,}234``, ``1,\\!234``), units and currency signs, percent,
``\\frac``/``a/b``, decimals, scientific notation (``8e-06``, ``8 \\times 10^{-6}``) and mixed numbers: a whole number
directly before a proper fraction is added to it (``1\\frac{4}{5}`` and ``1 4/5`` are 9/5, as in the MATH data), never
multiplied. ``benchmarks/grader_acceptance.py`` measures these forms on every bundled gold answer.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from trl_stepwise._timeout import Timeout, time_limit
from trl_stepwise.answers import answer_part, extract_final_answer, extract_gsm8k_reference
from trl_stepwise.quiet import add_log_filter

__all__ = ["Verdict", "extract_final_answer", "extract_gsm8k_reference", "grade", "grade_solution"]

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1_000  # longer "answers" are junk: never handed to the symbolic parsers
MAX_NUMBER_CHARS = 4_000  # below CPython's 4300-digit int(str) limit
MAX_SCI_EXPONENT = 10_000  # 1e10000 is a cheap exact integer; 1e999999999 is not
MAX_POWER_EXPONENT = 100_000  # per power: 2^{100000} is fine, 9^{9^9} hangs in C
MAX_POWER_PRODUCT = 1_000_000  # product over all powers, catches (10^{1000})^{1000}
MAX_FACTORIAL = 10_000


@dataclass(frozen=True)
class Verdict:
    """Outcome of grading one prediction against one reference."""

    correct: bool
    prediction: str | None  # normalised prediction (None if nothing could be parsed)
    reference: str | None  # normalised reference
    reason: str  # e.g. numeric_equal, numeric_mismatch, symbolic_equal, string_equal, no_answer, timeout, too_large


# --- normalisation ---

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_SPACING = re.compile(r"(?<!\\)\\(?:[!,;:]|left\b|right\b|displaystyle\b)")
_CHOICE = re.compile(r"\(?([A-Ea-e])\)?")
_MATH_DELIMS = re.compile(r"^\\[(\[](.*)\\[)\]]$", re.DOTALL)
_DOLLAR = re.compile(r"(?<!\\)\$")


def _strip_delims(s: str) -> str:
    """Drop math delimiters (``$``, ``\\(..\\)``, ``\\[..\\]``; ``\\$`` is kept) and trailing sentence punctuation."""
    s = _DOLLAR.sub("", s).strip().rstrip(".").strip()
    match = _MATH_DELIMS.fullmatch(s)
    return (match.group(1) if match else s).strip().rstrip(".").strip()


def _normalize(s: str) -> str:
    """Canonical surface form for the cheap string and number comparisons (not a semantic normal form)."""
    s = _strip_delims(s)
    s = s.replace("−", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r",\\!\s*", ",", s)  # 10,\! 080 -> 10,080
    s = _SPACING.sub("", s)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, "\\ " a matrix row break
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "%").replace("\\$", "").replace("$", "")
    s = " ".join(s.split()).rstrip(".").strip()
    choice = _CHOICE.fullmatch(s)
    return choice.group(1).upper() if choice else s


# --- numeric path ---

_UNIT = r"(?P<unit>(?:\s+[A-Za-z]{2,}\.?)*)"  # trailing unit words ("18 dollars", "5 cm"), but not "5 x"
_NUMBER = re.compile(
    r"(?:[A-Za-z]\w*\s*=\s*)?"  # "x = 5"
    r"(?P<sign>[-+])?\s*"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d*)(?:\.(?P<frac>\d*))?"
    r"(?:[eE](?P<exp>[-+]?\d+)"  # 8e-06
    r"|\s*(?:\\times|\\cdot|\*|×)\s*10\s*(?:\^|\*\*)\s*\{?\s*(?P<exp10>[-+]?\d+)\s*\}?)?"  # 8 \times 10^{-6}
    r"\s*(?P<pct>%)?" + _UNIT
)
_FRAC = r"(?:\\frac\s*(?:\{\s*(?P<n1>\d+)\s*\}|(?P<n2>\d))\s*(?:\{\s*(?P<d1>\d+)\s*\}|(?P<d2>\d)))"
# A whole number right before a proper fraction is a mixed number, 1\frac{4}{5} = 1 4/5 = 9/5 (what the MATH data and
# math-verify mean by it), never a product: "1 4/5" needs the space, or it would be the fraction 14/5.
_FRACTION = re.compile(
    r"(?P<sign>-)?\s*(?:(?P<whole>\d+)\s*(?=\\frac))?"
    + _FRAC
    + r"\s*(?P<pct>%)?"
    + _UNIT
    + r"|(?P<sign3>-)?\s*(?:(?P<whole3>\d+)\s+)?(?P<n3>\d+)\s*/\s*(?P<d3>\d+)\s*(?P<pct3>%)?"
    + _UNIT.replace("unit", "unit3")
)


class _TooLarge(Exception):
    """A number we refuse to materialise (``1e999999999``)."""


@dataclass(frozen=True)
class _Number:
    value: Fraction
    percent: bool


def _parse_number(s: str) -> _Number | None:
    """Exact value of a plain number (``-1,000.50``, ``1e3``, ``50%``, ``18 dollars``, ``\\frac{1}{2}``, ``3/4``,
    ``8 \\times 10^{-6}``, the mixed number ``1\\frac{4}{5}``)."""
    match = _FRACTION.fullmatch(s)
    if match:
        num = int(match["n1"] or match["n2"] or match["n3"])
        den = int(match["d1"] or match["d2"] or match["d3"])
        whole = match["whole"] or match["whole3"]
        if den == 0 or (whole is not None and num >= den):
            return None  # 1\frac{5}{4} is not a mixed number; leave it to the symbolic path
        value = Fraction(num, den) + int(whole or 0)
        negative = match["sign"] or match["sign3"]
        return _Number(-value if negative else value, bool(match["pct"] or match["pct3"]))
    match = _NUMBER.fullmatch(s)
    if not match or not (match["int"] or match["frac"]):
        return None
    digits = match["int"].replace(",", "") + (match["frac"] or "")
    value = Fraction(int(digits), 10 ** len(match["frac"] or ""))
    exp_text = match["exp"] or match["exp10"]
    if exp_text:
        exp = int(exp_text)
        if abs(exp) > MAX_SCI_EXPONENT:
            raise _TooLarge
        value *= Fraction(10) ** exp
    return _Number(-value if match["sign"] == "-" else value, bool(match["pct"]))


def _numbers_equal(a: _Number, b: _Number) -> bool:
    """Exact equality; a percentage may also match its bare number (GSM8K writes 50% as 50) or its fraction (0.5)."""
    if a.value == b.value:
        return True
    return (a.percent and a.value / 100 == b.value) or (b.percent and b.value / 100 == a.value)


# --- symbolic path ---

_POWER = re.compile(r"(?:\^|\*\*)\s*(\{|\(|[-+]?[\d.]+|\\?[A-Za-z]+)")
_NUMERIC_POWER = re.compile(r"[\d.})]\s*(?:\^|\*\*)\s*\{?\s*[-+(]?\s*\d")
_CHAINED_POWER = re.compile(r"(?:\^|\*\*)\s*[-+]?[\d.]+\s*(?:\^|\*\*)")  # 9^9^9, 9**9**9
_FACTORIAL = re.compile(r"(\d+)\s*!")
_WORD = re.compile(r"[A-Za-z]{2,}(?: [A-Za-z]+)*")


def _group_after(s: str, i: int) -> str:
    """The bracketed group whose opening bracket is at ``s[i]`` (to the end of ``s`` if unclosed)."""
    close = {"{": "}", "(": ")"}[s[i]]
    depth = 0
    for j in range(i, len(s)):
        depth += {s[i]: 1, close: -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j]
    return s[i + 1 :]


def _too_large(s: str) -> bool:
    """Would sympy have to build an astronomically large number? (huge or nested exponents, big factorials)

    Such work happens inside single C calls that no timeout can interrupt, so it must be refused up front.
    """
    if _CHAINED_POWER.search(s):
        return True
    product = 1
    for match in _POWER.finditer(s):
        token = match.group(1)
        exponent = _group_after(s, match.start(1)) if token in "{(" else token
        if _NUMERIC_POWER.search(exponent) or "!" in exponent:
            return True  # a tower such as 9^{9^9}; symbolic nesting (e^{-x^2}) is fine
        try:
            size = abs(float(exponent.strip().replace(",", "")))
        except ValueError:
            continue  # symbolic exponent such as x or \pi
        if size > MAX_POWER_EXPONENT:
            return True
        product *= max(size, 1.0)
        if product > MAX_POWER_PRODUCT:
            return True
    return any(len(m.group(1)) > 6 or int(m.group(1)) > MAX_FACTORIAL for m in _FACTORIAL.finditer(s))


_warm_lock = threading.Lock()
_warm = False


def silence_math_verify_timeout_notice() -> None:
    """math-verify warns that its own timeouts are off: ours (``time_limit``) guard every call instead."""
    for name in ("math_verify.parser", "math_verify.grader"):
        add_log_filter(name, "Timeout is disabled")


def _warm_up(parse: Callable[..., list]) -> None:
    """math-verify's first parse builds its LaTeX grammar (~1-2 s): do that once, outside any time limit."""
    global _warm
    with _warm_lock:
        if not _warm:
            parse("$1$", parsing_timeout=None)
            _warm = True


def _math_verify_equal(prediction: str, reference: str, timeout_s: float) -> tuple[bool, str]:
    """Symbolic equivalence via math-verify; its own timeouts (signal-based, main thread only) are off for ours."""
    # Deferred import: sympy + lark cost ~1 s, paid only once the fast paths fail. Outside the time limit on purpose:
    # interrupting an import half-way would leave a broken module behind.
    from math_verify import parse, verify

    silence_math_verify_timeout_notice()
    _warm_up(parse)
    with time_limit(timeout_s):
        gold = parse(f"${reference}$", parsing_timeout=None)
        if not gold:
            return False, "unparsable_reference"
        target = parse(f"${prediction}$", parsing_timeout=None)
        if not target:
            return False, "unparsable_prediction"
        if verify(gold, target, timeout_seconds=None):
            return True, "symbolic_equal"
        return False, "symbolic_mismatch"


# --- grading ---


def _grade(prediction: str, reference: str, timeout_s: float) -> Verdict:
    prediction, reference = answer_part(prediction), answer_part(reference)
    pred, ref = _normalize(prediction), _normalize(reference)
    if not pred:
        return Verdict(False, None, ref, "no_answer")
    if pred == ref:
        return Verdict(True, pred, ref, "string_equal")
    if len(pred) > MAX_NUMBER_CHARS or len(ref) > MAX_NUMBER_CHARS:
        return Verdict(False, pred, ref, "too_long")
    try:
        pred_num, ref_num = _parse_number(pred), _parse_number(ref)
    except _TooLarge:
        return Verdict(False, pred, ref, "too_large")
    if pred_num is not None and ref_num is not None:
        equal = _numbers_equal(pred_num, ref_num)
        return Verdict(equal, pred, ref, "numeric_equal" if equal else "numeric_mismatch")
    if _WORD.fullmatch(ref) and not ref.startswith("\\"):  # a word answer ("Evelyn", "even"): never symbolic
        equal = pred.casefold() == ref.casefold()
        return Verdict(equal, pred, ref, "string_equal" if equal else "string_mismatch")
    raw_pred, raw_ref = _strip_delims(prediction), _strip_delims(reference)
    if len(raw_pred) > MAX_ANSWER_CHARS or len(raw_ref) > MAX_ANSWER_CHARS:
        return Verdict(False, pred, ref, "too_long")
    if _too_large(raw_pred) or _too_large(raw_ref):
        return Verdict(False, pred, ref, "too_large")
    equal, reason = _math_verify_equal(raw_pred, raw_ref, timeout_s)
    return Verdict(equal, pred, ref, reason)


def grade(prediction: str | None, reference: str, timeout_s: float = 2.0) -> Verdict:
    """Is ``prediction`` (an extracted final answer) equivalent to ``reference``? Never raises; ~timeout_s at most."""
    try:
        if prediction is None:
            return Verdict(False, None, _safe_normalize(reference), "no_answer")
        prediction, reference = str(prediction), str(reference)  # tolerate ints from data loaders
        if len(prediction) > 10 * MAX_ANSWER_CHARS or len(reference) > 10 * MAX_ANSWER_CHARS:
            return Verdict(False, None, _safe_normalize(reference), "too_long")
        return _grade(prediction, reference, timeout_s)
    except Timeout:
        return Verdict(False, _safe_normalize(prediction), _safe_normalize(reference), "timeout")
    except Exception as exc:  # a reward function must not crash a training run over one odd sample
        logger.debug("grading failed for %r vs %r: %r", prediction, reference, exc)
        return Verdict(False, _safe_normalize(prediction), _safe_normalize(reference), "error")


def grade_solution(text: str, reference: str, timeout_s: float = 2.0) -> Verdict:
    """Extract the final answer from a full model solution and grade it."""
    return grade(extract_final_answer(text), reference, timeout_s)


def _safe_normalize(s: object) -> str | None:
    try:
        return None if s is None else _normalize(str(s))[:MAX_ANSWER_CHARS]
    except Exception:
        return None
