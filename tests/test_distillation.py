"""Teacher distillation: the term has a gradient, and it moves the policy towards the teacher."""

from __future__ import annotations

import pytest
import torch
from tiny_training import make_config

from trl_stepwise.algorithms import Algorithm, AlgorithmSettings
from trl_stepwise.trainer import StepwiseReinforceTrainer
from trl_stepwise.trainer.batching import completion_logprobs


def _forward_kl(teacher_logits: torch.Tensor, policy_logits: torch.Tensor) -> float:
    teacher = teacher_logits.log_softmax(-1)
    return float((teacher.exp() * (teacher - policy_logits.log_softmax(-1))).sum(-1).mean())


def test_distill_term_on_sampled_tokens_moves_a_categorical_policy_to_the_teacher():
    """Sampling from the policy and minimising the term drives KL(teacher || policy) towards 0."""
    torch.manual_seed(0)
    algorithm = Algorithm(AlgorithmSettings())
    teacher_logits = torch.tensor([2.0, -1.0, 0.5, 1.5, -2.0, 0.0])
    policy_logits = torch.zeros(6, requires_grad=True)
    optimizer = torch.optim.SGD([policy_logits], lr=0.5)
    start = _forward_kl(teacher_logits, policy_logits.detach())
    for _ in range(300):
        with torch.no_grad():
            tokens = torch.multinomial(policy_logits.softmax(-1), 256, replacement=True)
        logps = policy_logits.log_softmax(-1)[tokens]
        loss = algorithm.distill(logps, teacher_logits.log_softmax(-1)[tokens]).mean()
        optimizer.zero_grad()
        loss.backward()
        assert policy_logits.grad.abs().sum() > 0
        optimizer.step()
    end = _forward_kl(teacher_logits, policy_logits.detach())
    assert start > 0.5
    assert end < 0.05 * start


def test_distill_term_is_zero_with_zero_gradient_when_policy_equals_teacher():
    algorithm = Algorithm(AlgorithmSettings())
    logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    term = algorithm.distill(logps, logps.detach())
    term.sum().backward()
    assert torch.allclose(term, torch.zeros(3))
    assert torch.allclose(logps.grad, torch.zeros(3))


def _mean_distill(trainer, batch) -> float:
    with torch.no_grad():
        policy_logps = completion_logprobs(trainer.model, batch, temperature=trainer.args.temperature)
        term = trainer.algorithm.distill(policy_logps, batch["teacher_logps"])
        mask = batch["completion_mask"]
        return float(term[mask].mean())


def test_trainer_distillation_pulls_the_policy_towards_a_frozen_teacher(
    tmp_path, make_tiny_model, tokenizer, arithmetic_problems
):
    policy = make_tiny_model(seed=0)
    teacher = make_tiny_model(seed=1, initializer_range=0.3)  # sharper than the near-uniform random policy
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    # no reward signal and no KL: the distillation term is the only thing the policy learns from
    config = make_config(
        tmp_path, max_steps=2, kl_coef=0.0, answer_reward_weight=0.0, distill_coef=1.0, learning_rate=1e-2
    )
    trainer = StepwiseReinforceTrainer(
        model=policy,
        args=config,
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        teacher_model=teacher,
    )
    (batch,) = trainer._generate_and_score([dict(r) for r in arithmetic_problems.select(range(2))], 1)
    assert "teacher_logps" in batch
    assert torch.count_nonzero(batch["advantages"]) == 0
    teacher_logps = _teacher_logps(teacher, trainer, batch)
    assert torch.allclose(batch["teacher_logps"][batch["completion_mask"]], teacher_logps, atol=1e-5)

    # the trainer's own loss on these sampled steps moves the policy's log-probs towards the teacher's
    before = _mean_distill(trainer, batch)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(10):
        loss = trainer.compute_loss(policy, batch)
        optimizer.zero_grad()
        loss.backward()
        assert sum(p.grad.abs().sum() for p in policy.parameters() if p.grad is not None) > 0
        optimizer.step()
    after = _mean_distill(trainer, batch)
    assert before > 0.1
    assert after < 0.5 * before

    trainer.train()  # the full loop: logged every step, teacher untouched
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    logged = [h["distill/teacher_kl"] for h in trainer.state.log_history if "distill/teacher_kl" in h]
    assert len(logged) == config.max_steps and all(v > 0 for v in logged)


def _teacher_logps(teacher, trainer, batch) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(teacher, batch, temperature=trainer.args.temperature)[batch["completion_mask"]]


def test_distill_coef_without_teacher_is_a_clear_error(tmp_path, tiny_model, tokenizer, arithmetic_problems):
    with pytest.raises(ValueError, match="--teacher_model"):
        StepwiseReinforceTrainer(
            model=tiny_model,
            args=make_config(tmp_path, distill_coef=0.5),
            train_dataset=arithmetic_problems,
            processing_class=tokenizer,
        )
