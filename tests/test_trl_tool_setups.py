"""A TRL user's tool-calling GRPO setup on StepwiseReinforceTrainer: the same first prompt token ids as TRL's
GRPOTrainer, reward functions that read the environments, tools alone, a mixed dict of environments, refusals."""

from __future__ import annotations

import pytest
from conftest import trl_chat_template
from datasets import Dataset
from scripted_engine import ScriptedEngine
from tiny_training import make_config
from tool_tasks import DoublingTask, multiply

from trl_stepwise.engines import SamplingConfig
from trl_stepwise.models import load_tokenizer
from trl_stepwise.rollout import StepwiseRollout
from trl_stepwise.trainer import StepwiseReinforceTrainer


class Counter:
    """A second environment: a counter the model increments."""

    def reset(self, **kwargs):
        self.value = 0

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return self.value


def fresh_tool_tokenizer():
    tokenizer = load_tokenizer()
    tokenizer.chat_template = trl_chat_template("qwen2_5")
    return tokenizer


def rows(n: int = 4, **extra) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} doubled?"}], **extra} for i in range(n)]


def our_prompt_ids(trainer, dataset_rows) -> list[list[int]]:
    """The first prompts our rollout plays (a scripted engine that ends every turn at once)."""
    tokenizer = trainer.processing_class
    rollout = StepwiseRollout(
        None,
        tokenizer,
        trainer.prompt_builder,
        SamplingConfig(max_step_tokens=8),
        engine=ScriptedEngine(tokenizer, []),
        chat=trainer.chat_turns,
    )
    return [t.prompt_ids for t in rollout.run(trainer.env_router(), dataset_rows)]


def trl_prompt_ids(trainer, dataset_rows) -> list[list[int]]:
    """GRPOTrainer's first prompts: its environments reset on the rows, then its own tokenisation."""
    prompts = []
    trainer._batch_environments = [r.get("environment") if trainer._multi_environment else None for r in dataset_rows]
    for row, name in zip(dataset_rows, trainer._batch_environments, strict=True):
        prompt, observation = row["prompt"], None
        if trainer.environment_factories is not None:
            env = trainer.environment_factories[name]()
            observation = env.reset(**{k: v for k, v in row.items() if k != "environment"})
        if observation is not None:
            prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
        prompts.append(prompt)
    ids, _, _ = trainer._tokenize_prompts(prompts)
    return [list(i) for i in ids]


def grpo(tiny_model, tmp_path, dataset, **kwargs):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=16,
    )
    return GRPOTrainer(
        model=tiny_model,
        args=args,
        train_dataset=dataset,
        processing_class=fresh_tool_tokenizer(),
        reward_funcs=kwargs.pop("reward_funcs", [lambda completions, **kw: [0.0] * len(completions)]),
        **kwargs,
    )


def ours(tiny_model, tmp_path, dataset, **kwargs):
    return StepwiseReinforceTrainer(
        model=tiny_model,
        args=make_config(tmp_path / "ours", **kwargs.pop("config", {})),
        train_dataset=dataset,
        processing_class=fresh_tool_tokenizer(),
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- same prompts as TRL
@pytest.mark.parametrize(
    "setup",
    [
        {"environment_factory": DoublingTask},
        {"environment_factory": DoublingTask, "tools": [multiply]},
        {"tools": [multiply]},
    ],
    ids=["environment_factory", "environment_factory+tools", "tools"],
)
def test_first_prompt_token_ids_equal_grpo_trainers(make_tiny_model, tmp_path, setup):
    dataset_rows = rows(3) + rows(1, quiet=True)
    dataset = Dataset.from_list(dataset_rows)
    theirs = trl_prompt_ids(grpo(make_tiny_model(), tmp_path, dataset, **setup), dataset_rows)
    mine = our_prompt_ids(ours(make_tiny_model(), tmp_path, dataset, **setup), dataset_rows)
    assert mine == theirs
    assert all(len(ids) > 100 for ids in mine)  # the tool schemas are in it


def test_a_dict_of_environments_shows_each_row_its_own_tools(make_tiny_model, tmp_path):
    dataset_rows = [*rows(2, environment="doubling"), *rows(2, environment="counter")]
    dataset = Dataset.from_list(dataset_rows)
    factories = {"doubling": DoublingTask, "counter": Counter}
    theirs = trl_prompt_ids(grpo(make_tiny_model(), tmp_path, dataset, environment_factory=factories), dataset_rows)
    trainer = ours(make_tiny_model(), tmp_path, dataset, environment_factory=factories)
    mine = our_prompt_ids(trainer, dataset_rows)
    assert mine == theirs
    tokenizer = trainer.processing_class
    assert '"double"' in tokenizer.decode(mine[0]) and '"increment"' not in tokenizer.decode(mine[0])
    assert '"increment"' in tokenizer.decode(mine[3]) and '"double"' not in tokenizer.decode(mine[3])


# ---------------------------------------------------------------------------------------------- training
def test_a_tool_setup_trains_and_reward_functions_read_the_environments(make_tiny_model, tmp_path):
    seen: dict = {}

    def reward_from_environment(completions, environments, prompts, **kwargs):
        seen.update(completions=completions, environments=environments, prompts=prompts, kwargs=kwargs)
        return [float(len(env.calls)) for env in environments]

    trainer = ours(
        make_tiny_model(),
        tmp_path,
        Dataset.from_list(rows(8, level=1)),
        environment_factory=DoublingTask,
        reward_funcs=[reward_from_environment],
        config={"max_steps": 1, "max_episode_tokens": 24, "max_step_tokens": 8, "n_few_shot": 0},
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert seen["environments"] and all(isinstance(env, DoublingTask) for env in seen["environments"])
    completion = seen["completions"][0]
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"
    assert seen["prompts"][0][-1]["content"].endswith("You may call double.")
    assert seen["kwargs"]["level"] == [1] * len(seen["environments"])
    logs = next(h for h in trainer.state.log_history if "reward" in h)  # TRL's tool metrics
    assert logs["tools/call_frequency"] >= 0 and 0 <= logs["tools/failure_frequency"] <= 1


def test_a_template_without_tools_is_refused_before_the_model_loads(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="cannot render tool calls") as error:
        StepwiseReinforceTrainer(
            model="no/such-model",  # never loaded: the refusal comes first
            args=make_config(tmp_path),
            train_dataset=Dataset.from_list(rows(4)),
            processing_class=tokenizer,
            environment_factory=DoublingTask,
        )
    assert "\n" not in str(error.value)


def test_tools_with_a_stepwise_environment_are_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="tools="):
        StepwiseReinforceTrainer(
            model=tiny_model,
            args=make_config(tmp_path),
            train_dataset="arithmetic:level=1,n=8",
            processing_class=fresh_tool_tokenizer(),
            tools=[multiply],
            env="countdown",
        )
