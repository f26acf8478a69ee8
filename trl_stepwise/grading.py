"""Answer extraction and correctness grading for GSM8K (plain numbers) and MATH (LaTeX) answers.

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


# --- extraction ---
#
# The answer markers extract_final_answer reads (``_MARKERS``). Each finds its last non-empty answer in a text; the
# marker that starts nearest the end of the text wins, so a later marker overrides an earlier one of any kind.
#
#   _last_phrase   "The (final) answer is: X", anywhere: our own prompt's answer line; X to the end of its sentence.
#   _last_boxed    \boxed{X} / \fbox{X}, anywhere (MATH, most chat models): "... is $\boxed{18}$ dollars."
#   _last_label    "Answer: X" opening a line, after a bullet, heading or emphasis: "**Answer:** 48115525",
#                  "**Final answer: 18**", "- *Answer*: $\frac34$", "### Final Answer: 7"; X to the end of its
#                  sentence. Or an emphasised / heading / "Final" answer label alone on its line with X on the next
#                  non-empty line or in the \[..\] / $$..$$ block there: "### Final Answer\n18", "**Answer**\n**18**".
#                  A plain "Answer:" alone on a line is not one: it opens the whole solution in our plain prompt.
#   _last_hashes   "#### X", GSM8K's marker: X a number or formula ("#### 1,024"), never a markdown heading.
#
# Apart from our own phrase, a marker counts only if X is a bare answer: a number, formula or a few words ("18 apples",
# "\text{Evelyn}"), not a sentence ("The total is 18", "First, 3 + 4 = 7 ...") nor a numbered heading ("1. Add the
# apples", "Step 2: ..."). Markdown emphasis around X ("**18**") is dropped. Bold text and numbers in the working are
# never answers: a text without a marker has none (no last-number fallback). Every pattern is anchored at a line start
# or bounded, and each blank run after the first follows a required character: extraction stays linear in the text.

_PHRASE = re.compile(r"\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\b[ \t]*")
_BARE_TOKEN = re.compile(r"[^\s$]+")
_EMPH = r"(?:\*{1,3}|_{1,3})"
_LABEL = re.compile(
    r"^[ \t]*(?:>[ \t]*)?(?:(?:[-+*]|\d{1,3}[.)])[ \t]+)?"  # "> ", "- ", "1. "
    r"(?P<heading>\#{1,6}[ \t]*)?(?P<emph>" + _EMPH + r"[ \t]*)?"  # "### ", "**"
    r"(?P<final>final[ \t]+)?answer"
    r"[ \t]*(?:" + _EMPH + r"[ \t]*)?(?:(?P<colon>:)[ \t]*(?:" + _EMPH + r"[ \t]*)?)?"  # "**:", ":**"
    r"(?P<rest>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_HASHES = re.compile(r"^[ \t]*####(?!#)[ \t]*(?P<rest>[^\n]*)", re.MULTILINE)
_DISPLAY_OPEN = {"\\[": "\\]", "$$": "$$"}
_MAX_BLANK_LINES = 3  # between an "Answer" heading and its answer
_MAX_DISPLAY_LINES = 8  # of a \[..\] or $$..$$ block under an "Answer" heading
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+(?:\{[A-Za-z*]*\})?")  # \sqrt, \begin{pmatrix}, \mathbb{R}
_WORD_OR_DIGIT = re.compile(r"[A-Za-z]{2,}|\d")
_HEADING = re.compile(r"(?:step|part|case|problem|question)\b|\d+[.):][ \t]+[^\d\s]", re.IGNORECASE)
_HASHES_ANSWER_START = re.compile(r"[-+−(\[]?[ \t]*(?:\d|\.\d|\$|\\)")  # a number or formula, not "#### Summary"
_MAX_BARE_WORDS = 4  # "18 square feet per day" is an answer, "3 apples plus 4 apples make 7" a sentence


def _brace_partners(text: str) -> dict[int, int]:
    """Map each ``{`` index to its matching ``}`` in one pass (``\\{``, ``\\}``, ``\\\\`` are literals).

    One linear pass instead of a scan per ``\\boxed``: a hostile text full of unclosed ``\\boxed{`` stays O(n).
    """
    partners: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            partners[stack.pop()] = i
        i += 1
    return partners


def _unemphasise(s: str) -> str:
    """``s`` without the markdown emphasis (``**``, ``*``, ``__``, ``_``) around it, nor an end-of-sentence dot."""
    s = s.strip().rstrip(".").strip().lstrip("*_")
    core = s.rstrip("*_")
    if not core.endswith(("^", "\\")):  # a^* (a conjugate) keeps its star
        s = core
    return s.strip().rstrip(".").strip()


def _sentence(s: str) -> str:
    """The first sentence of ``s``, without emphasis or its final dot."""
    return _unemphasise(_SENTENCE_END.split(s, maxsplit=1)[0])


def _bare_answer(s: str) -> bool:
    """Is ``s`` an answer alone (number, formula, a few words), not a sentence or a heading?"""
    if not s or s.endswith(":") or _HEADING.match(s):
        return False
    tokens = _WORD_OR_DIGIT.findall(_LATEX_COMMAND.sub(" ", _LATEX_TEXT.sub(" ", s)))
    words = [t for t in tokens if not t.isdigit()]
    if len(words) > _MAX_BARE_WORDS:
        return False
    if len(words) == len(tokens):  # no number: a word answer ("Evelyn", "even") or a formula of one-letter symbols
        return len(words) <= 2
    return not tokens[0].isalpha()  # a word before the first number opens a sentence ("The total is 18")


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last non-empty ``\\boxed{..}`` / ``\\boxed x`` / ``\\fbox{..}``."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    partners = _brace_partners(text)
    for match in reversed(starts):
        i = match.end()
        if i < len(text) and text[i] == "{":
            if i not in partners:
                continue  # unclosed
            content = text[i + 1 : partners[i]].strip()
        else:
            token = _BARE_TOKEN.match(text, i)
            content = token.group(0).rstrip(".,;") if token else ""
        if content:
            return match.start(), content
    return None


def _last_phrase(text: str) -> tuple[int, str] | None:
    """(start, answer) of the last non-empty "The answer is: X" (answer cut at the end of its sentence)."""
    for match in reversed(list(_PHRASE.finditer(text))):
        answer = _sentence(match.group(1))
        if answer:
            return match.start(), answer
    return None


def _line_at(text: str, i: int) -> tuple[str, int]:
    """The line starting at ``i`` (without its newline) and the index just past it."""
    end = text.find("\n", i)
    end = len(text) if end < 0 else end
    return text[i:end], end + 1


def _answer_below(text: str, i: int) -> str | None:
    """The answer under an "Answer" heading whose line ends before ``i``: the next non-empty line or display block."""
    for _ in range(_MAX_BLANK_LINES + 1):
        if i > len(text):
            return None
        line, i = _line_at(text, i)
        line = line.strip()
        if line:
            break
    else:
        return None
    if line.startswith("#") or _LABEL.match(line):
        return None  # another heading or label, not an answer
    close = _DISPLAY_OPEN.get(line)
    if close is None:
        answer = _unemphasise(line)
        return answer if _bare_answer(answer) else None
    body = []
    for _ in range(_MAX_DISPLAY_LINES):
        if i > len(text):
            return None
        line, i = _line_at(text, i)
        if line.strip() == close:
            answer = " ".join(body).strip()
            return answer if answer and _bare_answer(answer) else None
        body.append(line.strip())
    return None


def _last_label(text: str) -> tuple[int, str] | None:
    """(start, answer) of the last "Answer: X" / "**Final Answer:** X" line, or "Answer" heading over X."""
    for match in reversed(list(_LABEL.finditer(text))):
        rest = match["rest"].strip()
        if rest:
            if not match["colon"] and _unemphasise(rest):
                continue  # "Answering ...", "Answers: ..." or an emphasised word after "Answer"
            answer = _sentence(rest)
            if answer and _bare_answer(answer):
                return match.start(), answer
            if answer:
                continue  # a sentence after the label
        if not (match["heading"] or match["emph"] or match["final"]):
            continue  # a plain "Answer:" line opens the whole solution in our plain prompt format, not its answer
        answer = _answer_below(text, match.end() + 1)
        if answer:
            return match.start(), answer
    return None


def _last_hashes(text: str) -> tuple[int, str] | None:
    """(start, answer) of the last GSM8K-style ``#### X`` line that holds an answer (not a markdown heading)."""
    if "####" not in text:
        return None
    for match in reversed(list(_HASHES.finditer(text))):
        if _HEADING.match(match["rest"].strip()):
            continue  # "#### 1. Add the apples"
        answer = _sentence(match["rest"])
        if _HASHES_ANSWER_START.match(answer) and _bare_answer(answer):
            return match.start(), answer
    return None


# The markers, in no order of priority: the one that starts last in the text wins.
_MARKERS: tuple[Callable[[str], tuple[int, str] | None], ...] = (_last_phrase, _last_boxed, _last_label, _last_hashes)


def extract_final_answer(text: str) -> str | None:
    """The answer of the answer marker (``_MARKERS``) that starts last in ``text``; None if it holds none."""
    if not text:
        return None
    candidates = [c for c in (find(text) for find in _MARKERS) if c is not None]
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def extract_gsm8k_reference(solution: str) -> str:
    """The final answer of a GSM8K worked solution: the text after ``####``, commas removed."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '#### <answer>' line: {solution[-200:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


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


def _answer_part(text: str) -> str:
    """The answer of the last answer marker in ``text`` ("" if its markers hold no answer); ``text`` if it has none.

    ``grade`` may be handed a whole answer line ("The answer is: X", ``\\boxed{X}``, "**Answer:** X"): the marker
    must not reach the number or symbolic parsers, nor may a sentence after "Answer:" (no last-number fallback).
    """
    answer = extract_final_answer(text)
    if answer is not None:
        return answer
    if _PHRASE.search(text) or _BOXED.search(text) or _HASHES.search(text):
        return ""
    if any(m["colon"] or not m["rest"].strip("*_ \t") for m in _LABEL.finditer(text)):
        return ""
    return text


def _grade(prediction: str, reference: str, timeout_s: float) -> Verdict:
    prediction, reference = _answer_part(prediction), _answer_part(reference)
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
