"""Dynamic sampling (DAPO): train only on groups that carry a learning signal, sampling more groups to fill the batch.

A group whose episodes all earned the same thing teaches nothing under a group baseline: its advantages are zero.
With per-step credit "the same thing" means the same return at every step, not only the same final reward: two
episodes that both end wrong, one after a correct first step and one after a wrong one, still differ and still teach.

``fill_with_signal`` keeps the groups of the first round that differ, plays more groups (``play_more``) for at most
``max_rounds`` extra rounds until the batch holds as many groups as asked, and, if the rounds run out, fills the rest
with groups without signal so that every process trains on a batch of the same size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl_stepwise.algorithms import Algorithm
from trl_stepwise.engines.base import derive_seed
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer.scoring import episode_scores

SIGNAL_TOLERANCE = 1e-6
DYNAMIC_SAMPLING_SEED = 0x5D5  # seeds the draw of extra problems apart from every other draw


@dataclass
class PlayedGroups:
    """Episodes played for a step with everything scored so far, aligned by episode: what the batch is cut from."""

    trajectories: list[Trajectory]
    rows: list[dict]
    group_ids: list[int]
    judged: list[list[float]] | None = None  # the judge's per-step scores, when there is a judge
    extra: dict[str, list] = field(default_factory=dict)  # columns reward functions logged with ``log_extra``
    sampled: list[Trajectory] = field(default_factory=list)  # the policy's own episodes (before guidance), all rounds
    sampled_rows: list[dict] = field(default_factory=list)
    guidance: list[tuple[int, int]] = field(default_factory=list)  # (worked solutions played, correct) per round

    def groups(self) -> dict[int, list[int]]:
        """Episode indices of each group, in order of first appearance."""
        out: dict[int, list[int]] = {}
        for i, group in enumerate(self.group_ids):
            out.setdefault(group, []).append(i)
        return out

    def select(self, groups: Sequence[int]) -> PlayedGroups:
        """Only the episodes of ``groups`` (in that order); what was sampled is kept whole."""
        members = self.groups()
        index = [i for group in groups for i in members[group]]
        return PlayedGroups(
            trajectories=[self.trajectories[i] for i in index],
            rows=[self.rows[i] for i in index],
            group_ids=[self.group_ids[i] for i in index],
            judged=None if self.judged is None else [self.judged[i] for i in index],
            extra={name: [values[i] for i in index] for name, values in self.extra.items()},
            sampled=list(self.sampled),
            sampled_rows=list(self.sampled_rows),
            guidance=list(self.guidance),
        )

    def extend(self, other: PlayedGroups) -> None:
        """Append another round's episodes (group ids must not collide); checked before anything changes."""
        if set(self.group_ids) & set(other.group_ids):
            raise ValueError("rounds of dynamic sampling must use new group ids")
        if (self.judged is None) != (other.judged is None):
            raise ValueError("every round must be judged, or none")
        self.trajectories += other.trajectories
        self.rows += other.rows
        self.group_ids += other.group_ids
        if self.judged is not None:
            self.judged += other.judged
        for name in set(self.extra) | set(other.extra):
            mine = self.extra.get(name, [None] * (len(self.trajectories) - len(other.trajectories)))
            self.extra[name] = mine + other.extra.get(name, [None] * len(other.trajectories))
        self.sampled += other.sampled
        self.sampled_rows += other.sampled_rows
        self.guidance += other.guidance


@dataclass
class DynamicSamplingStats:
    """What dynamic sampling did in one step (logged under ``dynamic_sampling/``)."""

    groups_dropped: int = 0  # groups played without signal and left out of the batch
    extra_rounds: int = 0
    episodes_generated: int = 0
    episodes_trained: int = 0
    groups_without_signal_trained: int = 0  # the rounds ran out: groups without signal fill the batch

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic_sampling/groups_dropped": float(self.groups_dropped),
            "dynamic_sampling/extra_rounds": float(self.extra_rounds),
            "dynamic_sampling/episodes_generated_per_trained": self.episodes_generated / max(self.episodes_trained, 1),
            "dynamic_sampling/groups_without_signal_trained": float(self.groups_without_signal_trained),
        }


def groups_with_signal(group_ids: Sequence[int], step_returns: Sequence[Sequence[float]]) -> set[int]:
    """Groups whose episodes differ in their return at some step (an episode that ended earlier counts with its
    last step's return, as the per-step baseline compares them); a group of one episode has no signal."""
    returns_of: dict[int, list[Sequence[float]]] = {}
    for group, returns in zip(group_ids, step_returns, strict=True):
        returns_of.setdefault(group, []).append(returns)
    out = set()
    for group, members in returns_of.items():
        width = max((len(r) for r in members), default=0)
        for t in range(width):
            column = [r[min(t, len(r) - 1)] if r else 0.0 for r in members]
            if max(column) - min(column) > SIGNAL_TOLERANCE:
                out.add(group)
                break
    return out


def fill_with_signal(
    first: PlayedGroups,
    wanted_groups: int,
    play_more: Callable[[int, int], PlayedGroups],
    step_returns: Callable[[PlayedGroups], list[list[float]]],
    max_rounds: int,
) -> tuple[PlayedGroups, DynamicSamplingStats]:
    """Keep the groups with signal, play ``play_more(number_of_problems, round)`` for at most ``max_rounds`` extra
    rounds until ``wanted_groups`` are kept, then fill up with groups without signal if the rounds ran out.

    A round plays as many problems as the last round's share of groups with signal says it takes to fill the gap
    (at most ``wanted_groups``): more episodes per round cost a CPU little beyond the longest episode."""
    stats = DynamicSamplingStats()
    played = first.select(list(first.groups()))  # a copy: the rounds extend it, not the caller's
    last_round = list(first.groups())
    rounds = 0
    while True:
        signal = groups_with_signal(played.group_ids, step_returns(played))
        order = list(played.groups())
        kept = [g for g in order if g in signal]
        missing = wanted_groups - len(kept)
        if missing <= 0 or rounds >= max_rounds:
            break
        share = max(sum(g in signal for g in last_round), 1) / max(len(last_round), 1)
        rounds += 1
        more = play_more(min(wanted_groups, math.ceil(missing / share)), rounds)
        last_round = list(more.groups())
        played.extend(more)
    without = [g for g in order if g not in signal]
    stats.extra_rounds = rounds
    stats.episodes_generated = len(played.trajectories)
    stats.groups_without_signal_trained = max(0, wanted_groups - len(kept))
    stats.groups_dropped = len(without) - stats.groups_without_signal_trained
    batch = played.select(kept[:wanted_groups] + without[: stats.groups_without_signal_trained])
    stats.episodes_trained = len(batch.trajectories)
    return batch, stats


def step_returns(
    played: PlayedGroups, *, algorithm: Algorithm, answer_reward_weight: float, judge_weight: float
) -> list[list[float]]:
    """Each episode's return at every step from its rewards (the KL left out): what the signal test compares."""
    scores = episode_scores(
        played.trajectories,
        played.judged,
        None,
        None,
        answer_reward_weight=answer_reward_weight,
        judge_weight=judge_weight,
    )
    return [algorithm.returns(score.step_rewards) for score in scores]


class ExtraProblems:
    """Problems for the extra rounds: the curriculum's draw, or random training rows drawn by this process alone,
    so that the data loader's epoch (which every process walks in step) is left as it is."""

    def __init__(self, dataset: Any, curriculum: Any, seed: int, rank: int, world_size: int) -> None:
        self.dataset, self.curriculum = dataset, curriculum
        self.rank, self.world_size = rank, world_size
        self.rng = random.Random(derive_seed(seed, DYNAMIC_SAMPLING_SEED, rank))

    def draw(self, count: int) -> list[dict]:
        if self.curriculum is not None:
            return self.curriculum.sample(count, rank=self.rank, world_size=self.world_size)
        return [dict(self.dataset[self.rng.randrange(len(self.dataset))]) for _ in range(count)]
