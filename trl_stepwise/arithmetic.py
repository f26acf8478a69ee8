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


@dataclass(frozen=True, eq=False)  # identity hashing: cheap set membership while drawing
class StepTemplate:
    """One story sentence applying `op` to the running quantity and a new number `{n}`.

    `text` goes in the question (empty when the number lives in the question itself), `line` is the reference
    step with `{calc}` standing for `a op b = <<a op b=r>>r`, `question` asks for the result if this step is last.
    `kinds` are the quantity kinds the step applies to and `out` the kind it produces. `new_subject` hands the story
    to `{friend}`; `final` steps (sharing, "each row") only make sense as the last step; `fixed` pins `n` ("half").
    """

    op: str
    kinds: tuple[str, ...]
    out: str
    text: str
    line: str
    question: str
    new_subject: bool = False
    final: bool = False
    fixed: int | None = None


def _t(op: str, kinds: str, out: str | None, text: str, line: str, question: str, **kw: Any) -> StepTemplate:
    kind_tuple = tuple(kinds.split())
    return StepTemplate(op, kind_tuple, out or kind_tuple[0], text, line, question, **kw)


_Q_ITEMS_NOW = "How many {items} does {name} have now?"
_Q_ITEMS_LEFT = "How many {items} does {name} have left?"
_Q_MONEY_NOW = "How many dollars does {name} have now?"
_Q_MONEY_LEFT = "How many dollars does {name} have left?"
_Q_DIST = "How many {dist} does {name} travel in total?"
_Q_AGE = "How old is {name}?"

# fmt: off
TEMPLATES: tuple[StepTemplate, ...] = (
    # --- items: a person holding a count of objects
    _t("+", "items", None, "{He} finds {n} more {items}.", "After finding more, {he} has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{friend} gives {him} {n} {items}.", "After {friend}'s gift, {name} has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{He} buys {n} more {items} at the store.", "After shopping, {name} has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "The next day, {he} collects another {n} {items}.", "Then {he} has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{He} wins {n} {items} at the school fair.", "With the prize, {he} has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{His} grandmother sends {him} {n} {items}.", "Now {name} has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{He} receives {n} {items} for {his} birthday.",
       "After {his} birthday, {he} has {calc} {items}.", _Q_ITEMS_NOW),
    _t("+", "items", None, "{His} teacher rewards {him} with {n} {items}.", "{name} then has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{friend} trades {him} {n} {items} for a comic book.",
       "After the trade, {name} has {calc} {items}.", _Q_ITEMS_NOW),
    _t("+", "items", None, "{His} neighbor gives {him} {n} extra {items}.", "So {he} has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{He} gets {n} more {items} from {his} cousin.", "{He} now has {calc} {items}.",
       _Q_ITEMS_NOW),
    _t("+", "items", None, "{friend} adds {n} {items} to {name}'s collection.",
       "The collection grows to {calc} {items}.", "How many {items} are in {name}'s collection now?"),
    _t("-", "items", None, "{He} gives {n} {items} to {friend}.",
       "After giving some away, {he} has {calc} {items} left.", _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} loses {n} {items} on the way home.", "{He} has {calc} {items} left.", _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} sells {n} {items} at a yard sale.",
       "After the yard sale, {he} has {calc} {items} left.", _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} donates {n} {items} to a school.", "{He} keeps {calc} {items}.", _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} uses {n} {items} for an art project.",
       "After the project, {he} has {calc} {items} left.", _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} lends {n} {items} to {friend}.", "{name} is left with {calc} {items}.",
       _Q_ITEMS_LEFT),
    _t("-", "items", None, "{His} little brother takes {n} {items}.", "That leaves {calc} {items}.", _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} throws away {n} damaged {items}.", "{He} has {calc} good {items} left.",
       _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} trades {n} {items} to {friend} for a toy.",
       "After the trade, {name} has {calc} {items}.", _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} gives {n} {items} to {his} sister.", "{He} has {calc} {items} left.",
       _Q_ITEMS_LEFT),
    _t("-", "items", None, "{friend} borrows {n} {items} from {him}.", "{name} has {calc} {items} left.",
       _Q_ITEMS_LEFT),
    _t("-", "items", None, "{He} hands out {n} {items} to {his} classmates.",
       "After handing some out, {he} has {calc} {items} left.", _Q_ITEMS_LEFT),
    _t("*", "items", None, "By the end of the year, {his} collection is {n} times as large.",
       "By the end of the year, {he} has {calc} {items}.",
       "How many {items} does {name} have at the end of the year?"),
    _t("*", "items", None, "{friend} has {n} times as many {items} as {name}.", "{friend} has {calc} {items}.",
       "How many {items} does {name} have?", new_subject=True),
    _t("*", "items", "money", "{He} sells all of them for ${n} each.", "{He} earns {calc} dollars.",
       "How many dollars does {name} earn?"),
    _t("/", "items", None, "{He} shares them equally among {n} friends.", "Each friend gets {calc} {items}.",
       "How many {items} does each friend get?", final=True),
    _t("/", "items", "filled", "{He} packs them into {boxes} that hold {n} {items} each.",
       "{He} fills {calc} {boxes}.", "How many {boxes} does {name} fill?"),
    _t("/", "items", None, "{He} gives half of them to {friend}.", "{He} keeps {calc} {items}.",
       "How many {items} does {name} keep?", fixed=2),
    _t("/", "items", None, "{He} splits them into {n} equal piles and keeps only one pile.",
       "{He} keeps {calc} {items}.", "How many {items} does {name} keep?"),
    _t("/", "items", None, "{He} arranges them in {n} equal rows.", "Each row has {calc} {items}.",
       "How many {items} are in each row?", final=True),
    _t("/", "items", None, "{He} puts them equally into {n} {boxes}.", "Each {box} gets {calc} {items}.",
       "How many {items} go in each {box}?", final=True),
    # --- boxes: containers whose size is not yet known; filled: containers of a known size
    _t("*", "boxes", "items", "Each {box} holds {n} {items}.", "{name} has {calc} {items}.",
       "How many {items} does {name} have?"),
    _t("*", "boxes", "items", "There are {n} {items} in every {box}.", "In all there are {calc} {items}.",
       "How many {items} are there in all?"),
    _t("*", "boxes", "items", "Every {box} contains {n} {items}.", "{He} has {calc} {items} in total.",
       "How many {items} does {name} have in total?"),
    _t("+", "boxes filled", None, "{friend} gives {him} {n} more {boxes} of {items}.", "{He} now has {calc} {boxes}.",
       "How many {boxes} does {name} have now?"),
    _t("-", "boxes filled", None, "{He} gives {n} {boxes} to {friend}.", "{He} has {calc} {boxes} left.",
       "How many {boxes} does {name} have left?"),
    _t("/", "filled boxes", None, "{He} shares the {boxes} equally among {n} classrooms.",
       "Each classroom gets {calc} {boxes}.", "How many {boxes} does each classroom get?", final=True),
    # --- money: dollars a person has
    _t("+", "money", None, "{He} earns ${n} mowing lawns.", "After mowing lawns, {he} has {calc} dollars.",
       _Q_MONEY_NOW),
    _t("+", "money", None, "{His} aunt gives {him} ${n}.", "With {his} aunt's gift, {he} has {calc} dollars.",
       _Q_MONEY_NOW),
    _t("+", "money", None, "{He} finds ${n} in {his} coat pocket.", "{He} now has {calc} dollars.", _Q_MONEY_NOW),
    _t("+", "money", None, "{He} sells an old bike for ${n}.", "After the sale, {he} has {calc} dollars.",
       _Q_MONEY_NOW),
    _t("+", "money", None, "{He} gets ${n} for {his} birthday.", "After {his} birthday, {he} has {calc} dollars.",
       _Q_MONEY_NOW),
    _t("+", "money", None, "{friend} pays {him} back ${n}.", "{name} then has {calc} dollars.", _Q_MONEY_NOW),
    _t("-", "money", None, "{He} spends ${n} on a new jacket.", "{He} has {calc} dollars left.", _Q_MONEY_LEFT),
    _t("-", "money", None, "{He} pays ${n} for concert tickets.", "After the tickets, {he} has {calc} dollars.",
       _Q_MONEY_LEFT),
    _t("-", "money", None, "{He} buys a book for ${n}.", "{He} has {calc} dollars left after the book.",
       _Q_MONEY_LEFT),
    _t("-", "money", None, "{He} donates ${n} to a charity.", "{He} keeps {calc} dollars.", _Q_MONEY_LEFT),
    _t("-", "money", None, "{He} lends ${n} to {friend}.", "{name} is left with {calc} dollars.", _Q_MONEY_LEFT),
    _t("-", "money", None, "{He} spends ${n} on groceries.", "After groceries, {he} has {calc} dollars.",
       _Q_MONEY_LEFT),
    _t("*", "money", None, "{friend} has {n} times as much money as {name}.", "{friend} has {calc} dollars.",
       "How many dollars does {name} have?", new_subject=True),
    _t("/", "money", None, "{He} spends half of {his} money on a gift.", "{He} has {calc} dollars left.",
       _Q_MONEY_LEFT, fixed=2),
    _t("/", "money", None, "{He} divides the money equally into {n} envelopes.",
       "Each envelope gets {calc} dollars.", "How many dollars go in each envelope?", final=True),
    _t("/", "money", "items", "{He} spends all of it on {items} that cost ${n} each.", "{He} buys {calc} {items}.",
       "How many {items} does {name} buy?"),
    _t("/", "money", None, "{He} spends all of it on {n} {items} that each cost the same.",
       "Each {item} costs {calc} dollars.", "How many dollars does each {item} cost?", final=True),
    _t("/", "money", None, "{He} gives all of it away, split equally among {n} charities.",
       "Each charity gets {calc} dollars.", "How many dollars does each charity get?", final=True),
    _t("/", "money", "wage", "{He} earned all of it in {n} hours of work.", "{He} earns {calc} dollars per hour.",
       "How many dollars per hour does {name} earn?"),
    # --- price of one item, and the total cost of a purchase
    _t("*", "price", "cost", "{name} buys {n} of them.", "{name} spends {calc} dollars.",
       "How many dollars does {name} spend?"),
    _t("+", "cost", None, "{He} also pays ${n} for shipping.", "With shipping, {he} pays {calc} dollars.",
       "How many dollars does {name} pay in total?"),
    _t("-", "cost", None, "{He} uses a coupon for ${n} off.", "After the coupon, {he} pays {calc} dollars.",
       "How many dollars does {name} pay in total?"),
    _t("/", "cost", None, "The cost is split equally among {n} friends.", "Each friend pays {calc} dollars.",
       "How many dollars does each friend pay?", final=True),
    # --- hourly wage
    _t("*", "wage", "money", "{He} works {n} hours this week.", "This week {he} earns {calc} dollars.",
       "How many dollars does {name} earn this week?"),
    _t("+", "wage", None, "{He} gets a raise of ${n} per hour.", "{His} new wage is {calc} dollars per hour.",
       "How many dollars per hour does {name} earn now?"),
    _t("-", "wage", None, "After taxes, {he} keeps ${n} less per hour.",
       "After taxes, {he} keeps {calc} dollars per hour.", "How many dollars per hour does {name} keep?"),
    # --- speed and distance
    _t("*", "speed", "distance", "{He} travels for {n} hours.", "{He} travels {calc} {dist}.",
       "How many {dist} does {name} travel?"),
    _t("+", "speed", None, "Then {he} speeds up by {n} {dist} per hour.", "{His} new speed is {calc} {dist} per hour.",
       "How many {dist} per hour is {name} traveling now?"),
    _t("-", "speed", None, "Because of rain, {he} slows down by {n} {dist} per hour.",
       "In the rain {he} travels {calc} {dist} per hour.", "How many {dist} per hour is {name} traveling now?"),
    _t("+", "distance", None, "Then {he} travels another {n} {dist}.", "{He} travels {calc} {dist} in total.",
       _Q_DIST),
    _t("-", "distance", None, "{friend} travels {n} {dist} less than {name}.", "{friend} travels {calc} {dist}.",
       "How many {dist} does {name} travel?", new_subject=True),
    _t("-", "distance", None, "The trip back home is {n} {dist} shorter.", "The trip back is {calc} {dist}.",
       "How many {dist} long is the trip back?"),
    _t("*", "distance", None, "{friend} travels {n} times as far as {name}.", "{friend} travels {calc} {dist}.",
       "How many {dist} does {name} travel?", new_subject=True),
    _t("/", "distance", None, "{He} covers that distance in {n} equal stages.", "Each stage is {calc} {dist}.",
       "How many {dist} long is each stage?", final=True),
    _t("/", "distance", "speed", "It takes {him} {n} hours at a steady speed.",
       "{His} speed is {calc} {dist} per hour.", "How many {dist} per hour does {name} travel?"),
    # --- ages of related people
    _t("+", "age", None, "{name}'s cousin {friend} is {n} years older.", "{friend} is {calc} years old.", _Q_AGE,
       new_subject=True),
    _t("+", "age", None, "{friend} is {n} years older than {name}.", "{friend} is {calc} years old.", _Q_AGE,
       new_subject=True),
    _t("+", "age", None, "", "In {n} years, {name} will be {calc} years old.", "How old will {name} be in {n} years?",
       final=True),
    _t("-", "age", None, "{name}'s neighbor {friend} is {n} years younger.", "{friend} is {calc} years old.", _Q_AGE,
       new_subject=True),
    _t("-", "age", None, "{friend} is {n} years younger than {name}.", "{friend} is {calc} years old.", _Q_AGE,
       new_subject=True),
    _t("*", "age", None, "{name}'s teacher {friend} is {n} times as old as {him}.", "{friend} is {calc} years old.",
       _Q_AGE, new_subject=True),
    _t("*", "age", None, "{friend} is {n} times {name}'s age.", "{friend} is {calc} years old.", _Q_AGE,
       new_subject=True),
    _t("/", "age", None, "{name} is {n} times as old as {his} cousin {friend}.", "{friend} is {calc} years old.",
       _Q_AGE, new_subject=True),
    # --- a steady rate of collecting items
    _t("*", "rate", "items", "{He} keeps this up for {n} {period}s.", "Over {n} {period}s, {he} gets {calc} {items}.",
       "How many {items} does {name} get in all?"),
    _t("+", "rate", None, "Later, {he} gets {n} more {items} each {period} than before.",
       "Now {he} gets {calc} {items} each {period}.", "How many {items} does {name} get each {period} now?"),
    _t("-", "rate", None, "Later, {he} gets {n} fewer {items} each {period} than before.",
       "Now {he} gets {calc} {items} each {period}.", "How many {items} does {name} get each {period} now?"),
)
# fmt: on

_BY_KIND: dict[str, list[StepTemplate]] = {}
for _template in TEMPLATES:
    for _kind in _template.kinds:
        _BY_KIND.setdefault(_kind, []).append(_template)

_STARTS: dict[str, tuple[str, ...]] = {
    "items": (
        "{name} has {v} {items}.",
        "{name} owns {v} {items}.",
        "{name} has a collection of {v} {items}.",
        "At the start of the week, {name} has {v} {items}.",
        "There are {v} {items} in {name}'s room, and they all belong to {him}.",
    ),
    "boxes": (
        "{name} buys {v} {boxes} of {items}.",
        "{name} has {v} {boxes} of {items}.",
        "{name} brings {v} {boxes} of {items} to school.",
    ),
    "money": (
        "{name} has ${v}.",
        "{name} has saved ${v}.",
        "{name} has ${v} in {his} piggy bank.",
        "{name} starts the month with ${v}.",
    ),
    "price": ("One {item} costs ${v}.", "A store sells {items} for ${v} each."),
    "wage": ("{name} earns ${v} per hour at {his} job.", "{name} is paid ${v} for every hour {he} works."),
    "speed": (
        "{name} drives at {v} {dist} per hour.",
        "{name} rides {his} bike at a steady {v} {dist} per hour.",
        "{name} travels at a speed of {v} {dist} per hour.",
    ),
    "distance": ("{name} travels {v} {dist} on the first day of a road trip.", "{name} drives {v} {dist} to a lake."),
    "age": ("{name} is {v} years old.", "{name} just turned {v} years old."),
    "rate": (
        "{name} collects {v} {items} every {period}.",
        "{name} buys {v} {items} each {period}.",
        "Every {period}, {name} gets {v} {items}.",
    ),
}
_START_WEIGHTS = {"items": 6, "boxes": 2, "money": 4, "price": 1, "wage": 1, "speed": 1, "distance": 1, "age": 2,
                  "rate": 1}  # fmt: skip

# Per-kind realism caps: (largest start value, largest addend/subtrahend, largest value); None defers to the level.
_KIND_CAPS: dict[str, tuple[int | None, int | None, int | None]] = {
    "age": (60, 40, 100),
    "speed": (90, 40, 300),
    "wage": (60, 30, 200),
    "price": (500, None, None),
    "rate": (200, 50, None),
}

# Irrelevant facts about the current subject's surroundings, with a cap that keeps each number believable. They
# name no new person, so the pronoun in the sentence that follows still points at the subject.
_DISTRACTORS: tuple[tuple[str, int], ...] = (
    ("{name}'s school has {k} students.", 3000),
    ("The store is {k} miles from {name}'s house.", 99),
    ("{name}'s favorite TV show has {k} episodes.", 999),
    ("{name}'s dog weighs {k} pounds.", 99),
    ("{name}'s street has {k} houses.", 500),
    ("{name}'s neighbor has {k} {other_items}.", 9999),
    ("The library near {name}'s house has {k} {other_items} on display.", 9999),
    ("{name}'s class planted {k} trees last spring.", 999),
    ("{name}'s older cousin read {k} pages last week.", 999),
    ("The park next to {name}'s house has {k} benches.", 200),
)

_NAMES = (
    ("Maria", "she"), ("James", "he"), ("Aisha", "she"), ("Liam", "he"), ("Sofia", "she"), ("Noah", "he"),
    ("Mei", "she"), ("Carlos", "he"), ("Emma", "she"), ("Omar", "he"), ("Priya", "she"), ("Lucas", "he"),
    ("Hana", "she"), ("Diego", "he"), ("Zoe", "she"), ("Ethan", "he"), ("Fatima", "she"), ("Ravi", "he"),
    ("Chloe", "she"), ("Mateo", "he"), ("Amara", "she"), ("Kenji", "he"), ("Lily", "she"), ("Samuel", "he"),
    ("Nora", "she"), ("Tariq", "he"), ("Grace", "she"), ("Felix", "he"), ("Ines", "she"), ("Jamal", "he"),
    ("Elena", "she"), ("Hugo", "he"), ("Yuki", "she"), ("Oscar", "he"), ("Leah", "she"), ("Andre", "he"),
)  # fmt: skip
_PRONOUNS = {
    "he": {"He": "He", "he": "he", "His": "His", "his": "his", "him": "him"},
    "she": {"He": "She", "he": "she", "His": "Her", "his": "her", "him": "her"},
}
# (singular, plural, container singular, container plural)
_ITEMS = (
    ("pencil", "pencils", "box", "boxes"), ("marble", "marbles", "bag", "bags"),
    ("sticker", "stickers", "sheet", "sheets"), ("apple", "apples", "basket", "baskets"),
    ("cookie", "cookies", "tray", "trays"), ("trading card", "trading cards", "pack", "packs"),
    ("bead", "beads", "jar", "jars"), ("egg", "eggs", "carton", "cartons"),
    ("seashell", "seashells", "bucket", "buckets"), ("crayon", "crayons", "box", "boxes"),
    ("balloon", "balloons", "bunch", "bunches"), ("toy car", "toy cars", "case", "cases"),
    ("orange", "oranges", "crate", "crates"), ("muffin", "muffins", "tray", "trays"),
    ("button", "buttons", "tin", "tins"), ("stamp", "stamps", "album", "albums"),
    ("candy", "candies", "bag", "bags"), ("cupcake", "cupcakes", "box", "boxes"),
    ("golf ball", "golf balls", "bucket", "buckets"), ("rose", "roses", "vase", "vases"),
    ("tennis ball", "tennis balls", "can", "cans"), ("comic book", "comic books", "stack", "stacks"),
)  # fmt: skip
_DIST_UNITS = ("miles", "kilometers")
_PERIODS = ("day", "week")


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
    add_cap = _KIND_CAPS.get(kind, (None, None, None))[1]
    value_cap = _KIND_CAPS.get(t.out, (None, None, None))[2]
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
    name, pronoun = rng.choice([p for p in _NAMES if p[0] not in used])
    used.add(name)
    return name, pronoun


def _draw(spec: LevelSpec, rng: random.Random) -> dict[str, Any] | None:
    """One attempt at a problem; None when the random walk hits a dead end (the caller redraws)."""
    kinds = list(_START_WEIGHTS)
    kind = rng.choices(kinds, weights=[_START_WEIGHTS[k] for k in kinds])[0]
    start_cap = _KIND_CAPS.get(kind, (None, None, None))[0]
    hi = min(spec.max_number, start_cap) if start_cap is not None else spec.max_number
    value = rng.randint(spec.min_number, hi)
    if rng.random() < 0.5:  # often a multiple of a small factor, so that division steps stay common
        factor = rng.randint(2, spec.max_factor)
        value = factor * rng.randint(max(1, -(-spec.min_number // factor)), max(1, hi // factor))
    used: set[str] = set()
    name, pronoun = _pick_name(rng, used)
    item, items, box, boxes = rng.choice(_ITEMS)
    story = {"item": item, "items": items, "box": box, "boxes": boxes}
    story |= {"dist": rng.choice(_DIST_UNITS), "period": rng.choice(_PERIODS)}
    state = _State(value, kind, name, pronoun, used)

    def context(**extra: Any) -> dict[str, Any]:
        return {**story, "name": state.name, **_PRONOUNS[state.pronoun], **extra}

    sentences = [rng.choice(_STARTS[kind]).format(**context(v=value))]
    subjects = [state.name]  # who "he"/"she" points at after each sentence
    lines: list[str] = []
    used_templates: set[StepTemplate] = set()
    question = ""
    for step in range(spec.num_operations):
        last = step == spec.num_operations - 1
        fitting = [t for t in _BY_KIND[state.kind] if (last or not t.final) and t not in used_templates]
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
        text, cap = rng.choice(_DISTRACTORS)
        k = rng.randint(max(2, spec.min_number), max(min(spec.max_number, cap), spec.min_number))
        other_items = rng.choice([i for i in _ITEMS if i[1] != story["items"]])[1]
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
