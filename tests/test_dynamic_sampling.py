"""Dynamic sampling (DAPO): which groups carry signal, filling the batch with extra rounds, drawing extra problems."""

from __future__ import annotations

import functools

import pytest
from datasets import Dataset

from trl_stepwise.algorithms import Algorithm, AlgorithmSettings
from trl_stepwise.envs import Episode
from trl_stepwise.envs.base import StepRecord
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer.dynamic_sampling import (
    ExtraProblems,
    PlayedGroups,
    fill_with_signal,
    groups_with_signal,
    step_returns,
)


def trajectory(episode_id: int, group: int, rewards=(0.0,), final: float = 0.0) -> Trajectory:
    steps = [StepRecord(text=f"s{t}", segments=[], reward=r) for t, r in enumerate(rewards)]
    row = {"question": f"q{group}", "answer": "1"}
    episode = Episode(episode_id=episode_id, group_id=group, row=row, steps=steps, final_reward=final)
    return Trajectory(episode=episode, prompt_ids=[1], completion_ids=[2], policy_mask=[True], step_index=[0])


def played_from(episodes: list[tuple[int, tuple, float]], judged=None) -> PlayedGroups:
    """Episodes as (group, step rewards, final reward)."""
    trajectories = [trajectory(i, g, rewards, final) for i, (g, rewards, final) in enumerate(episodes)]
    rows = [t.episode.row for t in trajectories]
    return PlayedGroups(trajectories=trajectories, rows=rows, group_ids=[g for g, _, _ in episodes], judged=judged)


def round_of(group_ids: list[int], with_signal: set[int]) -> PlayedGroups:
    """Two one-step episodes per group (final rewards 1 and 0 with signal, 1 and 1 without), with a judged column and
    an extra column that both name the episode, and every episode recorded as sampled."""
    trajectories = [
        trajectory(10 * g + k, g, (0.0,), 1.0 if k == 0 or g not in with_signal else 0.0)
        for g in group_ids
        for k in range(2)
    ]
    rows = [t.episode.row for t in trajectories]
    return PlayedGroups(
        trajectories=trajectories,
        rows=rows,
        group_ids=[t.episode.group_id for t in trajectories],
        judged=[[float(t.episode.episode_id)] for t in trajectories],
        extra={"tag": [f"e{t.episode.episode_id}" for t in trajectories]},
        sampled=list(trajectories),
        sampled_rows=list(rows),
    )


RETURNS = functools.partial(
    step_returns, algorithm=Algorithm(AlgorithmSettings(gamma=1.0)), answer_reward_weight=1.0, judge_weight=0.0
)


class ScriptedRounds:
    """``play_more``: ``n`` new groups (ids 100 * round + k); ``signal[round]`` holds the k that carry signal."""

    def __init__(self, signal: dict[int, set[int]] | None = None) -> None:
        self.signal, self.calls = signal or {}, []

    def __call__(self, n: int, round_number: int) -> PlayedGroups:
        self.calls.append((n, round_number))
        ids = [100 * round_number + k for k in range(n)]
        return round_of(ids, {100 * round_number + k for k in self.signal.get(round_number, set())})


def never_called(n: int, round_number: int) -> PlayedGroups:
    raise AssertionError("play_more must not be called")


def batch_groups(batch: PlayedGroups) -> list[int]:
    return list(batch.groups())


def test_groups_with_signal_compares_returns_step_by_step():
    played = played_from(
        [
            (0, (1.0, 0.0), 0.0),  # returns [1, 0]: same final reward and total as the next, differs at step 1
            (0, (0.0, 1.0), 0.0),  # returns [1, 1]
            (1, (0.5, 0.0), 1.0),  # identical episodes: [1.5, 1]
            (1, (0.5, 0.0), 1.0),
            (2, (0.0,), 1.0),  # ended after one step with return 1; the others' later returns are 1 too
            (2, (0.0, 0.0, 0.0), 1.0),  # [1, 1, 1]
            (3, (0.0,), 1.0),  # ended early with 1, but the other's step 1 returns 0.5
            (3, (0.5, 0.0), 0.5),  # [1, 0.5]
            (4, (0.0,), 1.0),  # a group of one episode
            (5, (0.0,), 1.0),  # differs by less than the tolerance
            (5, (0.0,), 1.0 + 1e-7),
        ]
    )
    returns = RETURNS(played)
    assert returns[:2] == [[1.0, 0.0], [1.0, 1.0]]
    assert returns[5] == [1.0, 1.0, 1.0] and returns[7] == [1.0, 0.5]
    assert groups_with_signal(played.group_ids, returns) == {0, 3}


def test_groups_with_signal_needs_aligned_inputs():
    with pytest.raises(ValueError):
        groups_with_signal([0, 0], [[1.0]])


def test_discounting_gives_signal_to_episodes_of_different_lengths():
    """Both earn 1 at the end; undiscounted they tie at every step, with gamma = 0.5 the longer one's first step
    is worth 0.5."""
    played = played_from([(0, (0.0,), 1.0), (0, (0.0, 0.0), 1.0)])
    undiscounted = RETURNS(played)
    discounted = step_returns(
        played, algorithm=Algorithm(AlgorithmSettings(gamma=0.5)), answer_reward_weight=1.0, judge_weight=0.0
    )
    assert undiscounted == [[1.0], [1.0, 1.0]]
    assert discounted == [[1.0], [0.5, 1.0]]
    assert groups_with_signal(played.group_ids, undiscounted) == set()
    assert groups_with_signal(played.group_ids, discounted) == {0}


def test_judge_scores_give_signal_only_when_weighted():
    played = played_from([(0, (0.0, 0.0), 1.0), (0, (0.0, 0.0), 1.0)], judged=[[1.0, 0.0], [0.0, 1.0]])
    algorithm = Algorithm(AlgorithmSettings(gamma=1.0))
    weighted = step_returns(played, algorithm=algorithm, answer_reward_weight=2.0, judge_weight=0.5)
    unweighted = step_returns(played, algorithm=algorithm, answer_reward_weight=2.0, judge_weight=0.0)
    assert weighted == [[2.5, 2.0], [2.5, 2.5]]
    assert unweighted == [[2.0, 2.0], [2.0, 2.0]]
    assert groups_with_signal(played.group_ids, weighted) == {0}
    assert groups_with_signal(played.group_ids, unweighted) == set()


def test_enough_signal_in_the_first_round_plays_no_more():
    first = round_of([0, 1, 2, 3, 4], with_signal={0, 2, 3, 4})
    batch, stats = fill_with_signal(first, 3, never_called, RETURNS, max_rounds=3)
    assert batch_groups(batch) == [0, 2, 3]
    assert stats.extra_rounds == 0 and stats.groups_dropped == 1 and stats.groups_without_signal_trained == 0
    assert (stats.episodes_generated, stats.episodes_trained) == (10, 6)


def test_extra_rounds_fill_the_batch_with_groups_with_signal():
    first = round_of([0, 1, 2, 3], with_signal={1})
    play_more = ScriptedRounds({1: {0, 2}, 2: {0, 1}})
    batch, stats = fill_with_signal(first, 4, play_more, RETURNS, max_rounds=5)
    # round 1: 3 missing at a share of 1/4 -> 12 problems, capped at 4; round 2: 1 missing at 2/4 -> 2 problems
    assert play_more.calls == [(4, 1), (2, 2)]
    assert batch_groups(batch) == [1, 100, 102, 200]
    assert groups_with_signal(batch.group_ids, RETURNS(batch)) == {1, 100, 102, 200}
    assert stats.extra_rounds == 2
    assert stats.groups_dropped == 5  # 0, 2, 3, 101, 103 (200's neighbour 201 has signal but is not needed)
    assert stats.groups_without_signal_trained == 0
    assert (stats.episodes_generated, stats.episodes_trained) == (20, 8)
    assert stats.metrics()["dynamic_sampling/episodes_generated_per_trained"] == 2.5


def test_share_of_the_last_round_sets_the_number_of_problems():
    first = round_of([0, 1, 2, 3], with_signal={0, 1, 2})
    play_more = ScriptedRounds({1: {0, 1}})
    batch, stats = fill_with_signal(first, 4, play_more, RETURNS, max_rounds=5)
    assert play_more.calls == [(2, 1)]  # 1 missing at a share of 3/4 -> ceil(4/3) = 2
    assert batch_groups(batch) == [0, 1, 2, 100]
    assert stats.groups_dropped == 1 and stats.extra_rounds == 1


def test_rounds_running_out_fill_the_batch_with_groups_without_signal():
    first = round_of([0, 1, 2, 3], with_signal={2})
    play_more = ScriptedRounds()
    batch, stats = fill_with_signal(first, 4, play_more, RETURNS, max_rounds=2)
    # a round without signal counts as one group with signal: share 1/4 -> 4 problems each round
    assert play_more.calls == [(4, 1), (4, 2)]
    assert batch_groups(batch) == [2, 0, 1, 3]
    assert len(batch.trajectories) == 8
    assert stats.extra_rounds == 2
    assert stats.groups_without_signal_trained == 3
    assert stats.groups_dropped == 8
    assert (stats.episodes_generated, stats.episodes_trained) == (24, 8)


def test_no_extra_rounds_allowed_never_plays_more():
    first = round_of([0, 1, 2, 3], with_signal={3})
    batch, stats = fill_with_signal(first, 4, never_called, RETURNS, max_rounds=0)
    assert batch_groups(batch) == [3, 0, 1, 2]
    assert stats.extra_rounds == 0 and stats.groups_without_signal_trained == 3 and stats.groups_dropped == 0


def test_selected_batch_keeps_columns_aligned_and_every_sampled_episode():
    first = round_of([0, 1, 2], with_signal={2})
    batch, _ = fill_with_signal(first, 2, ScriptedRounds({1: {0}}), RETURNS, max_rounds=1)
    ids = [t.episode.episode_id for t in batch.trajectories]
    assert batch_groups(batch) == [2, 100]
    assert ids == [20, 21, 1000, 1001]
    assert batch.judged == [[float(i)] for i in ids]
    assert batch.extra == {"tag": [f"e{i}" for i in ids]}
    assert batch.rows == [t.episode.row for t in batch.trajectories]
    assert [t.episode.episode_id for t in batch.sampled] == [0, 1, 10, 11, 20, 21, 1000, 1001, 1010, 1011]
    assert len(batch.sampled_rows) == 10


def test_extend_refuses_colliding_group_ids():
    played = round_of([0, 1], with_signal=set())
    with pytest.raises(ValueError, match="new group ids"):
        played.extend(round_of([1, 2], with_signal=set()))


def test_extend_pads_extra_columns_one_round_lacks():
    played = round_of([0], with_signal=set())
    other = round_of([1], with_signal=set())
    other.extra = {"score": [0.1, 0.2]}
    played.extend(other)
    assert played.extra == {"tag": ["e0", "e1", None, None], "score": [None, None, 0.1, 0.2]}
    assert played.group_ids == [0, 0, 1, 1] and len(played.judged) == 4


def test_select_takes_groups_in_the_order_asked():
    played = round_of([0, 1, 2], with_signal=set())
    chosen = played.select([2, 0])
    assert chosen.group_ids == [2, 2, 0, 0]
    assert chosen.extra["tag"] == ["e20", "e21", "e0", "e1"]
    assert len(chosen.sampled) == 6


DATASET = Dataset.from_list([{"question": f"q{i}", "answer": str(i)} for i in range(50)])


def test_extra_problems_draw_dataset_rows_reproducibly_per_rank():
    rows = ExtraProblems(DATASET, None, seed=7, rank=0, world_size=2).draw(8)
    again = ExtraProblems(DATASET, None, seed=7, rank=0, world_size=2).draw(8)
    other_rank = ExtraProblems(DATASET, None, seed=7, rank=1, world_size=2).draw(8)
    assert len(rows) == 8 and all(isinstance(row, dict) for row in rows)
    assert all(row == {"question": f"q{row['answer']}", "answer": row["answer"]} for row in rows)
    assert rows == again
    assert rows != other_rank
    assert ExtraProblems(DATASET, None, seed=7, rank=0, world_size=2).draw(0) == []


def test_extra_problems_delegate_to_the_curriculum():
    class FakeCurriculum:
        def __init__(self) -> None:
            self.calls = []

        def sample(self, count, rank=0, world_size=1):
            self.calls.append((count, rank, world_size))
            return [{"question": f"c{i}", "answer": "0"} for i in range(count)]

    curriculum = FakeCurriculum()
    rows = ExtraProblems(None, curriculum, seed=7, rank=3, world_size=4).draw(2)
    assert curriculum.calls == [(2, 3, 4)]
    assert rows == [{"question": "c0", "answer": "0"}, {"question": "c1", "answer": "0"}]
