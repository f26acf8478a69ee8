"""The baseline per step index: with step rewards a tied group gets zero advantages at every step."""

from __future__ import annotations

import pytest

from trl_stepwise.algorithms import Algorithm, AlgorithmSettings, EpisodeScores
from trl_stepwise.trainer import StepwiseReinforceConfig

# step rewards as a judge, a step penalty and the KL in the reward give them: every step carries its own reward
EPISODE = dict(step_rewards=[0.3, -0.1, 0.6, 1.2], step_kl=[0.05, 0.2, -0.1, 0.0])


def identical_batch() -> list[EpisodeScores]:
    """Two problems, three identical episodes each (what temperature -> 0 or a solved problem gives)."""
    return [EpisodeScores(g, list(EPISODE["step_rewards"]), list(EPISODE["step_kl"])) for g in (0, 0, 0, 1, 1, 1)]


@pytest.mark.parametrize("baseline", ["leave_one_out", "batch_mean"])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("kl_in_reward", [False, True])
@pytest.mark.parametrize("scale_rewards", ["none", "group", "batch"])
def test_identical_episodes_get_zero_advantages_at_every_step(baseline, gamma, kl_in_reward, scale_rewards):
    settings = AlgorithmSettings(
        gamma=gamma, baseline=baseline, kl_coef=0.3, kl_in_reward=kl_in_reward, scale_rewards=scale_rewards
    )
    advantages = Algorithm(settings).advantages(identical_batch())
    assert [len(a) for a in advantages] == [4] * 6
    assert all(a == pytest.approx([0.0] * 4, abs=1e-9) for a in advantages)


def test_moving_average_per_step_converges_to_zero_on_identical_batches():
    algorithm = Algorithm(AlgorithmSettings(gamma=0.5, baseline="moving_average", moving_average_decay=0.5))
    for _ in range(60):
        advantages = algorithm.advantages(identical_batch())
    assert all(a == pytest.approx([0.0] * 4, abs=1e-9) for a in advantages)


def test_per_step_is_the_config_default():
    config = StepwiseReinforceConfig(output_dir="unused", use_cpu=True, report_to=[])
    assert config.baseline_per_step and config.algorithm_settings().baseline_per_step


def test_per_step_leave_one_out_by_hand():
    # gamma 1, group of 3: rewards per step A [1, 0, 1], B [0, 0], C [0, 1, 0, 0]
    # returns A [2, 1, 1], B [0, 0], C [1, 1, 0, 0]; B counts with its last return (0) at steps 2 and 3
    # step 0: A - mean(B, C) = 2 - 0.5;  B - mean(A, C) = 0 - 1.5;  C - mean(A, B) = 1 - 1
    # step 1: 1 - 0.5; 0 - 1; 1 - 0.5.   step 2: 1 - 0; (B ended); 0 - 0.5.   step 3: C: 0 - (1 + 0) / 2
    episodes = [
        EpisodeScores(0, [1.0, 0.0, 1.0], [0.0] * 3),
        EpisodeScores(0, [0.0, 0.0], [0.0] * 2),
        EpisodeScores(0, [0.0, 1.0, 0.0, 0.0], [0.0] * 4),
    ]
    advantages = Algorithm(AlgorithmSettings()).advantages(episodes)
    assert advantages == [
        pytest.approx([1.5, 0.5, 1.0]),
        pytest.approx([-1.5, -1.0]),
        pytest.approx([0.0, 0.5, -0.5, -0.5]),
    ]


def test_without_step_rewards_per_step_equals_the_episode_baseline():
    # only the final step is rewarded and gamma = 1: every step's return is the episode return
    episodes = [
        EpisodeScores(g, [0.0] * n + [r], [0.0] * (n + 1)) for g, n, r in [(0, 1, 1.0), (0, 3, 0.0), (0, 0, 0.5)]
    ]
    for baseline in ("leave_one_out", "batch_mean"):
        per_step = Algorithm(AlgorithmSettings(baseline=baseline)).advantages(episodes)
        per_episode = Algorithm(AlgorithmSettings(baseline=baseline, baseline_per_step=False)).advantages(episodes)
        assert per_step == per_episode
    per_step, per_episode = (
        Algorithm(AlgorithmSettings(baseline="moving_average", baseline_per_step=flag)) for flag in (True, False)
    )
    for _ in range(3):
        for a, b in zip(per_step.advantages(episodes), per_episode.advantages(episodes), strict=True):
            assert a == pytest.approx(b)


def test_group_scaling_divides_by_the_group_std():
    # one step per episode: group 0 returns [1, 3] (std sqrt(2)), group 1 [10, 30] (std sqrt(200))
    episodes = [EpisodeScores(g, [r], [0.0]) for g, r in [(0, 1.0), (0, 3.0), (1, 10.0), (1, 30.0)]]
    advantages = Algorithm(AlgorithmSettings(scale_rewards="group")).advantages(episodes)
    assert [a[0] for a in advantages] == pytest.approx(
        [-2 / (2**0.5 + 1e-4), 2 / (2**0.5 + 1e-4), -20 / (200**0.5 + 1e-4), 20 / (200**0.5 + 1e-4)]
    )
