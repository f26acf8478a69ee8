"""Environments in training and evaluation: ``env=`` (id, class, factory), TRL's ``environment_factory`` objects,
datasets whose ``env`` column mixes environments in one run, and ``trl-stepwise evaluate --env``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tool_tasks
from datasets import Dataset
from scripted_engine import ScriptedEngine
from tiny_training import length_reward, make_config

from trl_stepwise import rollout as rollout_module
from trl_stepwise.cli import main
from trl_stepwise.data import load_math_dataset
from trl_stepwise.envs import CountdownEnv, EnvRouter, MathEnv, MathFeedbackEnv, ToolChatEnv, as_env
from trl_stepwise.prompting import PromptBuilder
from trl_stepwise.rollout import SamplingConfig, StepwiseRollout
from trl_stepwise.trainer import StepwiseReinforceTrainer


class DoublingTask(tool_tasks.DoublingTask):
    observation = "\n\nYou may call double."


def test_a_trl_environment_is_played_as_a_tool_calling_chat(tool_tokenizer):
    env = as_env(DoublingTask())
    assert isinstance(env, ToolChatEnv) and [f.__name__ for f in env.tool_functions] == ["double"]
    call = '<tool_call>\n{"name": "double", "arguments": {"x": 21}}\n</tool_call>'
    script = []
    for turn in (call, "The answer is: 42"):
        script += tool_tokenizer(turn, add_special_tokens=False)["input_ids"] + [tool_tokenizer.eos_token_id]
    rollout = StepwiseRollout(
        None,
        tool_tokenizer,
        PromptBuilder(tool_tokenizer, [], k=0),
        SamplingConfig(max_step_tokens=30),
        engine=ScriptedEngine(tool_tokenizer, script),
    )
    (trajectory,) = rollout.run(DoublingTask, [{"prompt": [{"role": "user", "content": "What is 21 doubled?"}]}])
    episode = trajectory.episode
    assert trajectory.env.env.calls == [21]
    forced = [t for t, p in zip(trajectory.completion_ids, trajectory.policy_mask, strict=True) if not p]
    assert "<tool_response>\n42\n</tool_response>" in tool_tokenizer.decode(forced)
    assert episode.final_reward == 1.0 and episode.verdict.correct
    assert "What is 21 doubled?\n\nYou may call double." in tool_tokenizer.decode(trajectory.prompt_ids)


def test_router_picks_each_rows_environment():
    router = EnvRouter(lambda: MathEnv("gsm8k"), {"trl": DoublingTask})
    assert isinstance(router.for_row({"question": "q", "answer": "1"}), MathEnv)
    assert isinstance(router.for_row({"env": "countdown"}), CountdownEnv)
    assert isinstance(router.for_row({"environment": "trl"}), DoublingTask)
    with pytest.raises(ValueError, match=r"unknown environments \['nope'\]"):
        router.check([{"env": "nope"}, {"env": "countdown"}])


@pytest.fixture
def captured(monkeypatch):
    """Every trajectory the trainer's rollouts produce."""
    trajectories = []
    original = rollout_module.StepwiseRollout.run

    def run(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        trajectories.extend(result)
        return result

    monkeypatch.setattr(rollout_module.StepwiseRollout, "run", run)
    return trajectories


def _train(model, tokenizer, dataset, tmp_path, **kwargs):
    config = make_config(tmp_path, max_steps=1, per_device_train_batch_size=8, num_generations=2, seed=1)
    trainer = StepwiseReinforceTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
        **kwargs,
    )
    trainer.train()
    return trainer


def test_a_dataset_env_column_mixes_environments_in_one_run(tiny_model, tokenizer, tmp_path, captured):
    keys = ("question", "answer", "solution", "env", "numbers", "target")
    rows = [dict(row, numbers=None, target=None) for row in load_math_dataset("arithmetic:level=1,n=4")]
    for row, env in zip(rows, ["math_feedback", "math_feedback", "arithmetic", None], strict=True):
        row["env"] = env  # None: the trainer's default environment
    rows += load_math_dataset("countdown:n=4").to_list()
    _train(tiny_model, tokenizer, Dataset.from_list([{k: row[k] for k in keys} for row in rows]), tmp_path)
    seen = {t.episode.row.get("env") for t in captured}
    assert len(captured) == 8 and seen <= {"math_feedback", "arithmetic", "countdown", None} and len(seen) >= 2
    kinds = {type(as_env(EnvRouter(MathEnv).for_row(t.episode.row))) for t in captured}
    assert len(kinds) >= 2


def test_env_argument_takes_an_id_a_class_or_a_factory(tiny_model, tokenizer, tmp_path, captured):
    dataset = load_math_dataset("arithmetic:level=1,n=8")
    kinds = []
    for env in ("math_feedback", MathFeedbackEnv, lambda: MathFeedbackEnv(max_retries=0)):
        trainer = StepwiseReinforceTrainer(
            model=tiny_model,
            args=make_config(tmp_path, max_steps=1),
            train_dataset=dataset,
            processing_class=tokenizer,
            reward_funcs=[length_reward],
            env=env,
        )
        kinds.append(type(as_env(trainer.env_router().for_row(dict(dataset[0])))))
    assert kinds == [MathFeedbackEnv] * 3
    with pytest.raises(ValueError, match="not both"):
        StepwiseReinforceTrainer(
            model=tiny_model,
            args=make_config(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            env="countdown",
            environment_factory=DoublingTask,
        )
    with pytest.raises(ValueError, match="not a registered environment"):
        make_config(tmp_path, env_id="nope")


def test_a_dataset_naming_an_unknown_environment_fails_before_training(tiny_model, tokenizer, tmp_path):
    dataset = Dataset.from_list([{"question": "q", "answer": "1", "env": "nope"}] * 4)
    with pytest.raises(ValueError, match="unknown environments"):
        StepwiseReinforceTrainer(
            model=tiny_model, args=make_config(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )


def test_evaluate_env_flag(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "countdown.jsonl"
    argv = ["evaluate", "--model_name_or_path", str(tiny_model_dir), "--dataset", "countdown:n=3", "--limit", "3"]
    argv += ["--env", "countdown", "--n_few_shot", "1", "--max_steps", "2", "--max_step_tokens", "5"]
    assert main([*argv, "--no_progress", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["num_steps"] <= 2 for r in records)
    assert main(["evaluate", "--dataset", "countdown:n=3", "--gold", "--env", "countdown"]) == 0
    assert "accuracy 100.0%" in capsys.readouterr().out
    assert main(["evaluate", "--dataset", "countdown:n=3", "--gold", "--env", "nope"]) == 2
    assert "--env nope: not a registered environment" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "env_id"),
    [("reinforce_countdown_cpu.yaml", "countdown"), ("reinforce_math_feedback_cpu.yaml", "math_feedback")],
)
def test_environment_recipe_configs_prepare_without_a_model(config, env_id):
    from trl import ModelConfig

    from trl_stepwise.recipe import ReinforceScriptArguments, prepare_reinforce
    from trl_stepwise.trainer import StepwiseReinforceConfig
    from trl_stepwise.usage import parse_recipe_args

    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / config
    script_args, training_args, model_args = parse_recipe_args(
        (ReinforceScriptArguments, StepwiseReinforceConfig, ModelConfig), ["--config", str(path)], prog="test"
    )
    assert training_args.env_id == env_id and training_args.use_cpu and model_args.model_name_or_path is None
    prepared = prepare_reinforce(script_args, training_args, model_args)
    assert len(prepared.evaluation) == 50 and len(prepared.train) >= 1000


class SortThreeEnv:
    """A user's environment that reads its own columns (``numbers``) and states its task in the problem text."""

    max_steps = 2

    def reset(self, *, seed=None, options=None):
        self.numbers = list((options or {})["numbers"])
        return f"Sort {self.numbers} ascending. End with: The answer is: a, b, c", {}

    def step(self, action):
        done = "The answer is:" in action
        return "", float(done), done, False, {}


def test_a_users_environment_gets_its_own_columns_and_no_worked_examples(make_tiny_model, tokenizer, tmp_path, caplog):
    """No ``question`` column is asked for and no worked examples are prepended, with no warning about either."""
    dataset = Dataset.from_list([{"numbers": [3, 1, 2]}, {"numbers": [9, 7, 8]}])
    args = make_config(tmp_path, n_few_shot=None, max_steps=1)
    with caplog.at_level("WARNING"):
        trainer = StepwiseReinforceTrainer(
            model=make_tiny_model(), args=args, train_dataset=dataset, processing_class=tokenizer, env=SortThreeEnv
        )
    assert trainer.prompt_builder.k == 0 and trainer.prompt_builder.pool == []
    assert trainer.train_dataset.column_names == ["numbers"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("trl_stepwise")] == []
    trainer.train()
    assert trainer.state.global_step == 1


def test_math_environments_keep_their_worked_examples_and_the_config_overrides(make_tiny_model, tokenizer, tmp_path):
    problems = load_math_dataset("arithmetic:level=1", split="train", limit=8)
    trainer = StepwiseReinforceTrainer(
        model=make_tiny_model(), args=make_config(tmp_path, n_few_shot=None), train_dataset=problems,
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.prompt_builder.k == MathEnv.n_few_shot == 4
    asked = make_config(tmp_path, n_few_shot=1)
    trainer = StepwiseReinforceTrainer(
        model=make_tiny_model(), args=asked, train_dataset=Dataset.from_list([{"numbers": [2, 1, 3]}] * 2),
        processing_class=tokenizer, env=SortThreeEnv,
    )  # fmt: skip
    assert trainer.prompt_builder.k == 1
