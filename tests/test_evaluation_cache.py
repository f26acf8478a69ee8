"""The untrained model's evaluation is computed once and reused, keyed by everything that determines it."""

from __future__ import annotations

import pytest
import torch
from tiny_training import make_config

from trl_stepwise import StepwiseReinforceTrainer
from trl_stepwise.rollout import SamplingConfig
from trl_stepwise.trainer import evaluation_cache


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_STEPWISE_CACHE", str(tmp_path / "cache"))


def make_trainer(model, tokenizer, dataset, tmp_path, **overrides):
    args = make_config(tmp_path / "out", eval_num_problems=4, eval_batch_size=4, **overrides)
    return StepwiseReinforceTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def key_of(trainer, rows):
    sampling = SamplingConfig(temperature=0.0, max_step_tokens=trainer.args.max_step_tokens, batch_size=4)
    return evaluation_cache.start_evaluation_key(trainer, rows, sampling, trainer.generation_engine())


def test_the_key_follows_weights_problems_and_evaluation_settings_but_not_training_settings(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    rows = [dict(r) for r in arithmetic_problems.select(range(4))]
    base = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path)
    key = key_of(base, rows)
    assert key == key_of(base, rows)  # deterministic
    training_only = make_trainer(
        make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, learning_rate=0.5, max_steps=7, kl_coef=0.3
    )
    assert key_of(training_only, rows) == key
    other_weights = make_tiny_model()
    with torch.no_grad():
        next(other_weights.parameters())[0, 0] += 1e-3
    assert key_of(make_trainer(other_weights, tokenizer, arithmetic_problems, tmp_path), rows) != key
    assert key_of(base, rows[:3]) != key  # the problems
    changed = [dict(rows[0], question=rows[0]["question"] + " "), *rows[1:]]
    assert key_of(base, changed) != key
    for setting in ({"n_few_shot": 0}, {"eval_max_episode_tokens": 7}, {"calculator": False}):
        other = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, **setting)
        assert key_of(other, rows) != key, setting


def test_the_key_follows_the_cpus_instruction_set(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    """torch and vLLM pick their kernels by the CPU's instructions (AVX2, AVX-512, bfloat16): a cache folder copied
    to another machine must not hand over numbers that machine would not reproduce."""
    rows = [dict(r) for r in arithmetic_problems.select(range(4))]
    trainer = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path)
    key = key_of(trainer, rows)
    monkeypatch.setattr(evaluation_cache, "machine_kernels", lambda: {"cpu_capability": "OTHER", "cuda": None})
    assert key_of(trainer, rows) != key


def _without_wall_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_wall_seconds")}


def test_the_start_evaluation_is_computed_once_and_reused_with_the_same_metrics(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    import trl_stepwise.evaluation as evaluation

    calls = []
    real = evaluation.evaluate_problems

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_problems", counting)
    first = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path).evaluate(arithmetic_problems)
    assert len(calls) == 1
    again = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path).evaluate(arithmetic_problems)
    assert len(calls) == 1 and again == first  # a new run with the same weights and settings: reused

    off = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, cache_start_evaluation=False)
    recomputed = off.evaluate(arithmetic_problems)  # the flag computes it again (its own wall time)
    assert _without_wall_time(recomputed) == _without_wall_time(first) and len(calls) == 2

    trained = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path)
    trained.state.global_step = 3  # after an optimizer step the weights are this run's own: never cached
    trained.evaluate(arithmetic_problems)
    trained.evaluate(arithmetic_problems)
    assert len(calls) == 4


def test_a_cache_folder_that_cannot_be_written_only_costs_the_reuse(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("TRL_STEPWISE_CACHE", str(blocked))
    trainer = make_trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path)
    assert "eval_accuracy" in trainer.evaluate(arithmetic_problems)
