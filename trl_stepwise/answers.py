"""Answer extraction: the final answer a solution states, read from the answer markers models write.

Kept apart from grading (``trl_stepwise.grading`` decides whether two answers are equal): extraction is pure text
processing, linear in the text, with no parser and no time limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["answer_part", "extract_final_answer", "extract_gsm8k_reference"]


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


def answer_part(text: str) -> str:
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
