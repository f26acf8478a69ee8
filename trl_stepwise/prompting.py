"""Prompt layer: system prompts, solution -> step conversion and few-shot chat rendering.

The rollout engine generates one step (one line) at a time, so every step here is a single line ending with "\\n"
and the final step is always ``The answer is: X``. Few-shot examples are drawn once per builder so the rendered
prefix (system prompt + shots) is identical across problems and its key/value cache can be reused.
"""

from __future__ import annotations

import copy
import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl_stepwise.flavours import get_flavour

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ANSWER_PREFIX = "The answer is:"
# Bundled prompt name -> file under trl_stepwise/prompts/. "arithmetic" reuses GSM8K's calculator-style prompt.
BUNDLED_PROMPTS = {
    "gsm8k": "gsm8k_system.txt",
    "math": "math_system.txt",
    "arithmetic": "gsm8k_system.txt",
    "countdown": "countdown_system.txt",
}


def load_system_prompt(name_or_path: str | None, flavour: str = "gsm8k") -> str:
    """Return system prompt text: None -> the flavour's default, a bundled name, or a file's (stripped) text.

    Bundled names win over same-named files in the working directory, so configs stay portable.
    """
    default = get_flavour(flavour).system_prompt
    name = default if name_or_path is None else name_or_path
    if name in BUNDLED_PROMPTS:
        return resources.files("trl_stepwise").joinpath("prompts", BUNDLED_PROMPTS[name]).read_text("utf-8").strip()
    path = Path(name)
    if path.is_file():
        return path.read_text("utf-8").strip()
    raise ValueError(
        f"System prompt {name_or_path!r} is neither a bundled prompt ({', '.join(BUNDLED_PROMPTS)}) "
        "nor an existing file."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Solution -> steps


def answer_step(answer: str) -> str:
    """The canonical final step every example ends with, so the model learns one parseable answer line."""
    return f"{ANSWER_PREFIX} {answer.strip()}\n"


def _is_answer_step(step: str, answer: str | None = None) -> bool:
    text = " ".join(step.split()).rstrip(".")
    if not text.startswith(ANSWER_PREFIX):
        return False
    return answer is None or text[len(ANSWER_PREFIX) :].strip() == " ".join(answer.split())


def gsm8k_solution_to_steps(solution: str) -> list[str]:
    """GSM8K worked solution -> one step per non-blank line; ``#### N`` becomes ``The answer is: N`` (commas removed).

    Calculator annotations ``<<a=b>>`` are kept: the model is taught to write them and the rollout engine uses them.
    """
    steps = []
    for line in solution.splitlines():
        text, marker, final = line.partition("####")
        text = " ".join(text.split())
        if text:
            steps.append(text + "\n")
        if marker:
            steps.append(answer_step(final.strip().replace(",", "")))
            break
    return steps


_BEGIN_RE = re.compile(r"\\begin\{([^{}]*)\}")
_END_RE = re.compile(r"\\end\{([^{}]*)\}")
_ABBREVIATIONS = frozenset(
    {"e.g.", "i.e.", "etc.", "vs.", "cf.", "mr.", "mrs.", "ms.", "dr.", "st.", "no.", "fig.", "approx.", "resp."}
)


_NON_SPACE_RE = re.compile(r"\S")
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")


def _next_char(text: str, i: int) -> str:
    """First non-whitespace character at or after ``i`` ('' at the end)."""
    m = _NON_SPACE_RE.search(text, i)
    return m.group(0) if m else ""


def _split_latex_text(text: str) -> list[str]:
    """Split LaTeX-laden prose into sentence-like chunks, never inside math, environments, braces or [asy] blocks.

    A chunk ends after a sentence terminator followed by whitespace, after a display formula whose content ends with
    "." or that is followed by an uppercase letter, at a blank line, or at a line break before an uppercase letter.
    """
    cuts = [0]
    i, n = 0, len(text)
    mode: str | None = None  # None (prose), "$", "$$", "\\[", "\\(", "env" or "asy"
    env_name, env_depth, math_start, brace_depth = "", 0, 0, 0

    def close_display(content_end: int, resume: int) -> None:
        nonlocal mode
        mode = None
        sentence_ended = text[math_start:content_end].rstrip().endswith(".") or _next_char(text, resume).isupper()
        if brace_depth == 0 and sentence_ended:
            cuts.append(resume)

    while i < n:
        c = text[i]
        if mode is None:
            if text.startswith("[asy]", i):
                mode, i = "asy", i + 5
            elif c == "\\":
                nxt = text[i + 1 : i + 2]
                begin = _BEGIN_RE.match(text, i)
                if nxt in ("[", "("):
                    mode, math_start, i = "\\" + nxt, i + 2, i + 2
                elif begin:
                    mode, env_name, env_depth, math_start, i = "env", begin.group(1), 1, begin.end(), begin.end()
                else:
                    i += 2  # escaped char such as \$ or \{, or a command
            elif c == "$":
                if text.startswith("$$", i):
                    mode, math_start, i = "$$", i + 2, i + 2
                else:
                    mode, i = "$", i + 1
            else:
                if c == "{":
                    brace_depth += 1
                elif c == "}":
                    brace_depth = max(0, brace_depth - 1)
                elif brace_depth == 0 and c in ".!?" and (i + 1 == n or text[i + 1].isspace()):
                    words = text[cuts[-1] : i + 1].split()
                    if not (words and words[-1].lower() in _ABBREVIATIONS) and not _next_char(text, i + 1).islower():
                        cuts.append(i + 1)
                elif brace_depth == 0 and c == "\n":
                    if _BLANK_LINE_RE.match(text, i) or _next_char(text, i).isupper():
                        cuts.append(i)
                i += 1
        elif mode == "asy":
            if text.startswith("[/asy]", i):
                mode, i = None, i + 6
            else:
                i += 1
        elif c == "\\":
            nxt = text[i + 1 : i + 2]
            if (mode, nxt) == ("\\[", "]"):
                close_display(i, i + 2)
            elif (mode, nxt) == ("\\(", ")"):
                mode = None
            elif mode == "env" and (m := _BEGIN_RE.match(text, i)) and m.group(1) == env_name:
                env_depth += 1
                i = m.end() - 2
            elif mode == "env" and (m := _END_RE.match(text, i)) and m.group(1) == env_name:
                env_depth -= 1
                if env_depth == 0:
                    close_display(i, m.end())
                i = m.end() - 2
            i += 2
        elif c == "$" and mode == "$$" and text.startswith("$$", i):
            close_display(i, i + 2)
            i += 2
        else:
            if c == "$" and mode == "$":
                mode = None
            i += 1
    cuts.append(n)
    return [" ".join(text[a:b].split()) for a, b in pairwise(cuts)]


def math_solution_to_steps(solution: str, answer: str) -> list[str]:
    """MATH LaTeX solution -> single-line sentence steps (``\\boxed`` kept) ending with ``The answer is: {answer}``.

    Newlines inside formulas are folded into spaces: a step must be exactly one line for stepwise generation.
    """
    steps: list[str] = []
    for chunk in _split_latex_text(solution):
        if not chunk:
            continue
        if steps and not re.search(r"\w|\\", chunk):  # stray punctuation after a display formula: glue it back
            steps[-1] = steps[-1][:-1] + chunk + "\n"
        else:
            steps.append(chunk + "\n")
    if answer.strip() and not (steps and _is_answer_step(steps[-1], answer)):
        steps.append(answer_step(answer))
    return steps


def solution_to_steps(row: Mapping[str, Any], flavour: str) -> list[str]:
    """Convert a normalised data row (``solution``, ``answer``) to steps for the given flavour."""
    if get_flavour(flavour).solution_format == "latex":
        return math_solution_to_steps(row["solution"], str(row["answer"]))
    steps = gsm8k_solution_to_steps(row["solution"])
    answer = str(row.get("answer", "")).strip()
    if answer and not (steps and _is_answer_step(steps[-1])):  # loader may have dropped the "#### N" line
        steps.append(answer_step(answer.replace(",", "")))
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# Few-shot sources

WORKED_SAMPLE = 32  # rows inspected to decide whether a source has worked solutions


def has_worked_solutions(rows: Sequence[Mapping[str, Any]], flavour: str) -> bool:
    """Do most rows carry a worked solution (a step before the final answer line), not just a final answer?

    Shown bare answers, a model answers in one line with no steps and no calculator: accuracy collapses (0% against
    14% with worked examples, for the embedded model on 100 word problems).
    """
    sample = [rows[i] for i in range(min(len(rows), WORKED_SAMPLE))]
    if not sample:
        return False
    worked = 0
    for row in sample:
        if "steps" in row:
            worked += len(row["steps"]) > 1
        elif str(row.get("solution") or "").strip():
            worked += len(solution_to_steps(row, flavour)) > 1
    return 2 * worked > len(sample)


@dataclass(frozen=True)
class AlternatingExamples:
    """Worked examples from several sources that alternate in the prompt, one from each in turn: with 2 shots, one
    short real solution and one generated one serve the embedded model both untrained and trained, where either
    source alone serves only one of them. ``max_example_chars`` applies unless the prompt builder sets its own;
    ``shots`` is how many to show where the user did not say (None: the caller's default)."""

    sources: tuple[Sequence[Mapping[str, Any]], ...]
    max_example_chars: int | None = None
    shots: int | None = None

    @staticmethod
    def sources_of(examples: Any) -> tuple:
        """The example sets behind a few-shot value: its sources when it alternates, else the one set."""
        return examples.sources if isinstance(examples, AlternatingExamples) else (examples,)


def with_worked_examples(
    rows: Sequence[Mapping[str, Any]], flavour: str, source: str = "the few-shot source"
) -> tuple[Sequence[Mapping[str, Any]] | AlternatingExamples, str | None]:
    """``(rows, None)`` when ``rows`` have worked solutions; else the flavour's bundled worked examples and a note
    saying so (for the user: the fallback changes what the prompt shows)."""
    if has_worked_solutions(rows, flavour):
        return rows, None
    chosen = get_flavour(flavour)
    if not chosen.worked_examples:
        return rows, (
            f"the few-shot examples from {source} have no worked solutions (final answers only), which teaches the "
            f"model to answer without steps, and the {flavour!r} flavour names no worked examples to use instead."
        )
    from trl_stepwise.data import load_math_dataset

    pairs = chosen.worked_examples
    sources = tuple(load_math_dataset(name, split=split).to_list() for name, split in pairs)
    described = " alternating with ".join(f"the bundled {name} {split} split" for name, split in pairs)
    if chosen.worked_example_chars is not None:
        described += f" (examples of at most {chosen.worked_example_chars} characters)"
    note = (
        f"the few-shot examples from {source} have no worked solutions (final answers only), which teaches the model "
        f"to answer without steps; using worked examples from {described} instead (choose others with "
        "--few_shot_dataset / --few_shot_dataset_name)."
    )
    return AlternatingExamples(sources, chosen.worked_example_chars, chosen.worked_example_shots), note


# ---------------------------------------------------------------------------------------------------------------------
# Few-shot prompt rendering


@dataclass
class FewShotExample:
    """A solved example shown in the prompt; ``steps`` are single lines ending with "\\n"."""

    question: str
    steps: list[str] = field(default_factory=list)


def _norm_question(question: str) -> str:
    return " ".join(question.split()).casefold()


class PromptBuilder:
    """Render chat prompts with a fixed few-shot pool so the system + shots prefix is shared across problems.

    ``system_prompt`` is the literal text (use :func:`load_system_prompt` for names/paths); None -> bundled default.
    The pool holds ``k`` examples plus ``n_spare`` spares (or ``pool_size``, if larger): a problem whose question is in
    the pool gets the first ``k`` other examples instead, so it never sees its own solution. ``max_example_chars``
    (opt-in) skips examples whose question + solution is longer, to fit a small model's context budget.

    :meth:`rotated` shows another ``k`` of the pool each round (training step), the same for every problem of the
    round: a model trained on one fixed pair learns to follow that pair, and its gains vanish under other examples.
    """

    n_spare = 2

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        examples: Sequence[FewShotExample] | Sequence[Mapping[str, Any]] | AlternatingExamples,
        k: int = 4,
        system_prompt: str | None = None,
        flavour: str = "gsm8k",
        seed: int = 0,
        *,
        max_example_chars: int | None = None,
        pool_size: int | None = None,
    ) -> None:
        get_flavour(flavour)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if pool_size is not None and pool_size < k:
            raise ValueError(f"pool_size={pool_size} is smaller than k={k}; use at least k, or None for k + spares.")
        self.tokenizer = tokenizer
        self.k = k
        self.flavour = flavour
        self.seed = seed
        if max_example_chars is None and isinstance(examples, AlternatingExamples):
            max_example_chars = examples.max_example_chars
        self.max_example_chars = max_example_chars
        self.pool_size = max(k + self.n_spare, pool_size or 0)
        self.round: int | None = None  # None: the first k of the pool (evaluation); else see rotated()
        self.system_prompt = load_system_prompt(None, flavour) if system_prompt is None else system_prompt
        self.pool = self._draw_pool(examples)
        if len(self.pool) < k:
            raise ValueError(f"Need at least k={k} examples with distinct questions, got {len(self.pool)}.")
        self._use_template = tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
        self._warned_prefix = False
        self._prefix_cache: dict[tuple[int, ...], str] = {}
        if tokenizer is not None and not self._use_template:  # tokenizer=None asks for plain text explicitly
            logger.warning("Tokenizer has no chat template; PromptBuilder falls back to a plain-text prompt format.")

    def _draw_pool(
        self, examples: Sequence[FewShotExample] | Sequence[Mapping[str, Any]] | AlternatingExamples
    ) -> list[FewShotExample]:
        """Seeded draw of k + spare examples with distinct questions; only drawn rows are converted to steps. From
        alternating sources, each source's own draw in turn."""
        if isinstance(examples, AlternatingExamples):
            draws = [self._draw_pool(rows) for rows in examples.sources]
            turns = [draw[i] for i in range(self.pool_size) for draw in draws if i < len(draw)]
            return self._first_usable(turns, range(len(turns)))
        order = list(range(len(examples)))
        random.Random(self.seed).shuffle(order)
        return self._first_usable(examples, order)

    def _first_usable(
        self, examples: Sequence[FewShotExample] | Sequence[Mapping[str, Any]], order: Iterable[int]
    ) -> list[FewShotExample]:
        """The first ``pool_size`` usable examples with distinct questions, taken in ``order``."""
        pool: list[FewShotExample] = []
        seen: set[str] = set()
        for idx in order:
            if len(pool) == self.pool_size:
                break
            raw = examples[idx]
            example = self._to_example(raw)
            if not self._usable(example, converted=not isinstance(raw, FewShotExample)):
                continue
            key = _norm_question(example.question)
            if key not in seen:
                seen.add(key)
                pool.append(example)
        return pool

    def _usable(self, example: FewShotExample, converted: bool) -> bool:
        """Skip converted rows without a final answer step (e.g. MATH's empty ``\\boxed{}``) and over-long examples."""
        if converted and not (example.steps and _is_answer_step(example.steps[-1])):
            return False
        size = len(example.question) + sum(map(len, example.steps))
        return self.max_example_chars is None or size <= self.max_example_chars

    def _to_example(self, example: FewShotExample | Mapping[str, Any]) -> FewShotExample:
        if isinstance(example, FewShotExample):
            return example
        steps = example["steps"] if "steps" in example else solution_to_steps(example, self.flavour)
        return FewShotExample(question=example["question"], steps=list(steps))

    def rotated(self, round: int) -> PromptBuilder:
        """A copy that shows the ``k`` pool examples of ``round`` (a seeded draw per round, e.g. the training step)."""
        view = copy.copy(self)  # shares the pool and the rendered-prefix cache
        view.round = round
        return view

    def _pool_order(self) -> list[int]:
        order = list(range(len(self.pool)))
        if self.round is not None:
            random.Random(f"{self.seed}:{self.round}").shuffle(order)
        return order

    def _shot_indices(self, question: str) -> tuple[int, ...]:
        key = _norm_question(question)
        return tuple(i for i in self._pool_order() if _norm_question(self.pool[i].question) != key)[: self.k]

    def shots(self, question: str) -> list[FewShotExample]:
        """The few-shot examples used for ``question`` (never containing ``question`` itself)."""
        return [self.pool[i] for i in self._shot_indices(question)]

    def _shot_messages(self, indices: Sequence[int]) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}]
        for i in indices:
            messages.append({"role": "user", "content": self.pool[i].question})
            messages.append({"role": "assistant", "content": "".join(self.pool[i].steps)})
        return messages

    def messages(self, question: str, steps: Sequence[str] = ()) -> list[dict[str, str]]:
        """System, k (user, assistant) shots, the user question and, if any steps, the partial assistant answer."""
        messages = self._shot_messages(self._shot_indices(question))
        messages.append({"role": "user", "content": question})
        if steps:
            messages.append({"role": "assistant", "content": "".join(steps)})
        return messages

    def render(self, question: str, steps: Sequence[str] = ()) -> str:
        """Prompt text that ends with the generation prompt (no steps) or exactly with ``"".join(steps)``."""
        text = "".join(steps)
        messages = self.messages(question, [text] if text else ())
        if not self._use_template:
            return self._render_plain(messages, continue_final=bool(text))
        if not text:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        if rendered.endswith(text):
            return rendered
        # Some templates trim message content (e.g. ``| trim``) and drop the trailing "\n" of the last finished step;
        # restore it so the model continues on a fresh line instead of extending the previous step.
        for trimmed in (text.rstrip(), text.strip()):
            if trimmed and rendered.endswith(trimmed):
                return rendered[: len(rendered) - len(trimmed)] + text
        raise ValueError("Chat template altered the partial assistant message; cannot continue the step sequence.")

    def _render_plain(self, messages: Sequence[Mapping[str, str]], continue_final: bool) -> str:
        parts = []
        for j, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "system":
                parts.append(f"System: {content}\n\n")
            elif message["role"] == "user":
                parts.append(f"Question: {content}\nAnswer:\n")
            elif continue_final and j == len(messages) - 1:
                parts.append(content)
            else:
                parts.append(content if content.endswith("\n") else content + "\n")
                parts.append("\n")
        return "".join(parts)

    def _prefix(self, indices: tuple[int, ...]) -> str:
        if indices not in self._prefix_cache:
            messages = self._shot_messages(indices)
            if self._use_template:
                prefix = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            else:
                prefix = self._render_plain(messages, continue_final=False)
            self._prefix_cache[indices] = prefix
        return self._prefix_cache[indices]

    def render_parts(self, question: str, steps: Sequence[str] = ()) -> tuple[str, str]:
        """``(prefix, suffix)``, ``prefix + suffix == render(...)``; prefix = system + shots, shared across problems.

        If the template renders the shots differently once a question follows, the prefix is "" (correct, but
        nothing is shared) and a warning is logged once.
        """
        full = self.render(question, steps)
        prefix = self._prefix(self._shot_indices(question))
        if not full.startswith(prefix):
            if not self._warned_prefix:
                self._warned_prefix = True
                logger.warning("Chat template does not render the few-shot prefix stably; prefix sharing disabled.")
            prefix = ""
        return prefix, full[len(prefix) :]

    @property
    def shared_prefix(self) -> str:
        """Prefix (system + first k pool examples) used by every problem that does not collide with the pool."""
        return self._prefix(tuple(range(self.k)))
