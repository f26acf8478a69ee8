"""Reward functions in the trainer: batched in TRL's signature, logged per function; judge and weights in `reward`."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from tiny_training import make_config

from trl_stepwise.trainer import StepwiseReinforceTrainer


def chat_problems(n: int = 8) -> Dataset:
    """Conversational prompts (TRL's format) with an extra column."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
                "answer": str(2 * i),
                "difficulty": i % 3,
            }
            for i in range(n)
        ]
    )


def trainer_for(model, tokenizer, tmp_path, reward_funcs, dataset=None, judge=None, **overrides):
    return StepwiseReinforceTrainer(
        model=model,
        args=make_config(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else chat_problems(),
        processing_class=tokenizer,
        reward_funcs=reward_funcs,
        judge=judge,
    )


def test_reward_functions_are_called_once_per_rollout_with_trl_signature(tiny_model, tokenizer, tmp_path):
    calls = []

    def spy_reward(prompts, completions, completion_ids, trainer_state, difficulty, answer, question, **kwargs):
        calls.append(
            dict(
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
                step=trainer_state.global_step,
                difficulty=difficulty,
                answer=answer,
                question=question,
                kwargs=sorted(kwargs),
            )
        )
        kwargs["log_metric"]("spy/calls", 1.0)
        kwargs["log_extra"]("length", [len(ids) for ids in completion_ids])
        return [float(len(ids)) for ids in completion_ids]

    trainer = trainer_for(tiny_model, tokenizer, tmp_path, [spy_reward], max_steps=2)
    trainer.train()
    assert len(calls) == 2 and [c["step"] for c in calls] == [0, 1]  # one batched call per rollout
    call = calls[0]
    assert len(call["completions"]) == 4  # 2 problems x 2 generations
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in call["prompts"])  # the dataset's prompt
    assert all(c[-1]["role"] == "assistant" and isinstance(c[-1]["content"], str) for c in call["completions"])
    assert all(isinstance(ids, list) and ids and isinstance(ids[0], int) for ids in call["completion_ids"])
    assert call["question"][0] == call["prompts"][0][-1]["content"]
    assert all(d in (0, 1, 2) for d in call["difficulty"]) and all(a.isdigit() for a in call["answer"])
    assert {"log_metric", "log_extra"} <= set(call["kwargs"])
    assert trainer.state.log_history[0]["spy/calls"] == 1.0  # TRL's log_metric
    records = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [r["length"] for r in records[:4]] == [len(ids) for ids in call["completion_ids"]]  # TRL's log_extra


def test_old_style_reward_functions_still_work(tiny_model, tokenizer, tmp_path, arithmetic_problems):
    def no_kwargs(completions, answer):  # the README's early form: only the columns it names
        return [0.5 for _ in completions]

    trainer = trainer_for(tiny_model, tokenizer, tmp_path, [no_kwargs], dataset=arithmetic_problems, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["rewards/no_kwargs/mean"] == pytest.approx(0.5)


class ConstantJudge:
    """Scores every step 0.5."""

    def score(self, items):
        return [0.5] * len(items)


def test_logged_reward_is_the_trained_return_with_judge_and_weights(
    tiny_model, tokenizer, tmp_path, arithmetic_problems
):
    def one(completions, **kwargs):
        return [1.0] * len(completions)

    def varies(completions, **kwargs):
        return [float(i % 2) for i in range(len(completions))]

    trainer = trainer_for(
        tiny_model, tokenizer, tmp_path, [one, varies], dataset=arithmetic_problems, judge=ConstantJudge(),
        max_steps=1, reward_weights=[0.5, 2.0], judge_weight=0.4, answer_reward_weight=3.0,
    )  # fmt: skip
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["rewards/one/mean"] == pytest.approx(1.0) and logs["rewards/one/std"] == pytest.approx(0.0)
    assert logs["rewards/varies/mean"] == pytest.approx(0.5) and logs["rewards/varies/std"] > 0
    assert "rewards/correctness_reward/mean" in logs
    records = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    # the return the advantages are computed from: answer weight x final reward (user rewards weighted in it)
    # + judge weight x judge score on every step
    expected = [3.0 * r["reward"] + 0.4 * 0.5 * len(r["steps"]) for r in records]
    assert logs["reward"] == pytest.approx(sum(expected) / len(expected))
    finals = sorted(r["reward"] for r in records)
    assert finals == pytest.approx(sorted(0.5 * 1.0 + 2.0 * (i % 2) + r["correct"] for i, r in enumerate(records)))
