"""Several named few-shot sources alternate in the training prompt, one worked example from each in turn; a single
name (the YAML's string included) stays one source."""

from __future__ import annotations

from trl_stepwise.prompting import AlternatingExamples
from trl_stepwise.recipe import ReinforceScriptArguments, load_problem_sets
from trl_stepwise.trainer import StepwiseReinforceConfig
from trl_stepwise.trainer.builders import build_prompts


def _sets(few_shot_dataset_name):
    script_args = ReinforceScriptArguments(
        dataset_name="gsm8k", few_shot_dataset_name=few_shot_dataset_name, train_limit=8, eval_limit=1
    )
    return load_problem_sets(script_args)


def test_two_named_sources_alternate_in_the_prompt(tokenizer, tmp_path):
    train, _, few_shot = _sets(["gsm8k", "arithmetic:level=1"])
    assert isinstance(few_shot, AlternatingExamples) and len(few_shot.sources) == 2
    generated = set(few_shot.sources[1]["question"])
    args = StepwiseReinforceConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_example_chars=300)
    builder = build_prompts(args, tokenizer, few_shot, train, "gsm8k", 4)
    shots = builder.shots("a question of no set")
    assert [shot.question in generated for shot in shots] == [False, True, False, True]
    assert all(len(shot.question) + sum(map(len, shot.steps)) <= 300 for shot in shots)


def test_one_name_as_a_string_or_a_list_is_one_source():
    for name in ("arithmetic:level=1", ["arithmetic:level=1"]):
        _, _, few_shot = _sets(name)
        assert not isinstance(few_shot, AlternatingExamples) and "question" in few_shot.column_names


def _answers_only():
    from datasets import Dataset

    return Dataset.from_list([{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)])


def test_trainer_fallback_shows_as_many_examples_as_evaluate(tokenizer, tmp_path):
    """A few-shot source with final answers only: the fallback pair, two examples as in ``trl-stepwise evaluate``,
    not the environment's default of 4; a user's ``n_few_shot`` still wins."""
    plain = _answers_only()
    args = StepwiseReinforceConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert build_prompts(args, tokenizer, plain, plain, "gsm8k", 4).k == 2
    args = StepwiseReinforceConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", n_few_shot=4)
    assert build_prompts(args, tokenizer, plain, plain, "gsm8k", 4).k == 4
