"""Dataset loading: bundled GSM8K / MATH / MATH-500, generated arithmetic, and local files with their errors."""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset

from trl_stepwise.data import DatasetFieldError, data_dir, load_math_dataset, normalise_columns


@pytest.mark.parametrize(
    ("name", "split", "rows"),
    [
        ("gsm8k", "train", 7473),
        ("gsm8k", "test", 1319),
        ("math", "train", 7500),
        ("math", "test", 5000),
        ("math500", "test", 500),
    ],
)
def test_bundled_row_counts_and_columns(name, split, rows):
    dataset = load_math_dataset(name, split=split)
    assert len(dataset) == rows
    assert {"question", "answer", "solution"} <= set(dataset.column_names)
    assert all(q.strip() for q in dataset["question"])


def test_bundled_math_has_subject_and_level():
    dataset = load_math_dataset("math500", split="test")
    assert set(dataset["level"]) <= {1, 2, 3, 4, 5} and len(set(dataset["subject"])) == 7


def test_bundled_split_that_does_not_exist():
    with pytest.raises(ValueError, match=r"has splits \['test'\], not 'train'"):
        load_math_dataset("math500", split="train")


def test_gsm8k_answers_are_the_hash_numbers():
    raw = [json.loads(line) for line in (data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()]
    dataset = load_math_dataset("gsm8k", split="test")
    assert len(raw) == len(dataset)
    for original, row in zip(raw, dataset, strict=True):
        number = original["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["answer"] == number
        assert re.fullmatch(r"-?\d+(\.\d+)?", row["answer"]), row["answer"]
        assert row["solution"] == original["answer"]  # the worked solution, "#### N" line included
    # a thousands separator is dropped: "#### 1,000" -> "1000"
    assert any("," in r["answer"].rsplit("####", 1)[1] for r in raw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_with_custom_field_names(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl", [{"q": "What is 2+3?", "gold": 5, "work": "2+3=5"}, {"q": "1+1?", "gold": 2}]
    )
    dataset = load_math_dataset(str(path), question_field="q", answer_field="gold", solution_field="work")
    assert dataset["question"] == ["What is 2+3?", "1+1?"]
    assert dataset["answer"] == ["5", "2"]  # numbers become strings
    assert dataset["solution"] == ["2+3=5", ""]
    # the schema's columns, and the source's own kept for reward functions
    assert set(dataset.column_names) == {"question", "answer", "solution", "q", "gold", "work"}


def test_local_jsonl_with_recognised_field_names(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "x?", "final_answer": "7", "rationale": "because"}])
    row = load_math_dataset(str(path))[0]
    assert (row["question"], row["answer"], row["solution"]) == ("x?", "7", "because")


def test_missing_field_names_the_existing_fields(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"q": "What is 2+3?", "gold": "5"}])
    with pytest.raises(
        DatasetFieldError, match=r"--answer_field 'answer_text' is not a field.*the fields are: q, gold"
    ):
        load_math_dataset(str(path), question_field="q", answer_field="answer_text")
    with pytest.raises(DatasetFieldError, match=r"no question field.*found q, gold.*--question_field"):
        load_math_dataset(str(path))


def test_row_without_answer_is_an_error_for_user_data(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "a?", "answer": "1"}, {"question": "b?", "answer": ""}])
    with pytest.raises(DatasetFieldError, match="Row 1 .* no answer"):
        load_math_dataset(str(path))
    assert len(load_math_dataset(str(path), missing_answer="drop")) == 1


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_math_dataset(str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl' does not exist.*bundled name"):
        load_math_dataset(str(missing))


def test_parquet_file(tmp_path):
    path = tmp_path / "problems.parquet"
    Dataset.from_dict({"question": ["1+1?", "2*3?"], "answer": ["2", "6"]}).to_parquet(str(path))
    dataset = load_math_dataset(str(path))
    assert dataset["question"] == ["1+1?", "2*3?"] and dataset["answer"] == ["2", "6"]
    assert dataset["solution"] == ["", ""]


def test_arithmetic_spec_loads_n_rows():
    dataset = load_math_dataset("arithmetic:level=2,n=10")
    assert len(dataset) == 10
    assert set(dataset["level"]) == {2}
    assert all(
        row["answer"].isdigit() and row["solution"].strip().endswith(f"The answer is: {row['answer']}")
        for row in dataset
    )


def test_normalise_columns_splits_gsm8k_style_answers():
    raw = Dataset.from_dict({"question": ["q"], "answer": ["3 + 4 = <<3+4=7>>7 apples\n#### 7"]})
    row = normalise_columns(raw)[0]
    assert row["answer"] == "7" and row["solution"].endswith("#### 7")


def test_normalise_columns_keeps_extra_columns_and_reads_conversational_prompts():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    raw = Dataset.from_dict({"prompt": [prompt], "answer": ["5"], "difficulty": [3], "source": ["mine"]})
    row = normalise_columns(raw)[0]
    assert row["question"] == "What is 2 + 3?"  # the user's message, not str(list)
    assert row["answer"] == "5"
    assert row["difficulty"] == 3 and row["source"] == "mine"  # every other column reaches the reward functions
    assert row["prompt"] == prompt  # kept as TRL gives it: reward functions receive it as `prompts`


def test_gsm8k_easy_keeps_problems_with_at_most_two_calculations_in_any_split():
    easy = load_math_dataset("gsm8k_easy", split="test")
    full = load_math_dataset("gsm8k", split="test")
    assert len(easy) == 440 and len(full) == 1319
    assert all(row["solution"].count("<<") <= 2 for row in easy)
    assert load_math_dataset("gsm8k_easy", split="test", limit=5)["question"] == easy["question"][:5]
