"""RL algorithms as small objects: per-step advantages and a per-token loss, selected by name.

An algorithm sees episodes through ``EpisodeScores`` (per-step rewards and per-step KL to the reference) and tokens
through tensors; it knows nothing about models or environments. A new algorithm is a subclass that overrides one
method (``advantages`` or ``token_loss``) and registers itself::

    @register_algorithm("my_algo")
    class MyAlgorithm(Algorithm):
        def advantages(self, episodes):
            ...

and is selected with ``StepwiseReinforceConfig(algorithm="my_algo")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BASELINES = ("leave_one_out", "batch_mean", "moving_average", "none")
KL_ESTIMATORS = ("k1", "k3")


@dataclass
class EpisodeScores:
    """What an algorithm needs from one episode."""

    group_id: int
    step_rewards: list[float]  # per-step environment rewards; the final-answer reward is added to the last step
    step_kl: list[float]  # per-step sum of k1 = log pi - log ref over the step's policy tokens (0 without a reference)


@dataclass
class AlgorithmSettings:
    """The knobs shared by every algorithm; ``StepwiseReinforceConfig`` fills them."""

    gamma: float = 1.0
    baseline: str = "leave_one_out"
    scale_advantages: bool = False
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    epsilon: float = 0.2
    loss_normalization: str = "token"  # "token" or "sequence"
    moving_average_decay: float = 0.9


class Algorithm:
    """Stable REINFORCE family: discounted per-step returns minus a baseline; loss -A * ratio (+ KL to reference)."""

    name = "reinforce_stable"
    defaults: dict = {}

    def __init__(self, settings: AlgorithmSettings) -> None:
        self.settings = settings
        self.running_baseline: float | None = None

    # -------------------------------------------------------------- advantages
    def step_rewards(self, episode: EpisodeScores) -> list[float]:
        """Environment rewards, minus the KL penalty per step when the KL is placed in the reward."""
        if not self.settings.kl_in_reward or self.settings.kl_coef == 0.0:
            return list(episode.step_rewards)
        return [r - self.settings.kl_coef * kl for r, kl in zip(episode.step_rewards, episode.step_kl, strict=True)]

    def returns(self, rewards: Sequence[float]) -> list[float]:
        """Discounted return from each step to the end of the episode."""
        out, running = [0.0] * len(rewards), 0.0
        for t in range(len(rewards) - 1, -1, -1):
            running = rewards[t] + self.settings.gamma * running
            out[t] = running
        return out

    def baselines(self, episode_returns: Sequence[float], group_ids: Sequence[int]) -> list[float]:
        """One baseline per episode, from the returns of the whole batch (leave-one-out within each group)."""
        kind, n = self.settings.baseline, len(episode_returns)
        if kind == "none":
            return [0.0] * n
        if kind == "batch_mean":
            mean = sum(episode_returns) / n
            return [mean] * n
        if kind == "moving_average":
            previous = self.running_baseline if self.running_baseline is not None else 0.0
            mean = sum(episode_returns) / n
            decay = self.settings.moving_average_decay
            self.running_baseline = mean if self.running_baseline is None else decay * previous + (1 - decay) * mean
            return [previous] * n
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(group_ids):
            groups.setdefault(g, []).append(i)
        out = [0.0] * n
        for members in groups.values():
            if len(members) < 2:
                raise ValueError(
                    "The leave-one-out baseline needs at least 2 episodes per problem (num_generations >= 2)."
                )
            total = sum(episode_returns[i] for i in members)
            for i in members:
                out[i] = (total - episode_returns[i]) / (len(members) - 1)
        return out

    def advantages(self, episodes: Sequence[EpisodeScores]) -> list[list[float]]:
        """Per-step advantages: return of the step minus the episode's baseline, optionally scaled."""
        step_returns = [self.returns(self.step_rewards(e)) for e in episodes]
        episode_returns = [r[0] if r else 0.0 for r in step_returns]
        baselines = self.baselines(episode_returns, [e.group_id for e in episodes])
        advantages = [[g - b for g in returns] for returns, b in zip(step_returns, baselines, strict=True)]
        if self.settings.scale_advantages and len(episode_returns) > 1:
            mean = sum(episode_returns) / len(episode_returns)
            std = math.sqrt(sum((r - mean) ** 2 for r in episode_returns) / (len(episode_returns) - 1))
            advantages = [[a / (std + 1e-4) for a in adv] for adv in advantages]
        return advantages

    # -------------------------------------------------------------- loss
    def kl(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """Per-token KL(pi || ref) estimate, for metrics and rewards (k1: log-ratio, unbiased; k3: >= 0, low variance)."""
        log_ratio = ref_logps - logps
        if self.settings.kl_estimator == "k1":
            return -log_ratio
        return torch.exp(log_ratio) - log_ratio - 1.0

    def token_loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        ref_logps: torch.Tensor | None,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        """Per-token loss: clipped importance-weighted policy gradient, plus the KL term when it is in the loss."""
        ratio = torch.exp(logps - old_logps)
        clipped = torch.clamp(ratio, 1.0 - self.settings.epsilon, 1.0 + self.settings.epsilon)
        loss = -torch.min(ratio * advantages, clipped * advantages)
        if ref_logps is not None and self.settings.kl_coef > 0.0 and not self.settings.kl_in_reward:
            loss = loss + self.settings.kl_coef * self.kl_loss(logps, old_logps, ref_logps)
        return loss

    def kl_loss(self, logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """Per-token KL term of the loss: its value is the estimator's, its gradient pulls towards the reference.

        k3 (``r - log r - 1``, r = ref / pi): the gradient ``(1 - r) grad log pi`` is, over tokens sampled from pi,
        an unbiased estimate of the gradient of KL(ref || pi) (the reverse direction of the k1 value it reports).

        k1 (``log pi - log ref``): differentiated as it stands its expected gradient is zero (E_pi[grad log pi] = 0),
        so the term uses its score-function form, ``sg(ratio * k1) * grad log pi`` with ratio = pi / pi_rollout:
        over tokens sampled from the rollout policy it estimates the gradient of KL(pi || ref) (per token).
        """
        if self.settings.kl_estimator != "k1":
            return self.kl(logps, ref_logps)
        k1 = (logps - ref_logps).detach()
        weight = (torch.exp(logps - old_logps) * k1).detach()
        return k1 + weight * (logps - logps.detach())

    def distill(self, logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
        """Per-token distillation term on sampled tokens: k3 = r - log r - 1 with r = teacher / policy probability.

        Its gradient, 1 - r, is non-zero wherever policy and teacher disagree; over tokens sampled from the policy it
        is an unbiased estimate of the gradient of the cross-entropy to the teacher, KL(teacher || policy), so the
        term pulls the policy towards the teacher (a plain ``logps - teacher_logps`` has zero expected gradient).
        """
        log_ratio = teacher_logps - logps
        return torch.exp(log_ratio) - log_ratio - 1.0

    def reduce(
        self, token_losses: torch.Tensor, mask: torch.Tensor, num_tokens: float, num_sequences: float
    ) -> torch.Tensor:
        """Sum the masked per-token losses of a micro-batch, normalised over the whole generation batch."""
        mask = mask.to(token_losses.dtype)
        if self.settings.loss_normalization == "sequence":
            per_sequence = (token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            return per_sequence.sum() / max(num_sequences, 1.0)
        return (token_losses * mask).sum() / max(num_tokens, 1.0)


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make an ``Algorithm`` subclass selectable by ``algorithm=name``."""

    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


register_algorithm("reinforce_stable")(Algorithm)


@register_algorithm("reinforce")
class Reinforce(Algorithm):
    """Plain REINFORCE: no baseline unless one is asked for."""

    defaults = {"baseline": "none"}


@register_algorithm("rloo")
class RLOO(Algorithm):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): leave-one-out baseline, KL to the reference in the reward."""

    defaults = {"baseline": "leave_one_out", "kl_in_reward": True, "kl_estimator": "k1"}


def build_algorithm(name: str, settings: AlgorithmSettings) -> Algorithm:
    """Instantiate a registered algorithm; unknown names list the registered ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))}.")
    return ALGORITHMS[name](settings)
