"""The story material of the generated word problems: step templates, opening sentences, names, items, distractors.

Kept apart from the generator (`trl_stepwise.arithmetic`) so that new phrasings are added here without touching the
drawing, splitting and level logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "BY_KIND",
    "DISTRACTORS",
    "DIST_UNITS",
    "ITEMS",
    "KIND_CAPS",
    "NAMES",
    "PERIODS",
    "PRONOUNS",
    "STARTS",
    "START_WEIGHTS",
    "TEMPLATES",
    "StepTemplate",
]


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

BY_KIND: dict[str, list[StepTemplate]] = {}
for _template in TEMPLATES:
    for _kind in _template.kinds:
        BY_KIND.setdefault(_kind, []).append(_template)

STARTS: dict[str, tuple[str, ...]] = {
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
START_WEIGHTS = {"items": 6, "boxes": 2, "money": 4, "price": 1, "wage": 1, "speed": 1, "distance": 1, "age": 2,
                  "rate": 1}  # fmt: skip

# Per-kind realism caps: (largest start value, largest addend/subtrahend, largest value); None defers to the level.
KIND_CAPS: dict[str, tuple[int | None, int | None, int | None]] = {
    "age": (60, 40, 100),
    "speed": (90, 40, 300),
    "wage": (60, 30, 200),
    "price": (500, None, None),
    "rate": (200, 50, None),
}

# Irrelevant facts about the current subject's surroundings, with a cap that keeps each number believable. They
# name no new person, so the pronoun in the sentence that follows still points at the subject.
DISTRACTORS: tuple[tuple[str, int], ...] = (
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

NAMES = (
    ("Maria", "she"), ("James", "he"), ("Aisha", "she"), ("Liam", "he"), ("Sofia", "she"), ("Noah", "he"),
    ("Mei", "she"), ("Carlos", "he"), ("Emma", "she"), ("Omar", "he"), ("Priya", "she"), ("Lucas", "he"),
    ("Hana", "she"), ("Diego", "he"), ("Zoe", "she"), ("Ethan", "he"), ("Fatima", "she"), ("Ravi", "he"),
    ("Chloe", "she"), ("Mateo", "he"), ("Amara", "she"), ("Kenji", "he"), ("Lily", "she"), ("Samuel", "he"),
    ("Nora", "she"), ("Tariq", "he"), ("Grace", "she"), ("Felix", "he"), ("Ines", "she"), ("Jamal", "he"),
    ("Elena", "she"), ("Hugo", "he"), ("Yuki", "she"), ("Oscar", "he"), ("Leah", "she"), ("Andre", "he"),
)  # fmt: skip
PRONOUNS = {
    "he": {"He": "He", "he": "he", "His": "His", "his": "his", "him": "him"},
    "she": {"He": "She", "he": "she", "His": "Her", "his": "her", "him": "her"},
}
# (singular, plural, container singular, container plural)
ITEMS = (
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
DIST_UNITS = ("miles", "kilometers")
PERIODS = ("day", "week")
