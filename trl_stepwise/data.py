"""Load math problems from bundled names, hub ids or local files into one schema.

Every loader returns a ``datasets.Dataset`` with the columns ``question``, ``answer`` (final answer only) and
``solution`` (worked solution, empty when the source has none), plus ``subject``/``level`` where the source has them
and every other column of the source (for reward functions), so the environments, the trainer and the evaluator
never care where the problems came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

DATA_DIR_ENV_VAR = "TRL_STEPWISE_DATA_DIR"

BUNDLED: dict[str, dict[str, str]] = {
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "math": {"train": "math/train.jsonl", "test": "math/test.jsonl"},
    "math500": {"test": "math/math500_test.jsonl"},
}
QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "target", "label", "output")
SOLUTION_FIELDS = ("solution", "rationale", "explanation")
# ``gsm8k_easy``: GSM8K problems whose reference solution has at most this many ``<<..>>`` calculations (train: a
# curriculum stage closer to real word problems than generated ones; test: 440 of 1319, a held-out proxy for them).
EASY_GSM8K_MAX_CALCULATIONS = 2
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetFieldError(ValueError):
    """A dataset lacks a needed field or value; the message names the fields that exist and the flag to set."""


def data_dir() -> Path:
    """The bundled data folder: ``$TRL_STEPWISE_DATA_DIR`` or ``data/`` next to the package."""
    if os.environ.get(DATA_DIR_ENV_VAR):
        return Path(os.environ[DATA_DIR_ENV_VAR])
    return Path(__file__).resolve().parent.parent / "data"


def dataset_flavour(name_or_path: str) -> str:
    """Which environment flavour suits a dataset: ``math`` for MATH-like names, ``arithmetic``, else ``gsm8k``."""
    name = name_or_path.lower()
    if name.startswith("arithmetic"):
        return "arithmetic"
    if name in ("math", "math500") or "math" in Path(name).name.replace("gsm8k", ""):
        return "math"
    return "gsm8k"


def load_math_dataset(
    name_or_path: str = "gsm8k",
    split: str = "train",
    question_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    limit: int | None = None,
    missing_answer: str | None = None,
) -> Dataset:
    """Load ``gsm8k``/``gsm8k_easy``/``math``/``math500``/``arithmetic:level=N``, a hub id, or a local JSON/JSONL/
    Parquet/CSV file.

    ``missing_answer`` decides what a row without an answer does: ``error`` (default for user data), ``drop``, or
    ``keep`` (default for bundled data: two MATH train problems have an empty ``\\boxed{}``; they score 0).
    """
    if name_or_path == "gsm8k_easy":
        full = load_math_dataset("gsm8k", split=split)
        easy = full.filter(lambda row: len(re.findall(r"<<", row["solution"])) <= EASY_GSM8K_MAX_CALCULATIONS)
        return easy.select(range(min(limit, len(easy)))) if limit is not None else easy
    raw = _load_raw(name_or_path, split)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    if missing_answer is None:
        missing_answer = "keep" if name_or_path in BUNDLED else "error"
    return normalise_columns(raw, question_field, answer_field, solution_field, name_or_path, missing_answer)


def _generator_spec(name: str) -> dict[str, int]:
    """``countdown:n=500,start=0,num_numbers=4`` -> keyword arguments (integers) of a generated dataset."""
    _, _, spec = name.partition(":")
    kwargs = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in ("n", "start", "num_numbers") or not value.strip().isdigit():
            raise ValueError(f"bad item {item!r} in {name!r}; use e.g. 'countdown:n=500,start=0,num_numbers=3'")
        kwargs[key.strip()] = int(value)
    kwargs.setdefault("n", 1000)
    return kwargs


def _load_raw(name_or_path: str, split: str) -> Dataset:
    if name_or_path.lower().startswith("arithmetic"):
        from trl_stepwise.arithmetic import arithmetic_dataset, parse_arithmetic_spec

        return arithmetic_dataset(split=split, **parse_arithmetic_spec(name_or_path))
    if name_or_path.lower().startswith("countdown"):
        from trl_stepwise.countdown import countdown_dataset

        return countdown_dataset(split=split, **_generator_spec(name_or_path))
    if name_or_path in BUNDLED:
        splits = BUNDLED[name_or_path]
        if split not in splits:
            raise ValueError(f"Bundled dataset {name_or_path!r} has splits {sorted(splits)}, not {split!r}.")
        return _load_file(data_dir() / splits[split])
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise FileNotFoundError(
                f"Dataset file {str(path)!r} does not exist. Pass an existing file path, a hub id, "
                f"or a bundled name: {', '.join(BUNDLED)}, arithmetic:level=N."
            )
        return _load_file(path)
    try:
        loaded = datasets.load_dataset(name_or_path, split=split)
    except Exception as err:  # datasets raises many types; the user needs one clear message
        raise ValueError(
            f"Could not load dataset {name_or_path!r} (split {split!r}) from the hub or cache: {err}. Use a bundled "
            f"name ({', '.join(BUNDLED)}, arithmetic:level=N) or a local .jsonl/.json/.parquet file."
        ) from err
    return loaded


def _load_file(path: Path) -> Dataset:
    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; pass a .jsonl, .json, .parquet or .csv file.")
    if builder is None:
        raise ValueError(
            f"Unsupported file type {path.suffix!r} for {str(path)!r}; use .jsonl, .json, .parquet or .csv."
        )
    if path.stat().st_size == 0:
        raise ValueError(f"Dataset file {str(path)!r} is empty: it needs one problem per line (JSONL) or row.")
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        raise ValueError(f"Could not read {str(path)!r} as {builder}: {err}") from err
    if len(loaded) == 0:
        raise ValueError(f"Dataset file {str(path)!r} holds no rows.")
    return loaded


def normalise_columns(
    raw: Dataset,
    question_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    source: str = "dataset",
    missing_answer: str = "error",
) -> Dataset:
    """Map source fields to ``question``/``answer``/``solution``; split GSM8K ``#### N`` solutions into both.

    Every source column is kept (reward functions get them as keyword arguments, as in TRL). A conversational
    question field (a list of chat messages, TRL's ``prompt``) gives the last user message as ``question`` and keeps
    the messages in their own column.
    """
    columns = list(raw.column_names)
    q_field = _pick_field(columns, question_field, QUESTION_FIELDS, "question", source)
    a_field = _pick_field(columns, answer_field, ANSWER_FIELDS, "answer", source)
    s_field = solution_field or next((f for f in SOLUTION_FIELDS if f in columns), None)
    if solution_field and solution_field not in columns:
        raise DatasetFieldError(_missing_message("solution", solution_field, columns, source))

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        question, answer = _message_text(row[q_field]), row[a_field]
        if question is None or str(question).strip() == "":
            raise DatasetFieldError(f"Row {index} of {source} has an empty {q_field!r} field.")
        if (answer is None or str(answer).strip() == "") and missing_answer == "error":
            raise DatasetFieldError(
                f"Row {index} of {source} has no answer in field {a_field!r}; every problem needs one."
            )
        solution = str(row[s_field]) if s_field and row.get(s_field) is not None else ""
        answer = "" if answer is None else str(answer)
        if "####" in answer:  # GSM8K: the answer field is the worked solution ending in "#### N"
            solution = solution or answer
            answer = _gsm8k_final_answer(answer)
        out = {"question": str(question), "answer": answer.strip(), "solution": solution}
        if "type" in row or "subject" in row:
            out["subject"] = str(row.get("subject") or row.get("type") or "")
        if "level" in row:
            out["level"] = _level_number(row["level"])
        return out

    if missing_answer not in ("error", "drop", "keep"):
        raise ValueError(f"missing_answer must be 'error', 'drop' or 'keep', not {missing_answer!r}.")
    converted = raw.map(convert, with_indices=True, desc=f"Normalising {Path(source).name}")
    if missing_answer == "drop":
        converted = converted.filter(lambda row: row["answer"] != "")
    return converted  # every other column stays: reward functions receive them (TRL's convention)


def _message_text(value: Any) -> Any:
    """The last user message of a conversational prompt (TRL's list of {role, content}); other values unchanged."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m for m in value if m.get("role") == "user"] or value
        return str(users[-1]["content"] or "")
    return value


def _pick_field(columns: list[str], chosen: str | None, candidates: tuple[str, ...], role: str, source: str) -> str:
    if chosen is not None:
        if chosen not in columns:
            raise DatasetFieldError(_missing_message(role, chosen, columns, source))
        return chosen
    for name in candidates:
        if name in columns:
            return name
    raise DatasetFieldError(
        f"{source} has no {role} field: looked for {', '.join(candidates)}, found {', '.join(columns)}. "
        f"Pass --{role}_field <one of the found fields>."
    )


def _missing_message(role: str, chosen: str, columns: list[str], source: str) -> str:
    return (
        f"--{role}_field {chosen!r} is not a field of {source}; the fields are: {', '.join(columns)}. "
        f"Pass --{role}_field with one of them."
    )


def _gsm8k_final_answer(solution: str) -> str:
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _level_number(level: Any) -> int | None:
    match = re.search(r"\d+", str(level))
    return int(match.group()) if match else None
