"""The KL terms in the loss, checked by their exact expected gradient on a small categorical policy.

A single token drawn from a 5-way categorical pi = softmax(theta): enumerating the outcomes gives the exact expectation
E_{a ~ sampler}[grad token_loss(a)], which is compared with autograd of the true divergences.
"""

from __future__ import annotations

import pytest
import torch

from trl_stepwise.algorithms import Algorithm, AlgorithmSettings

THETA = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.4], dtype=torch.float64)
REF_LOGITS = torch.tensor([1.0, 0.5, -0.5, 0.2, -2.0], dtype=torch.float64)
OLD_LOGITS = torch.tensor([0.0, -0.5, 1.5, 0.5, 0.1], dtype=torch.float64)
KL_COEF = 0.5


def expected_kl_gradient(estimator: str, sampler_logits: torch.Tensor | None = None) -> torch.Tensor:
    """E_{a ~ sampler}[d token_loss(a) / d theta] with zero advantages, so only the KL term contributes."""
    theta = THETA.clone().requires_grad_(True)
    logps = torch.log_softmax(theta, -1)
    ref = torch.log_softmax(REF_LOGITS, -1)
    old = logps.detach() if sampler_logits is None else torch.log_softmax(sampler_logits, -1)
    algorithm = Algorithm(AlgorithmSettings(kl_coef=KL_COEF, kl_estimator=estimator, epsilon=1e9))
    losses = algorithm.token_loss(logps, old, ref, torch.zeros_like(logps))
    (old.exp() * losses).sum().backward()
    return theta.grad


def true_gradient(direction: str) -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    logp, ref = torch.log_softmax(theta, -1), torch.log_softmax(REF_LOGITS, -1)
    kl = (logp.exp() * (logp - ref)).sum() if direction == "pi||ref" else (ref.exp() * (ref - logp)).sum()
    (KL_COEF * kl).backward()
    return theta.grad


def test_k1_kl_in_the_loss_has_the_gradient_of_kl_pi_ref():
    got = expected_kl_gradient("k1")
    assert got.abs().max() > 1e-3  # a plain (logp - ref) term would give exactly 0 here
    assert torch.allclose(got, true_gradient("pi||ref"), atol=1e-12)


def test_k1_kl_in_the_loss_stays_right_off_policy():
    # later iterations on one batch (num_iterations > 1) sample from the rollout policy, not from pi
    assert torch.allclose(expected_kl_gradient("k1", OLD_LOGITS), true_gradient("pi||ref"), atol=1e-12)


def test_k1_kl_in_the_loss_reports_the_k1_value():
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    algorithm = Algorithm(AlgorithmSettings(kl_coef=1.0, kl_estimator="k1"))
    loss = algorithm.token_loss(logps, logps, ref, torch.zeros(2))
    assert torch.allclose(loss, logps - ref)


def test_k3_kl_in_the_loss_has_the_gradient_of_kl_ref_pi():
    got = expected_kl_gradient("k3")
    assert torch.allclose(got, true_gradient("ref||pi"), atol=1e-12)
    assert not torch.allclose(got, true_gradient("pi||ref"), atol=1e-3)  # the two directions differ here


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_term_gradient_is_zero_at_the_reference(estimator):
    theta = REF_LOGITS.clone().requires_grad_(True)
    logps, ref = torch.log_softmax(theta, -1), torch.log_softmax(REF_LOGITS, -1)
    algorithm = Algorithm(AlgorithmSettings(kl_coef=KL_COEF, kl_estimator=estimator))
    (logps.detach().exp() * algorithm.token_loss(logps, logps.detach(), ref, torch.zeros(5))).sum().backward()
    assert torch.allclose(theta.grad, torch.zeros(5, dtype=torch.float64), atol=1e-12)
