"""From played episodes to per-token advantages: reward functions, the judge, per-step returns and the KL per step.

One function, ``step_rewards``, builds what an episode earned step by step (its return is their sum); the
algorithm turns those into advantages over the episodes of every process, as GRPO's batch baselines see them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import gather_object

from trl_stepwise.algorithms import Algorithm, EpisodeScores
from trl_stepwise.envs import Episode
from trl_stepwise.rewards import combine_rewards, unique_name
from trl_stepwise.rollout import Trajectory


def step_rewards(
    episode: Episode,
    *,
    answer_reward_weight: float = 1.0,
    judged: Sequence[float] | None = None,
    judge_weight: float = 0.0,
) -> list[float]:
    """The rewards of an episode's steps: the environment's per-step rewards (+ the judge's, weighted), with the
    final reward (weighted by ``answer_reward_weight``) on the last step. Their sum is the episode's return."""
    rewards = list(episode.step_rewards)
    if judged is not None:
        rewards = [r + judge_weight * j for r, j in zip(rewards, judged, strict=True)]
    if rewards:
        rewards[-1] += answer_reward_weight * episode.final_reward
    return rewards


def episode_return(episode: Episode, **weights: Any) -> float:
    """What an episode earned in total (see ``step_rewards``)."""
    return sum(step_rewards(episode, **weights))


def step_kl(trajectory: Trajectory, policy_logps: Sequence[float], ref_logps: Sequence[float]) -> list[float]:
    """Per-step sum of ``log pi - log ref`` over the step's sampled tokens (the KL the algorithm may put in the
    reward)."""
    kl = [0.0] * len(trajectory.episode.steps)
    for token, (lp, rp) in enumerate(zip(policy_logps, ref_logps, strict=True)):
        if trajectory.policy_mask[token] and trajectory.step_index[token] < len(kl):
            kl[trajectory.step_index[token]] += lp - rp
    return kl


def episode_scores(
    trajectories: Sequence[Trajectory],
    judged: Sequence[Sequence[float]] | None,
    policy_logps: Sequence[Sequence[float]] | None,
    ref_logps: Sequence[Sequence[float]] | None,
    *,
    answer_reward_weight: float,
    judge_weight: float,
) -> list[EpisodeScores]:
    """What the algorithm sees of each episode: its step rewards, and its KL per step when both log-probs exist."""
    scores = []
    for i, trajectory in enumerate(trajectories):
        episode = trajectory.episode
        rewards = step_rewards(
            episode,
            answer_reward_weight=answer_reward_weight,
            judged=None if judged is None else judged[i],
            judge_weight=judge_weight,
        )
        has_kl = ref_logps is not None and policy_logps is not None
        kl = step_kl(trajectory, policy_logps[i], ref_logps[i]) if has_kl else [0.0] * len(episode.steps)
        scores.append(EpisodeScores(episode.group_id, rewards, kl))
    return scores


def token_advantages(trajectories: Sequence[Trajectory], step_advantages: Sequence[list[float]]) -> list[list[float]]:
    """Each completion token gets the advantage of the step it belongs to."""
    return [
        [adv[min(s, len(adv) - 1)] if adv else 0.0 for s in trajectory.step_index]
        for trajectory, adv in zip(trajectories, step_advantages, strict=True)
    ]


def global_advantages(algorithm: Algorithm, scores: list[EpisodeScores], accelerator: Any) -> list[list[float]]:
    """Advantages over the episodes of every process (batch baselines and batch scaling see the global batch, as in
    GRPO); each process keeps its own episodes' share."""
    if accelerator.num_processes == 1:
        return algorithm.advantages(scores)
    parts = gather_object([scores])
    advantages = algorithm.advantages([s for part in parts for s in part])
    start = sum(len(part) for part in parts[: accelerator.process_index])
    return advantages[start : start + len(scores)]


def global_normalisers(
    trajectories: Sequence[Trajectory], accelerator: Any, out_of_loss: Sequence[bool] | None = None
) -> tuple[float, float]:
    """Policy tokens and episodes of the step over all processes, divided by the process count: each process then
    holds sum_local / (count / P), and DDP's mean of the P gradients is the gradient of sum_all / count. Tokens of
    episodes ``out_of_loss`` are not counted (the episodes are, as TRL's per-episode means count them)."""
    out_of_loss = out_of_loss or [False] * len(trajectories)
    tokens = sum(t.num_policy_tokens for t, dropped in zip(trajectories, out_of_loss, strict=True) if not dropped)
    local = torch.tensor([float(tokens), float(len(trajectories))], device=accelerator.device)
    processes = accelerator.num_processes
    total = accelerator.gather(local).reshape(processes, 2).sum(0) if processes > 1 else local
    return float(total[0]) / processes, float(total[1]) / processes


def add_reward_funcs(
    reward_funcs: Sequence[Callable],
    reward_weights: Sequence[float] | None,
    trajectories: Sequence[Trajectory],
    *,
    trainer_state: Any = None,
    log_metric: Callable[[str, float], None] | None = None,
) -> dict[str, list]:
    """Call the reward functions once on the whole rollout with TRL's arguments; add the weighted sums to each
    episode's final reward and their raw scores to its reward components. Returns the columns the functions logged
    with TRL's ``log_extra``."""
    extra: dict[str, list] = defaultdict(list)
    if not reward_funcs:
        return extra
    episodes = [t.episode for t in trajectories]
    prompts = [
        getattr(t.env, "prompt_messages", None) or e.row.get("prompt", e.row.get("question"))
        for t, e in zip(trajectories, episodes, strict=True)
    ]
    conversational = any(is_messages(p) for p in prompts)
    completions = [
        list(getattr(t.env, "messages", None) or [{"role": "assistant", "content": t.episode.completion}])
        if conversational
        else t.episode.completion
        for t in trajectories
    ]
    # TRL's environment_factory objects, one per episode (None where an episode played another environment)
    users = [getattr(t.env, "env", None) if getattr(t.env, "chat", False) else None for t in trajectories]
    environments = {"environments": users} if any(u is not None for u in users) else {}
    totals, components = combine_rewards(
        reward_funcs,
        reward_weights,
        completions,
        [e.row for e in episodes],
        prompts=prompts,
        completion_ids=[list(t.completion_ids) for t in trajectories],
        trainer_state=trainer_state,
        log_metric=log_metric,
        log_extra=lambda column, values: extra[column].extend(values),
        **environments,
    )
    for episode, total, parts in zip(episodes, totals, components, strict=True):
        episode.final_reward += total
        for name, value in parts.items():
            episode.reward_components[unique_name(name, episode.reward_components)] = value
    return extra


def judge_step_rewards(judge: Any, trajectories: Sequence[Trajectory]) -> tuple[list[list[float]], dict[str, float]]:
    """Per-step scores from the judge (every step of the batch in one batched pass per question), and its
    metrics."""
    from trl_stepwise.judge import judge_items

    items, owners = [], []
    for i, trajectory in enumerate(trajectories):
        episode = trajectory.episode
        steps = [step.text for step in episode.steps]
        items.extend(judge_items(str(episode.row.get("question", "")), steps))
        owners.extend([i] * len(steps))
    started = time.perf_counter()
    scores = judge.score(items)
    per_episode: list[list[float]] = [[] for _ in trajectories]
    for owner, score in zip(owners, scores, strict=True):
        per_episode[owner].append(float(score))
    metrics = {"time/judge_s": time.perf_counter() - started}
    if scores:
        metrics["judge/step_score"] = sum(scores) / len(scores)
    return per_episode, metrics


def is_messages(value: Any) -> bool:
    """Whether a prompt is conversational (a list of chat messages), as TRL's ``is_conversational`` decides."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)
