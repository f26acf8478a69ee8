"""The sampler is the policy: what the importance ratio compares under truncated sampling, the per-step gap logged on
every engine, and the runtime guard that stops a run whose engine samples another policy."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_training import length_reward, make_config

import trl_stepwise.trainer.trainer as trainer_module
from trl_stepwise.engines import SamplingConfig, TransformersEngine
from trl_stepwise.engines.base import filter_logits
from trl_stepwise.rollout import StepwiseRollout
from trl_stepwise.trainer import StepwiseReinforceTrainer
from trl_stepwise.trainer.batching import pad_trajectories, score_completions
from trl_stepwise.trainer.metrics import SAMPLER_GAP
from trl_stepwise.trainer.sampler_guard import SamplerMismatchError

GAP = SAMPLER_GAP


def _trainer(model, tokenizer, problems, tmp_path, reward_funcs=(length_reward,), **overrides):
    return StepwiseReinforceTrainer(
        model=model,
        args=make_config(tmp_path, **overrides),
        train_dataset=problems,
        processing_class=tokenizer,
        reward_funcs=list(reward_funcs),
    )


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_filter_keeps_the_top_p_nucleus_and_the_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops
    assert filter_logits(logits, top_k=3).isfinite().tolist() == [[True, True, True, False]]
    assert filter_logits(logits).isfinite().all()


def test_under_top_p_the_trainer_scores_the_engines_truncated_distribution(
    make_tiny_model, tokenizer, arithmetic_problems
):
    """The two readings of the ratio differ here: the full softmax puts log Z < 0 (the mass outside the nucleus)
    between trainer and engine on every token, the truncated one nothing. The trainer compares like with like."""
    model = make_tiny_model(seed=3)
    from trl_stepwise.envs import MathEnv
    from trl_stepwise.prompting import PromptBuilder

    builder = PromptBuilder(tokenizer, list(arithmetic_problems.select(range(2))), k=1, flavour="arithmetic")
    sampling = SamplingConfig(temperature=0.8, top_p=0.5, top_k=0, max_step_tokens=6, seed=1)
    rollout = StepwiseRollout(model, tokenizer, builder, sampling)
    trajectories = rollout.run(
        lambda: MathEnv("arithmetic", max_steps=2), [dict(r) for r in arithmetic_problems.select(range(4))]
    )
    batch = pad_trajectories(
        trajectories, pad_id=tokenizer.pad_token_id, sampling_logps=[t.sampling_logps for t in trajectories]
    )
    with torch.no_grad():
        scores = score_completions(model, batch, temperature=0.8, top_p=0.5)
    mask = batch["sampled_mask"]
    engine = batch["sampling_logps"][mask]
    truncated_gap = (scores.sampling_logps[mask] - engine).abs()
    full_gap = (scores.logps[mask] - engine).abs()
    assert truncated_gap.max() < 1e-4  # the same quantity: the same numbers (fp32, same model)
    assert full_gap.mean() > 0.05  # the full softmax would report a gap that is only the truncation
    assert (scores.logps[mask] <= scores.sampling_logps[mask] + 1e-6).all()  # log p <= log p / Z


def test_the_gap_is_logged_on_every_engine_and_near_zero_when_the_engine_is_the_policy(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    trainer = _trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path, max_steps=2, top_k=20)
    trainer.train()
    gaps = _logged(trainer, GAP)
    assert len(gaps) == 2 and all(0.0 <= g < 1e-3 for g in gaps)
    assert not _logged(trainer, "sampling/importance_sampling_ratio/mean")  # no correction without vLLM


class _OffsetEngine(TransformersEngine):
    """An engine that samples the policy but reports log-probs shifted by ``offset``: a sampler of another policy."""

    offset = -1.0

    def _sample(self, logits, sampling):
        tokens, logprobs = super()._sample(logits, sampling)
        return tokens, logprobs + self.offset


def test_the_guard_stops_after_patience_steps_in_a_row(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        trainer_module, "build_engine", lambda args, model, tokenizer, seed=0: _OffsetEngine(model, tokenizer)
    )
    trainer = _trainer(
        make_tiny_model(),
        tokenizer,
        arithmetic_problems,
        tmp_path,
        max_steps=5,
        sampler_logprob_tolerance=0.5,
        sampler_logprob_patience=2,
    )
    with pytest.raises(
        SamplerMismatchError, match=r"step 2: .*differ from the trainer's by 1\.000 .*2 steps in a row"
    ) as err:
        trainer.train()
    assert trainer.state.global_step == 2
    assert "\n" not in str(err.value)


def test_the_guard_is_off_at_tolerance_zero_and_a_small_gap_passes(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        trainer_module, "build_engine", lambda args, model, tokenizer, seed=0: _OffsetEngine(model, tokenizer)
    )
    trainer = _trainer(
        make_tiny_model(), tokenizer, arithmetic_problems, tmp_path / "off", max_steps=3, sampler_logprob_tolerance=0
    )
    trainer.train()
    assert trainer.state.global_step == 3 and all(math.isclose(g, 1.0, abs_tol=1e-3) for g in _logged(trainer, GAP))
    _OffsetEngine.offset = -0.1
    try:
        trainer = _trainer(make_tiny_model(), tokenizer, arithmetic_problems, tmp_path / "small", max_steps=3)
        trainer.train()  # 0.1 per token stays under the default tolerance
        assert trainer.state.global_step == 3
    finally:
        _OffsetEngine.offset = -1.0


def test_reference_solutions_are_not_compared_with_the_engine(
    make_tiny_model, tokenizer, arithmetic_problems, tmp_path
):
    """A worked solution played in was not sampled: its tokens get weight 1 and stay out of the gap."""
    trainer = _trainer(
        make_tiny_model(),
        tokenizer,
        arithmetic_problems,
        tmp_path,
        reference_guidance=True,
        max_steps=1,
        reward_funcs=(),
    )
    problems = [dict(r) for r in arithmetic_problems.select(range(2))]
    batches = trainer._generate_and_score(problems, 1)
    (batch,) = batches
    guided = [not t for t in batch["sampled_mask"].any(dim=1).tolist()]
    assert any(guided), "a random tiny model fails every problem: each group gets its worked solution"
    assert (batch["sampled_mask"] <= batch["completion_mask"]).all()
