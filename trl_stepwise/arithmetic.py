"""Procedurally generated arithmetic word problems: a curriculum a 135M model can learn from on CPU.

Small models solve ~0% of GSM8K but often write the right one-step expression, so training starts from generated
problems whose difficulty we control exactly. Each problem is a chain: a story opens with one quantity and every
step applies one operation (+, -, *, /) to the previous result and one new number. Every result is an exact
integer >= 2 (so no negatives, and plural nouns stay right). Stories cover objects, boxes of objects, money, prices,
wages, speeds, distances and ages. The reference solution is in the GSM8K few-shot format, one step per line:

    Maria buys 4*12 = <<4*12=48>>48 pencils.
    After giving some away she has 48-15 = <<48-15=33>>33 pencils left.
    The answer is: 33

Difficulty levels (`LEVELS`, one `LevelSpec` each); the number of operations equals the number of `<<...>>`
annotations in the reference solution:

- level 1: one operation, numbers 2-99, multiplication/division by a 1-digit factor (2-9).
- level 2: two operations, numbers 10-99, factors 2-9.
- level 3: three operations, numbers up to 3 digits, factors 2-12, one distractor sentence (an irrelevant number).
- level 4: four operations, numbers up to 4 digits, factors 2-20, one or two distractor sentences.

Splits use disjoint seed ranges (`SPLIT_SEED_RANGES`), and on top of that every question text belongs to exactly one
split by a hash of the text: a draw whose hash falls in another split's partition is redrawn with the next
sub-seed. So a test question can never appear in training, even where small number spaces make collisions likely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from trl_stepwise.arithmetic_stories import (
    BY_KIND,
    DIST_UNITS,
    DISTRACTORS,
    ITEMS,
    KIND_CAPS,
    NAMES,
    PERIODS,
    PRONOUNS,
    START_WEIGHTS,
    STARTS,
    TEMPLATES,
    StepTemplate,
)

__all__ = [
    "LEVELS",
    "SPLIT_SEED_RANGES",
    "LevelSpec",
    "StepTemplate",
    "TEMPLATES",
    "arithmetic_dataset",
    "generate_problem",
    "generate_problems",
    "parse_arithmetic_spec",
    "split_of_question",
]


@dataclass(frozen=True)
class LevelSpec:
    """Knobs of one difficulty level; `num_operations` is exactly the number of `<<...>>` steps."""

    level: int
    num_operations: int
    min_number: int  # smallest start value / addend / subtrahend shown in the question
    max_number: int  # largest start value / addend / subtrahend shown in the question
    max_factor: int  # largest multiplier or divisor
    max_result: int  # cap on every intermediate result
    min_distractors: int = 0
    max_distractors: int = 0


LEVELS: dict[int, LevelSpec] = {
    1: LevelSpec(1, num_operations=1, min_number=2, max_number=99, max_factor=9, max_result=999),
    2: LevelSpec(2, num_operations=2, min_number=10, max_number=99, max_factor=9, max_result=999),
    3: LevelSpec(3, 3, 10, 999, 12, 9_999, min_distractors=1, max_distractors=1),
    4: LevelSpec(4, 4, 10, 9_999, 20, 99_999, min_distractors=1, max_distractors=2),
}

SPLIT_SEED_RANGES: dict[str, tuple[int, int]] = {
    "train": (0, 10**9),
    "fewshot": (10**9, 2 * 10**9),
    "test": (2 * 10**9, 3 * 10**9),
}
_SPLIT_ORDER = tuple(SPLIT_SEED_RANGES)  # hash partition index of each split
_MAX_ATTEMPTS = 1000

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


@dataclass
class _State:
    """The running quantity and the story facts later sentences refer to."""

    value: int
    kind: str
    name: str
    pronoun: str
    used_names: set[str] = field(default_factory=set)


def _calc(a: int, op: str, b: int, result: int) -> str:
    return f"{a}{op}{b} = <<{a}{op}{b}={result}>>{result}"


def _operands(t: StepTemplate, kind: str, value: int, spec: LevelSpec) -> Sequence[int]:
    """Every `n` that keeps this step exact, >= 2 and inside the level's and the kind's bounds (a range: cheap)."""
    add_cap = KIND_CAPS.get(kind, (None, None, None))[1]
    value_cap = KIND_CAPS.get(t.out, (None, None, None))[2]
    limit = min(spec.max_result, value_cap or spec.max_result)
    if t.op == "+":
        hi = min(spec.max_number, add_cap or spec.max_number, limit - value)
    elif t.op == "-":
        hi = min(spec.max_number, add_cap or spec.max_number, value - 2)  # results >= 2 keep plural nouns right
    elif t.op == "*":
        hi = min(spec.max_factor, limit // value)
    else:
        hi = spec.max_factor
    lo = spec.min_number if t.op in "+-" else 2
    if t.fixed is not None:
        lo, hi = max(lo, t.fixed), min(hi, t.fixed)
    if t.op != "/":
        return range(lo, hi + 1)
    return [n for n in range(lo, hi + 1) if value % n == 0 and 2 <= value // n <= limit]


def _pick_name(rng: random.Random, used: set[str]) -> tuple[str, str]:
    name, pronoun = rng.choice([p for p in NAMES if p[0] not in used])
    used.add(name)
    return name, pronoun


def _draw(spec: LevelSpec, rng: random.Random) -> dict[str, Any] | None:
    """One attempt at a problem; None when the random walk hits a dead end (the caller redraws)."""
    kinds = list(START_WEIGHTS)
    kind = rng.choices(kinds, weights=[START_WEIGHTS[k] for k in kinds])[0]
    start_cap = KIND_CAPS.get(kind, (None, None, None))[0]
    hi = min(spec.max_number, start_cap) if start_cap is not None else spec.max_number
    value = rng.randint(spec.min_number, hi)
    if rng.random() < 0.5:  # often a multiple of a small factor, so that division steps stay common
        factor = rng.randint(2, spec.max_factor)
        value = factor * rng.randint(max(1, -(-spec.min_number // factor)), max(1, hi // factor))
    used: set[str] = set()
    name, pronoun = _pick_name(rng, used)
    item, items, box, boxes = rng.choice(ITEMS)
    story = {"item": item, "items": items, "box": box, "boxes": boxes}
    story |= {"dist": rng.choice(DIST_UNITS), "period": rng.choice(PERIODS)}
    state = _State(value, kind, name, pronoun, used)

    def context(**extra: Any) -> dict[str, Any]:
        return {**story, "name": state.name, **PRONOUNS[state.pronoun], **extra}

    sentences = [rng.choice(STARTS[kind]).format(**context(v=value))]
    subjects = [state.name]  # who "he"/"she" points at after each sentence
    lines: list[str] = []
    used_templates: set[StepTemplate] = set()
    question = ""
    for step in range(spec.num_operations):
        last = step == spec.num_operations - 1
        fitting = [t for t in BY_KIND[state.kind] if (last or not t.final) and t not in used_templates]
        by_shape: dict[tuple[str, str, int | None], Sequence[int]] = {}  # templates of one shape share operands
        for t in fitting:
            if (t.op, t.out, t.fixed) not in by_shape:
                by_shape[t.op, t.out, t.fixed] = _operands(t, state.kind, state.value, spec)
        options = [(t, ns) for t in fitting if (ns := by_shape[t.op, t.out, t.fixed])]
        if not options:
            return None
        op = rng.choice(sorted({t.op for t, _ in options}))
        template, ns = rng.choice([o for o in options if o[0].op == op])
        used_templates.add(template)
        n = rng.choice(ns)
        result = _OPS[op](state.value, n)
        friend, friend_pronoun = _pick_name(rng, state.used_names)
        ctx = context(n=n, friend=friend, calc=_calc(state.value, op, n, result))
        lines.append(template.line.format(**ctx))
        if template.new_subject:
            state.name, state.pronoun = friend, friend_pronoun
        if template.text:
            sentences.append(template.text.format(**ctx))
            subjects.append(state.name)
        state.value, state.kind = result, template.out
        question = template.question.format(**context(n=n))
    for _ in range(rng.randint(spec.min_distractors, spec.max_distractors)):
        at = rng.randint(1, len(sentences))
        text, cap = rng.choice(DISTRACTORS)
        k = rng.randint(max(2, spec.min_number), max(min(spec.max_number, cap), spec.min_number))
        other_items = rng.choice([i for i in ITEMS if i[1] != story["items"]])[1]
        sentences.insert(at, text.format(name=subjects[at - 1], other_items=other_items, k=k))
        subjects.insert(at, subjects[at - 1])
    answer = str(state.value)
    solution = "".join(f"{line}\n" for line in lines) + f"The answer is: {answer}\n"
    return {"question": " ".join([*sentences, question]), "answer": answer, "solution": solution}


def split_of_question(question: str) -> str:
    """The one split a question text may appear in: a stable hash partition of the text into thirds."""
    digest = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return _SPLIT_ORDER[digest % len(_SPLIT_ORDER)]


def _split_of_seed(seed: int) -> str:
    for split, (lo, hi) in SPLIT_SEED_RANGES.items():
        if lo <= seed < hi:
            return split
    raise ValueError(f"seed {seed} is outside every split range {SPLIT_SEED_RANGES}")


def _level_spec(level: int) -> LevelSpec:
    if level not in LEVELS:
        raise ValueError(f"unknown arithmetic level {level!r}; expected one of {sorted(LEVELS)}")
    return LEVELS[level]


Distractors = tuple[int, int]  # (fewest, most) distractor sentences per problem


def generate_problem(level: int, seed: int, distractors: Distractors | None = None) -> dict[str, Any]:
    """The problem for (level, seed): deterministic, and its question text hashes into the seed's own split.

    ``distractors`` replaces the level's number of irrelevant sentences (real word problems often carry one).
    """
    spec = _level_spec(level)
    mix = ""
    if distractors is not None and distractors != (spec.min_distractors, spec.max_distractors):
        spec = dataclasses.replace(spec, min_distractors=distractors[0], max_distractors=distractors[1])
        mix = f"-d{distractors[0]}{distractors[1]}"
    split = _split_of_seed(seed)
    for attempt in range(_MAX_ATTEMPTS):
        problem = _draw(spec, random.Random(f"arith-{level}-{seed}-{attempt}"))
        if problem is not None and split_of_question(problem["question"]) == split:
            index = seed - SPLIT_SEED_RANGES[split][0]
            return {
                **problem,
                "level": level,
                "num_operations": problem["solution"].count("<<"),
                "seed": seed,
                "id": f"arith-L{level}{mix}-{split}-{index}",
            }
    raise RuntimeError(f"no level-{level} problem for seed {seed} after {_MAX_ATTEMPTS} attempts")  # pragma: no cover


def generate_problems(
    level: int, split: str, n: int, start: int = 0, distractors: Distractors | None = None
) -> list[dict[str, Any]]:
    """`n` problems of one level from `split`, using seeds range_start+start onwards."""
    if split not in SPLIT_SEED_RANGES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEED_RANGES)}")
    lo, hi = SPLIT_SEED_RANGES[split]
    if start < 0 or n < 0 or lo + start + n > hi:
        raise ValueError(f"start={start}, n={n} do not fit in the {split!r} seed range {lo}..{hi}")
    return [generate_problem(level, lo + start + i, distractors) for i in range(n)]


_COLUMNS = ("question", "answer", "solution", "level", "num_operations", "seed", "id")


def arithmetic_dataset(
    level: int | Sequence[int] = 1,
    split: str = "train",
    n: int = 1000,
    start: int = 0,
    distractors: Distractors | None = None,
) -> datasets.Dataset:
    """`n` problems as a Dataset; several levels are interleaved round-robin (row i has level levels[i % k])."""
    levels = [level] if isinstance(level, int) else list(level)
    if not levels:
        raise ValueError("arithmetic_dataset needs at least one level")
    for lv in levels:
        _level_spec(lv)
    per_level = {
        lv: generate_problems(lv, split, -(-n // len(levels)), start, distractors) for lv in dict.fromkeys(levels)
    }
    rows = [per_level[levels[i % len(levels)]][i // len(levels)] for i in range(n)]
    return datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in _COLUMNS})


# No `split` key: the loader passes the split itself, next to these kwargs.
_SPEC_FORM = (
    "'arithmetic' or 'arithmetic:level=1-3,n=500,start=0,distractors=0-1' (level: N, N-M or N,M,...; distractors: "
    "irrelevant sentences per problem, N or N-M, default the level's)"
)
_INT_KEYS = ("n", "start")


def _parse_levels(token: str, spec: str) -> list[int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", token)
    if not match:
        raise ValueError(f"bad level {token!r} in arithmetic spec {spec!r}; expected {_SPEC_FORM}")
    lo, hi = int(match[1]), int(match[2] or match[1])
    if lo > hi or lo not in LEVELS or hi not in LEVELS:
        raise ValueError(f"levels {token!r} in {spec!r} must lie within {min(LEVELS)}-{max(LEVELS)}")
    return list(range(lo, hi + 1))


def parse_arithmetic_spec(spec: str) -> dict[str, Any]:
    """Keyword arguments for `arithmetic_dataset` from a dataset name like "arithmetic:level=1-3,n=500"."""
    name, sep, rest = spec.strip().partition(":")
    if name.strip() != "arithmetic" or (sep and not rest.strip()):
        raise ValueError(f"bad arithmetic spec {spec!r}; expected {_SPEC_FORM}")
    kwargs: dict[str, Any] = {}
    key = None
    for token in rest.split(",") if rest.strip() else []:
        if "=" in token:
            key, value = (part.strip() for part in token.split("=", 1))
            if key in kwargs:
                raise ValueError(f"duplicate key {key!r} in arithmetic spec {spec!r}")
        elif key == "level":  # continuation of a level list: "level=1,2"
            value = token
        else:
            raise ValueError(f"bad token {token!r} in arithmetic spec {spec!r}; expected {_SPEC_FORM}")
        if key == "level":
            kwargs["level"] = [*kwargs.get("level", []), *_parse_levels(value, spec)]
        elif key == "distractors":
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", value)
            if not match or int(match[1]) > int(match[2] or match[1]):
                raise ValueError(f"bad distractors {value!r} in arithmetic spec {spec!r}; expected {_SPEC_FORM}")
            kwargs["distractors"] = (int(match[1]), int(match[2] or match[1]))
        elif key in _INT_KEYS:
            if not value.isdigit():
                raise ValueError(f"{key} must be a non-negative integer in arithmetic spec {spec!r}, got {value!r}")
            kwargs[key] = int(value)
        else:
            raise ValueError(f"unknown key {key!r} in arithmetic spec {spec!r}; expected {_SPEC_FORM}")
    if "level" in kwargs:
        levels = list(dict.fromkeys(kwargs["level"]))
        kwargs["level"] = levels[0] if len(levels) == 1 else levels
    return kwargs
