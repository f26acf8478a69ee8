"""``benchmarks/few_shot_transfer.py`` without a model: its ``evaluate_default`` source is exactly what
`trl-stepwise evaluate` shows for a problem set without worked solutions, and its ``main_job`` source is the main
job's (the evaluation itself is checked by the script's ``--quick --tiny`` smoke run)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

import pytest
import yaml

from trl_stepwise.cli import EvaluateArguments, _prompt_builder
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.recipe import ReinforceScriptArguments, load_problem_sets

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def transfer():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its neighbours `common` and `main_job_study`
    try:
        path = ROOT / "benchmarks" / "few_shot_transfer.py"
        spec = importlib.util.spec_from_file_location("few_shot_transfer", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["few_shot_transfer"] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    yield module
    sys.modules.pop("few_shot_transfer", None)


def _shots(transfer, source: str, tokenizer) -> list[str]:
    args = argparse.Namespace(shots=2, use_vllm=False, max_steps=None, quick=False)
    builder, _ = transfer.few_shot_builder(source, tokenizer, args)
    return [example.question for example in builder.shots("a question of no set")]


def test_evaluate_default_source_is_what_the_cli_shows_for_answer_only_problems(transfer, tokenizer, tmp_path):
    problems = tmp_path / "answers_only.jsonl"
    problems.write_text("\n".join(json.dumps({"question": f"What is {n} + 1?", "answer": n + 1}) for n in range(40)))
    cli_builder = _prompt_builder(EvaluateArguments(dataset=str(problems), n_few_shot=2), tokenizer, "gsm8k")
    cli_shots = [example.question for example in cli_builder.shots("a question of no set")]
    assert _shots(transfer, "evaluate_default", tokenizer) == cli_shots


def test_main_job_source_is_the_main_jobs_few_shot_examples(transfer, tokenizer):
    config = yaml.safe_load((ROOT / "recipes" / "configs" / "reinforce_gsm8k_cpu.yaml").read_text())
    script_args = ReinforceScriptArguments(
        dataset_name=config["dataset_name"], few_shot_dataset_name=config["few_shot_dataset_name"], eval_limit=1
    )
    _, _, main_job_rows = load_problem_sets(script_args)
    seed, max_chars = config.get("few_shot_seed", 0), config["max_example_chars"]
    main_job = PromptBuilder(tokenizer, main_job_rows, k=2, seed=seed, max_example_chars=max_chars)
    shots = _shots(transfer, "main_job", tokenizer)
    assert shots == [example.question for example in main_job.shots("a question of no set")]
    assert len({tuple(_shots(transfer, source, tokenizer)) for source in transfer.SOURCES}) == 4  # main_job twice


def test_evaluate_default_alternates_short_gsm8k_examples_with_generated_ones_as_the_main_job_trains(
    transfer, tokenizer
):
    """The fallback is the pair the benchmark measured best: the first short GSM8K example, then the first generated
    level-1 example (next to the question); the main job trains with the same pair."""
    short, level1 = _shots(transfer, "gsm8k_short", tokenizer), _shots(transfer, "level1", tokenizer)
    assert _shots(transfer, "evaluate_default", tokenizer) == [short[0], level1[0]]
    assert _shots(transfer, "main_job", tokenizer) == _shots(transfer, "evaluate_default", tokenizer)


def test_models_are_name_path_pairs_in_order(transfer):
    assert list(transfer.parse_models(["untrained=embedded", "main=out/run"]).items()) == [
        ("untrained", "embedded"),
        ("main", "out/run"),
    ]
    with pytest.raises(SystemExit, match="NAME=PATH"):
        transfer.parse_models(["out/run"])
