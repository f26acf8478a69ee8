"""The ``trl-stepwise`` command line: flags, clear usage errors, outputs, and one process vs two under accelerate."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_stepwise.cli import EvaluateArguments, format_summary, main, parse_command
from trl_stepwise.data import load_math_dataset
from trl_stepwise.evaluation import summarize

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def problems_file(tmp_path) -> Path:
    rows = [
        {"problem": f"Ann has {n} pens and gets 2 more. How many pens?", "target": str(n + 2), "rationale": ""}
        for n in range(3, 8)
    ]
    for row in rows:
        row["rationale"] = f"She has {row['target']} pens.\n#### {row['target']}"
    return write_jsonl(tmp_path / "pens.jsonl", rows)


# --- parsing ---------------------------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(EvaluateArguments):
        assert f"--{field.name}" in text, field.name
    assert text.count("default:") >= 5  # help strings are there, not only flag names


def test_top_level_help_names_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate" in capsys.readouterr().out


def test_parse_command_fills_the_dataclass():
    command, args = parse_command(
        ["evaluate", "--dataset", "math500", "--mode", "direct", "--calculator", "off", "--limit", "3", "--gold"]
    )
    assert command.name == "evaluate"
    assert isinstance(args, EvaluateArguments)
    assert (args.dataset, args.mode, args.calculator, args.limit, args.gold) == ("math500", "direct", "off", 3, True)
    assert args.temperature == 0.0 and args.n_few_shot is None  # 4, or the fallback examples' own count


@pytest.mark.parametrize(
    "argv", [["evaluate", "--mode", "sideways"], ["frobnicate"], [], ["evaluate", "--limit", "many"]]
)
def test_bad_flags_exit_with_code_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


# --- input errors ----------------------------------------------------------------------------------------------------


def test_missing_field_is_one_line_error_naming_the_fields(problems_file, capsys):
    code = main(["evaluate", "--dataset", str(problems_file), "--answer_field", "answer", "--gold"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "answer" in err and all(name in err for name in ("problem", "target", "rationale"))


def test_missing_dataset_file_is_a_clear_error(tmp_path, capsys):
    code = main(["evaluate", "--dataset", str(tmp_path / "nowhere.jsonl"), "--gold"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nowhere.jsonl" in err and "does not exist" in err and len(err.splitlines()) == 1


def test_bad_values_are_usage_errors(capsys):
    assert main(["evaluate", "--num_samples", "0", "--gold", "--limit", "2"]) == 2
    assert "--num_samples" in capsys.readouterr().err


def test_python_dash_m_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trl_stepwise.cli", "evaluate", "--dataset", str(tmp_path / "x.jsonl"), "--gold"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


# --- gold and outputs ------------------------------------------------------------------------------------------------


def test_gold_on_a_user_file_writes_records_and_summary(problems_file, tmp_path, capsys):
    out = tmp_path / "res" / "gold.jsonl"
    code = main(
        ["evaluate", "--dataset", str(problems_file), "--question_field", "problem", "--answer_field", "target"]
        + ["--solution_field", "rationale", "--gold", "--output", str(out)]
    )
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and all(r["correct"] for r in records)
    assert records[0]["steps"] == ["She has 5 pens.\n", "The answer is: 5\n"]
    summary = json.loads((tmp_path / "res" / "gold_summary.json").read_text())
    assert summary["accuracy"] == 1.0 and summary["total"] == 5 and summary["arguments"]["gold"] is True
    assert "accuracy 100.0%" in capsys.readouterr().out


def test_format_summary_mentions_sampling_and_breakdowns():
    records = [
        {"problem_index": p, "sample_index": s, "final_answer": "1", "correct": s == 1, "end_reason": "answer"}
        | {"num_steps": 1, "num_tokens": 3, "calc_calls": 0, "calc_errors": 0, "level": 2, "subject": "Algebra"}
        for p in range(2)
        for s in range(3)
    ]
    text = format_summary({**summarize(records, num_samples=3), "wall_seconds": 2.0, "tokens_per_second": 9.0})
    assert "accuracy 0.0%" in text and "maj@3 0.0%" in text and "pass@3 100.0%" in text
    assert "level 2: 0.0% (0/2)" in text and "subject Algebra" in text and "9.0 tokens/s" in text


# --- running a model -------------------------------------------------------------------------------------------------

TINY_RUN = ["--dataset", "arithmetic:level=1", "--limit", "6", "--n_few_shot", "1", "--max_steps", "2"]
TINY_RUN += ["--max_step_tokens", "5", "--batch_size", "4", "--no_progress"]


def test_evaluate_tiny_model_in_process(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tiny.jsonl"
    code = main(["evaluate", "--model_name_or_path", str(tiny_model_dir), *TINY_RUN, "--output", str(out)])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem_index"] for r in records] == list(range(6))
    assert all(r["completion"] and r["num_steps"] <= 2 for r in records)
    assert "correct" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["evaluate", "--model_name_or_path", str(tiny_model_dir), *TINY_RUN]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    # accelerate 1.x runs `--cpu --num_processes 2` as ONE process; torchrun (--multi_gpu) plus the CLI's CPU fallback
    # gives two processes in a gloo group on a machine without CUDA.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for argv, out in (([sys.executable, "-m", "trl_stepwise.cli"], one), ([*launch, "-m", "trl_stepwise.cli"], two)):
        result = subprocess.run(
            [*argv, *common, "--output", str(out)], capture_output=True, text=True, env=env, timeout=600, cwd=REPO
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("correct ") == 1  # only the main process prints
    records_one = [json.loads(line) for line in one.read_text().splitlines()]
    records_two = [json.loads(line) for line in two.read_text().splitlines()]
    assert len(records_two) == 6
    assert records_two == records_one
    summary_one = json.loads((tmp_path / "one_summary.json").read_text())
    summary_two = json.loads((tmp_path / "two_summary.json").read_text())
    assert (summary_one["num_processes"], summary_two["num_processes"]) == (1, 2)
    for key in ("correct", "total", "accuracy", "unparsable", "truncated", "end_reasons", "mean_tokens"):
        assert summary_two[key] == summary_one[key], key


# --- few-shot sources without worked solutions -----------------------------------------------------------------


def test_plain_dataset_without_shot_flags_shows_two_alternating_examples(tmp_path, capsys):
    """No few-shot flag on a set of final answers only: one short GSM8K solution, then one generated one-step
    solution; with a dataset of its own worked solutions the default stays 4."""
    from trl_stepwise.cli import DEFAULT_SHOTS, _prompt_builder

    path = tmp_path / "answers_only.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": i + 2}) + "\n" for i in range(8)))
    _, args = parse_command(["evaluate", "--dataset", str(path)])
    shots = _prompt_builder(args, None, "gsm8k").shots("a question of no set")
    assert len(shots) == 2 and all(len(e.question) + sum(map(len, e.steps)) <= 300 for e in shots)
    generated = {row["question"] for row in load_math_dataset("arithmetic:level=1", split="fewshot")}
    assert shots[0].question not in generated and shots[1].question in generated
    assert "It shows 2 of them." in capsys.readouterr().err
    _, args = parse_command(["evaluate", "--dataset", "gsm8k", "--split", "test", "--limit", "1"])
    assert len(_prompt_builder(args, None, "gsm8k").shots("a question of no set")) == DEFAULT_SHOTS == 4
    _, args = parse_command(["evaluate", "--dataset", str(path), "--n_few_shot", "3"])
    assert len(_prompt_builder(args, None, "gsm8k").shots("a question of no set")) == 3  # the user's count wins


def test_plain_dataset_takes_bundled_worked_examples_and_says_so(tmp_path, capsys):
    from trl_stepwise.cli import _prompt_builder

    path = tmp_path / "my_problems.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": i + 2}) + "\n" for i in range(8)))
    _, args = parse_command(["evaluate", "--dataset", str(path), "--n_few_shot", "2"])
    builder = _prompt_builder(args, None, "gsm8k")
    assert all(len(example.steps) > 1 for example in builder.pool)  # worked steps, not "The answer is: N" alone
    err = capsys.readouterr().err
    assert "note:" in err and "my_problems.jsonl" in err and "no worked solutions" in err and "gsm8k train" in err
