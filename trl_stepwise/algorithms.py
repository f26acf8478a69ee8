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
SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "cispo")  # TRL's names; see ``Algorithm.reduce``
LOSS_NORMALIZATION_ALIASES = {"token": "dapo", "sequence": "grpo"}  # the older spelling of loss_type
CISPO_DEFAULT_EPSILON_HIGH = 5.0


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
    scale_advantages: bool = False  # older spelling of scale_rewards="batch"
    scale_rewards: str = "none"  # divide advantages by a return std: "group", "batch" or "none" (GRPO's names)
    baseline_per_step: bool = True  # compare step t with step t of the others (vs. with their episode returns)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    epsilon: float = 0.2
    epsilon_high: float | None = None  # upper clip range (default: epsilon); cispo: the largest weight (default 5)
    loss_type: str | None = None  # one of LOSS_TYPES (default dapo)
    loss_normalization: str | None = None  # older spelling: token = dapo, sequence = grpo
    importance_sampling_level: str = "token"  # "token" or "sequence" (GSPO: one ratio per episode)
    max_completion_length: int = 384  # dr_grpo's constant: the episode token budget
    moving_average_decay: float = 0.9
    importance_sampling: str | None = None  # correct for the engine's sampling: "token_truncate", "token_mask", None
    importance_sampling_clip_max: float = 2.0

    def __post_init__(self) -> None:
        """Settle ``loss_type`` (``loss_normalization`` is its older spelling) and ``epsilon_high``; check both."""
        alias = self.loss_normalization
        if alias is not None and alias not in LOSS_NORMALIZATION_ALIASES:
            raise ValueError(f"loss_normalization={alias!r}; choose token or sequence (or use --loss_type).")
        from_alias = LOSS_NORMALIZATION_ALIASES.get(alias) if alias is not None else None
        if from_alias is not None and self.loss_type is not None and self.loss_type != from_alias:
            raise ValueError(
                f"loss_normalization={alias} and loss_type={self.loss_type} disagree: loss_normalization={alias} is "
                f"loss_type={from_alias}; set only --loss_type."
            )
        self.loss_type = self.loss_type or from_alias or "dapo"
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}.")
        if self.epsilon_high is None:
            self.epsilon_high = default_epsilon_high(self.loss_type, self.epsilon)


@dataclass
class BehaviourLogps:
    """How the sampled tokens were drawn: the engine's log-probs, the trainer's under the same sampling filter at the
    weights that sampled them, and which tokens the engine sampled (not tool results, not reference episodes)."""

    engine: torch.Tensor
    trainer: torch.Tensor
    mask: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        """log pi_trainer - log pi_engine per sampled token (0 elsewhere)."""
        return torch.where(self.mask, self.trainer - self.engine, torch.zeros_like(self.trainer))


class Algorithm:
    """Stable REINFORCE family: discounted per-step returns minus a baseline; loss -A * ratio (+ KL to reference)."""

    name = "reinforce_stable"
    defaults: dict = {}

    def __init__(self, settings: AlgorithmSettings) -> None:
        self.settings = settings
        self.running_baseline: float | list[float] | None = None  # a list (one per step index) when per step

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
            return [self._moving_average([sum(episode_returns) / n], per_step=False)[0]] * n
        out = [0.0] * n
        for members in _groups(group_ids).values():
            if len(members) < 2:
                raise ValueError(
                    "The leave-one-out baseline needs at least 2 episodes per problem (num_generations >= 2)."
                )
            total = sum(episode_returns[i] for i in members)
            for i in members:
                out[i] = (total - episode_returns[i]) / (len(members) - 1)
        return out

    def _moving_average(self, means: Sequence[float], per_step: bool) -> list[float]:
        """The running baseline before this batch (one value per step index, lagging one batch), then updated.

        Step indices not seen yet start from the last known one, so without step rewards (every step's return is
        the episode return) the per-step average equals the per-episode one.
        """
        running = self.running_baseline
        history = [] if running is None else (list(running) if isinstance(running, list) else [float(running)])
        previous = [history[min(t, len(history) - 1)] if history else 0.0 for t in range(len(means))]
        decay = self.settings.moving_average_decay
        updated = [decay * p + (1 - decay) * m if history else m for p, m in zip(previous, means, strict=True)]
        updated += history[len(updated) :]
        self.running_baseline = updated if per_step else updated[0]
        return previous

    def scales(self, returns: Sequence[float], group_ids: Sequence[int]) -> list[float]:
        """Divisor of each episode's advantage: 1, or the return std of its group / of the batch, plus 1e-4."""
        kind = self.settings.scale_rewards
        if kind == "none" and self.settings.scale_advantages:
            kind = "batch"
        if kind == "none":
            return [1.0] * len(returns)
        if kind == "batch":
            return [_std(returns) + 1e-4] * len(returns)
        out = [1.0] * len(returns)
        for members in _groups(group_ids).values():
            std = _std([returns[i] for i in members])
            for i in members:
                out[i] = std + 1e-4
        return out

    def advantages(self, episodes: Sequence[EpisodeScores]) -> list[list[float]]:
        """Per-step advantages: return of the step minus its baseline, optionally scaled.

        Per step (the default), step t of an episode is compared with step t of the others (an episode that ended
        earlier counts with its last step's return), so that a tied group has zero advantages at every step even
        with per-step rewards or gamma < 1; otherwise every step uses the baseline of the episode returns.
        """
        step_returns = [self.returns(self.step_rewards(e)) for e in episodes]
        group_ids = [e.group_id for e in episodes]
        if not self.settings.baseline_per_step:
            episode_returns = [r[0] if r else 0.0 for r in step_returns]
            baselines = self.baselines(episode_returns, group_ids)
            scales = self.scales(episode_returns, group_ids)
            return [
                [(g - b) / s for g in returns] for returns, b, s in zip(step_returns, baselines, scales, strict=True)
            ]
        width = max((len(r) for r in step_returns), default=0)
        columns = [[r[min(t, len(r) - 1)] if r else 0.0 for r in step_returns] for t in range(width)]
        if self.settings.baseline == "moving_average":
            previous = self._moving_average([sum(c) / len(c) for c in columns], per_step=True)
            baselines = [[p] * len(episodes) for p in previous]
        else:
            baselines = [self.baselines(column, group_ids) for column in columns]
        scales = [self.scales(column, group_ids) for column in columns]
        return [
            [(g - baselines[t][i]) / scales[t][i] for t, g in enumerate(returns)]
            for i, returns in enumerate(step_returns)
        ]

    # -------------------------------------------------------------- loss
    def kl(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """Per-token KL(pi || ref) estimate for metrics and rewards (k1: log-ratio, unbiased; k3: >= 0, low var.)."""
        log_ratio = ref_logps - logps
        if self.settings.kl_estimator == "k1":
            return -log_ratio
        return torch.exp(log_ratio) - log_ratio - 1.0

    def importance_weights(self, behaviour: BehaviourLogps | None) -> torch.Tensor | None:
        """Per-token truncated importance weights correcting for the engine's sampling (None: no correction):
        min(ratio, C) (token_truncate) or 1[ratio <= C] (token_mask), ratio = pi_trainer / pi_engine."""
        mode = self.settings.importance_sampling
        if mode is None or behaviour is None:
            return None
        return importance_weights(behaviour.gap, mode, self.settings.importance_sampling_clip_max)

    def token_loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        ref_logps: torch.Tensor | None,
        advantages: torch.Tensor,
        behaviour: BehaviourLogps | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token loss: the clipped importance-weighted policy gradient (cispo: the clipped weight, not
        differentiated, times ``-A log pi``), plus the KL term when it is in the loss.

        The ratio is per token, or per episode with ``importance_sampling_level="sequence"`` (the geometric mean of
        its policy tokens' ratios, ``mask`` saying which count); each token keeps its own step's advantage. The
        engine's sampling is corrected by weighting each token's policy-gradient term (linear in the advantage, so
        the advantage alone is weighted; the KL term is not)."""
        settings = self.settings
        weights = self.importance_weights(behaviour)
        if weights is not None:
            advantages = advantages * weights
        ratio = torch.exp(self.log_ratio(logps, old_logps, mask))
        if settings.loss_type == "cispo":
            loss = -torch.clamp(ratio, max=settings.epsilon_high).detach() * advantages * logps
        else:
            clipped = torch.clamp(ratio, 1.0 - settings.epsilon, 1.0 + settings.epsilon_high)
            loss = -torch.min(ratio * advantages, clipped * advantages)
        if ref_logps is not None and settings.kl_coef > 0.0 and not settings.kl_in_reward:
            loss = loss + settings.kl_coef * self.kl_loss(logps, old_logps, ref_logps)
        return loss

    def log_ratio(self, logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``log pi / pi_old`` per token (B, T), or per episode (B, 1) at ``importance_sampling_level="sequence"``."""
        log_ratio = logps - old_logps
        if self.settings.importance_sampling_level != "sequence":
            return log_ratio
        weight = torch.ones_like(log_ratio) if mask is None else mask.to(log_ratio.dtype)
        return ((log_ratio * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)).unsqueeze(-1)

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
        self,
        token_losses: torch.Tensor,
        mask: torch.Tensor,
        num_tokens: float,
        num_sequences: float,
        num_micro_batches: int = 1,
    ) -> torch.Tensor:
        """Sum the masked per-token losses of a micro-batch, normalised as ``loss_type`` says (TRL's names);
        ``num_tokens`` and ``num_sequences`` count the whole generation batch over every process (divided by the
        process count), so the micro-batches of an optimizer step add up to the batch's loss:

        - dapo, cispo: sum over tokens / policy tokens of the batch (each token weighs the same);
        - grpo: sum over episodes of the episode's token mean / episodes (each episode weighs the same);
        - bnpo: token mean of this micro-batch / micro-batches per step (as TRL's, local to the micro-batch);
        - dr_grpo: sum over tokens / (episodes x ``max_completion_length``) (a constant: no length bias).
        """
        mask = mask.to(token_losses.dtype)
        masked = token_losses * mask
        loss_type = self.settings.loss_type
        if loss_type == "grpo":
            per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
            return per_sequence.sum() / max(num_sequences, 1.0)
        if loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / max(num_micro_batches, 1)
        if loss_type == "dr_grpo":
            return masked.sum() / (max(num_sequences, 1.0) * self.settings.max_completion_length)
        return masked.sum() / max(num_tokens, 1.0)


def default_epsilon_high(loss_type: str | None, epsilon: float) -> float:
    """``epsilon`` (symmetric clipping), or for cispo the largest importance weight ScaleRL recommends (5.0)."""
    return CISPO_DEFAULT_EPSILON_HIGH if loss_type == "cispo" else epsilon


def importance_weights(gap: torch.Tensor, mode: str, clip_max: float) -> torch.Tensor:
    """Per-token truncated importance weights from ``gap`` = log pi_trainer - log pi_engine of each sampled token:
    min(ratio, C) (token_truncate) or 1[ratio <= C] (token_mask)."""
    ratio = torch.exp(gap.detach())
    if mode == "token_mask":
        return (ratio <= clip_max).to(ratio.dtype)
    return ratio.clamp(max=clip_max)


def _groups(group_ids: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values), as torch.std and GRPO use."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


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
