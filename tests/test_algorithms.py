"""Algorithms: per-step returns, baselines, KL placement, clipping and normalisation, checked against hand arithmetic.

The worked example used throughout (gamma = 0.5, kl_coef = 0.5), two episodes of the same problem (group 0):

    episode A: 3 policy tokens, step_index [0, 0, 1]; step rewards [0.0, 1.0] (final reward on the last step)
    episode B: 2 policy tokens, step_index [0, 1];    step rewards [0.25, 0.0]

    logps     A: [-1.0, -2.0, -0.5]   B: [-1.5, -1.0, (pad)]
    ref_logps A: [-1.2, -2.0, -0.3]   B: [-1.5, -0.8, (pad)]
    k1 = logp - ref per token:  A: [0.2, 0.0, -0.2]   B: [0.0, -0.2]
    step_kl (sum of k1 per step): A: [0.2, -0.2]      B: [0.0, -0.2]
    k3 = exp(ref - logp) - (ref - logp) - 1:  A: [C1, 0, C2]   B: [0, C2]
        C1 = exp(-0.2) + 0.2 - 1 = 0.0187307531    C2 = exp(0.2) - 0.2 - 1 = 0.0214027582

The policy and the rollout policy are the same (ratio 1), so a token's policy-gradient loss is -advantage.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trl_stepwise.algorithms import ALGORITHMS, Algorithm, AlgorithmSettings, EpisodeScores, build_algorithm

C1 = math.exp(-0.2) + 0.2 - 1.0
C2 = math.exp(0.2) - 0.2 - 1.0

EPISODES = [
    EpisodeScores(group_id=0, step_rewards=[0.0, 1.0], step_kl=[0.2, -0.2]),
    EpisodeScores(group_id=0, step_rewards=[0.25, 0.0], step_kl=[0.0, -0.2]),
]
STEP_INDEX = [[0, 0, 1], [0, 1]]
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, 0.0]])
REF_LOGPS = torch.tensor([[-1.2, -2.0, -0.3], [-1.5, -0.8, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
NUM_TOKENS, NUM_SEQUENCES = 5.0, 2.0


def settings(**overrides) -> AlgorithmSettings:
    """The worked example's settings; the hand cases use the per-episode baseline (tests/test_step_baseline.py
    covers the per-step one, the default)."""
    return AlgorithmSettings(**{"gamma": 0.5, "kl_coef": 0.5, "baseline_per_step": False, **overrides})


def token_advantages(step_advantages: list[list[float]]) -> torch.Tensor:
    rows = [[adv[s] for s in steps] for adv, steps in zip(step_advantages, STEP_INDEX, strict=True)]
    return torch.tensor([row + [0.0] * (3 - len(row)) for row in rows])


def pipeline_loss(algorithm: Algorithm, episodes=EPISODES) -> tuple[list[list[float]], float]:
    """What the trainer does with a batch: step advantages -> token advantages -> token loss -> reduction."""
    advantages = algorithm.advantages(episodes)
    losses = algorithm.token_loss(LOGPS, LOGPS.detach(), REF_LOGPS, token_advantages(advantages))
    return advantages, float(algorithm.reduce(losses, MASK, NUM_TOKENS, NUM_SEQUENCES))


def test_returns_are_discounted_sums():
    # gamma 0.5: G_t = r_t + 0.5 * G_{t+1}; [1, 2, 4] -> G2 = 4, G1 = 2 + 2 = 4, G0 = 1 + 2 = 3
    assert Algorithm(settings()).returns([1.0, 2.0, 4.0]) == pytest.approx([3.0, 4.0, 4.0])
    assert Algorithm(settings(gamma=1.0)).returns([1.0, 2.0, 4.0]) == pytest.approx([7.0, 6.0, 4.0])


# Returns without KL in the reward:
#   A: G1 = 1.0, G0 = 0.0 + 0.5 * 1.0 = 0.5             -> [0.5, 1.0], episode return 0.5
#   B: G1 = 0.0, G0 = 0.25 + 0.5 * 0.0 = 0.25           -> [0.25, 0.0], episode return 0.25
# Returns with KL in the reward (r_t - 0.5 * step_kl_t):
#   A: rewards [0.0 - 0.1, 1.0 + 0.1] = [-0.1, 1.1];  G1 = 1.1, G0 = -0.1 + 0.55 = 0.45
#   B: rewards [0.25 - 0.0, 0.0 + 0.1] = [0.25, 0.1]; G1 = 0.1, G0 = 0.25 + 0.05 = 0.3
HAND_CASES = {
    # leave_one_out: baseline of A is B's return and vice versa. A: [0.5-0.25, 1.0-0.25]; B: [0.25-0.5, 0.0-0.5].
    # k1 in the loss, +0.5 * k1 per token: A: [-0.25+0.1, -0.25+0.0, -0.75-0.1] = [-0.15, -0.25, -0.85] (sum -1.25)
    #                                      B: [0.25+0.0, 0.5-0.1] = [0.25, 0.4] (sum 0.65)
    # token: (-1.25 + 0.65) / 5 = -0.12
    "loo_k1_loss_token": (
        dict(baseline="leave_one_out", kl_estimator="k1", kl_in_reward=False, loss_normalization="token"),
        [[0.25, 0.75], [-0.25, -0.5]],
        -0.6 / 5,
    ),
    # sequence: mean per episode, averaged over the 2 episodes: (-1.25 / 3 + 0.65 / 2) / 2
    "loo_k1_loss_sequence": (
        dict(baseline="leave_one_out", kl_estimator="k1", kl_in_reward=False, loss_normalization="sequence"),
        [[0.25, 0.75], [-0.25, -0.5]],
        (-1.25 / 3 + 0.65 / 2) / 2,
    ),
    # k3 in the loss: sum of -A over tokens = -(0.25+0.25+0.75-0.25-0.5) = -0.5; KL adds 0.5*(C1 + C2) for A and
    # 0.5 * C2 for B -> (-0.5 + 0.5 * C1 + C2) / 5
    "loo_k3_loss_token": (
        dict(baseline="leave_one_out", kl_estimator="k3", kl_in_reward=False, loss_normalization="token"),
        [[0.25, 0.75], [-0.25, -0.5]],
        (-0.5 + 0.5 * C1 + C2) / 5,
    ),
    # batch_mean: baseline (0.5 + 0.25) / 2 = 0.375. A: [0.125, 0.625]; B: [-0.125, -0.375]
    # k1 in the loss: A: [-0.125+0.1, -0.125, -0.625-0.1] (sum -0.875); B: [0.125, 0.375-0.1] (sum 0.4)
    "batch_mean_k1_loss_token": (
        dict(baseline="batch_mean", kl_estimator="k1", kl_in_reward=False, loss_normalization="token"),
        [[0.125, 0.625], [-0.125, -0.375]],
        (-0.875 + 0.4) / 5,
    ),
    # batch_mean, k3 in the loss: sum of -A = -(0.125+0.125+0.625-0.125-0.375) = -0.375, plus 0.5*C1 + C2
    "batch_mean_k3_loss_sequence": (
        dict(baseline="batch_mean", kl_estimator="k3", kl_in_reward=False, loss_normalization="sequence"),
        [[0.125, 0.625], [-0.125, -0.375]],
        ((-0.875 + 0.5 * (C1 + C2)) / 3 + (0.5 + 0.5 * C2) / 2) / 2,
    ),
    # KL in the reward, leave_one_out: A: [0.45-0.3, 1.1-0.3] = [0.15, 0.8]; B: [0.3-0.45, 0.1-0.45] = [-0.15, -0.35]
    # no KL term in the loss: tokens A: -[0.15, 0.15, 0.8] (sum -1.1); B: -[-0.15, -0.35] (sum 0.5)
    "loo_k1_reward_token": (
        dict(baseline="leave_one_out", kl_estimator="k1", kl_in_reward=True, loss_normalization="token"),
        [[0.15, 0.8], [-0.15, -0.35]],
        (-1.1 + 0.5) / 5,
    ),
    "loo_k1_reward_sequence": (
        dict(baseline="leave_one_out", kl_estimator="k1", kl_in_reward=True, loss_normalization="sequence"),
        [[0.15, 0.8], [-0.15, -0.35]],
        (-1.1 / 3 + 0.5 / 2) / 2,
    ),
    # the estimator only matters in the loss: in the reward the per-step k1 sums are used, and the loss has no KL
    "loo_k3_reward_token": (
        dict(baseline="leave_one_out", kl_estimator="k3", kl_in_reward=True, loss_normalization="token"),
        [[0.15, 0.8], [-0.15, -0.35]],
        (-1.1 + 0.5) / 5,
    ),
    # KL in the reward, batch_mean: baseline (0.45 + 0.3) / 2 = 0.375. A: [0.075, 0.725]; B: [-0.075, -0.275]
    # tokens: -(0.075 + 0.075 + 0.725 - 0.075 - 0.275) = -0.525
    "batch_mean_k1_reward_token": (
        dict(baseline="batch_mean", kl_estimator="k1", kl_in_reward=True, loss_normalization="token"),
        [[0.075, 0.725], [-0.075, -0.275]],
        -0.525 / 5,
    ),
    # no baseline and no KL: A: [0.5, 1.0]; B: [0.25, 0.0]; tokens -(0.5 + 0.5 + 1.0 + 0.25 + 0.0) = -2.25
    "none_no_kl_token": (
        dict(baseline="none", kl_coef=0.0, loss_normalization="token"),
        [[0.5, 1.0], [0.25, 0.0]],
        -2.25 / 5,
    ),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_loss_matches_hand_computation(case):
    overrides, expected_advantages, expected_loss = HAND_CASES[case]
    algorithm = Algorithm(settings(**overrides))
    advantages, loss = pipeline_loss(algorithm)
    assert len(advantages) == 2
    for got, want in zip(advantages, expected_advantages, strict=True):
        assert got == pytest.approx(want, abs=1e-9)
    assert loss == pytest.approx(expected_loss, abs=1e-6)


def test_moving_average_baseline_lags_one_batch():
    algorithm = Algorithm(settings(baseline="moving_average", kl_coef=0.0, moving_average_decay=0.9))
    # batch 1: no history -> baseline 0 (advantages = returns); the average becomes the batch mean 0.375
    assert algorithm.advantages(EPISODES) == [pytest.approx([0.5, 1.0]), pytest.approx([0.25, 0.0])]
    assert algorithm.running_baseline == pytest.approx(0.375)
    # batch 2: returns 1.0 and 0.0 -> baseline 0.375; average 0.9 * 0.375 + 0.1 * 0.5 = 0.3875
    batch = [EpisodeScores(1, [1.0], [0.0]), EpisodeScores(2, [0.0], [0.0])]
    assert algorithm.advantages(batch) == [pytest.approx([0.625]), pytest.approx([-0.375])]
    assert algorithm.running_baseline == pytest.approx(0.3875)
    # batch 3 uses 0.3875
    assert algorithm.advantages(batch) == [pytest.approx([0.6125]), pytest.approx([-0.3875])]


def test_leave_one_out_is_per_group():
    # groups {0: returns 1, 3}, {1: returns 10, 20}: baselines 3, 1, 20, 10
    episodes = [EpisodeScores(0, [1.0], [0.0]), EpisodeScores(1, [10.0], [0.0])]
    episodes += [EpisodeScores(0, [3.0], [0.0]), EpisodeScores(1, [20.0], [0.0])]
    advantages = Algorithm(settings(kl_coef=0.0)).advantages(episodes)
    assert advantages == [[-2.0], [-10.0], [2.0], [10.0]]


def test_scale_advantages_divides_by_return_std():
    # returns 0.5 and 0.25: sample std = sqrt(2 * 0.125**2 / 1) = 0.1767767; LOO advantages A: [0.25, 0.75]
    algorithm = Algorithm(settings(kl_coef=0.0, scale_advantages=True))
    std = math.sqrt(2 * 0.125**2)
    advantages = algorithm.advantages(EPISODES)
    assert advantages[0] == pytest.approx([0.25 / (std + 1e-4), 0.75 / (std + 1e-4)])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_is_zero_when_policy_equals_reference(estimator):
    algorithm = Algorithm(settings(kl_estimator=estimator))
    logps = torch.tensor([[-0.3, -2.5, -7.0], [-1.0, -0.01, -4.0]])
    assert torch.equal(algorithm.kl(logps, logps.clone()), torch.zeros_like(logps))
    advantages = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -3.0]])
    with_reference = algorithm.token_loss(logps, logps, logps.clone(), advantages)
    without_reference = algorithm.token_loss(logps, logps, None, advantages)
    assert torch.allclose(with_reference, without_reference)
    # and it is not zero when they differ (k3 >= 0 always, k1 has the sign of logp - ref)
    kl = algorithm.kl(logps, logps - 0.3)
    assert torch.allclose(kl, torch.full_like(kl, 0.3 if estimator == "k1" else math.exp(-0.3) + 0.3 - 1.0))


def test_k3_is_nonnegative():
    torch.manual_seed(0)
    logps, ref = -torch.rand(100) * 5, -torch.rand(100) * 5
    assert (Algorithm(settings(kl_estimator="k3")).kl(logps, ref) >= 0).all()


@pytest.mark.parametrize(
    ("log_ratio", "advantage", "clipped"),
    [
        (0.5, 1.0, True),  # ratio 1.65 > 1.2 with A > 0: capped at 1.2 * A, no gradient
        (0.5, -1.0, False),  # ratio 1.65 with A < 0: the pessimistic (unclipped) term is kept
        (-0.5, 1.0, False),  # ratio 0.61 < 0.8 with A > 0: unclipped
        (-0.5, -1.0, True),  # ratio 0.61 with A < 0: capped at 0.8 * A, no gradient
        (0.1, 1.0, False),  # inside the trust region
    ],
)
def test_clipped_ratio(log_ratio, advantage, clipped):
    algorithm = Algorithm(settings(kl_coef=0.0, epsilon=0.2))
    old = torch.tensor([-1.0])
    logps = (old + log_ratio).requires_grad_(True)
    loss = algorithm.token_loss(logps, old, None, torch.tensor([advantage]))
    ratio = math.exp(log_ratio)
    bound = 1.2 if log_ratio > 0 else 0.8
    expected = -(bound if clipped else ratio) * advantage
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()
    expected_grad = 0.0 if clipped else -ratio * advantage  # d(-r*A)/dlogp = -r*A
    assert float(logps.grad) == pytest.approx(expected_grad, rel=1e-6, abs=1e-12)


def test_reduce_ignores_masked_tokens():
    algorithm = Algorithm(settings())
    losses = torch.tensor([[1.0, 2.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    # token: (1 + 2) / 4 tokens in the whole generation batch; sequence: mean 1.5 over 3 sequences
    assert float(algorithm.reduce(losses, mask, 4.0, 3.0)) == pytest.approx(0.75)
    algorithm.settings.loss_type = "grpo"  # loss_normalization="sequence" in its older spelling
    assert float(algorithm.reduce(losses, mask, 4.0, 3.0)) == pytest.approx(0.5)


def test_leave_one_out_with_group_of_one_raises():
    episodes = [EpisodeScores(0, [1.0], [0.0]), EpisodeScores(1, [0.0], [0.0])]
    with pytest.raises(ValueError, match=r"at least 2 episodes per problem \(num_generations >= 2\)"):
        Algorithm(settings(baseline="leave_one_out")).advantages(episodes)


def test_build_algorithm_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="Unknown algorithm 'nope'.*reinforce_stable") as info:
        build_algorithm("nope", settings())
    assert "rloo" in str(info.value)


def test_builtin_algorithm_defaults_reach_the_config():
    from trl_stepwise.trainer import StepwiseReinforceConfig

    rloo = StepwiseReinforceConfig(output_dir="unused", algorithm="rloo", use_cpu=True, report_to=[])
    assert (rloo.baseline, rloo.kl_in_reward, rloo.kl_estimator) == ("leave_one_out", True, "k1")
    plain = StepwiseReinforceConfig(output_dir="unused", algorithm="reinforce", use_cpu=True, report_to=[])
    assert plain.baseline == "none"
    # an explicit setting beats the algorithm's default
    explicit = StepwiseReinforceConfig(output_dir="unused", algorithm="rloo", kl_estimator="k3", use_cpu=True)
    assert explicit.kl_estimator == "k3"


# The README's "write your own algorithm" example, verbatim. The test below runs it and checks what it claims.
README_EXAMPLE = '''\
"""A custom algorithm: train on the sign of the advantage (+1 better than the baseline, -1 worse, 0 a tie)."""

from trl_stepwise.algorithms import Algorithm, register_algorithm
from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer


@register_algorithm("sign_reinforce")
class SignReinforce(Algorithm):
    """REINFORCE on sign(return - baseline): robust to the scale of the rewards."""

    defaults = {"baseline": "batch_mean"}  # used unless the config sets --baseline

    def advantages(self, episodes):
        advantages = super().advantages(episodes)  # per step: discounted return minus the baseline
        return [[float((a > 0) - (a < 0)) for a in steps] for steps in advantages]


args = StepwiseReinforceConfig(
    output_dir="outputs/sign-reinforce",
    algorithm="sign_reinforce",  # selected by its registered name
    num_generations=4,
    per_device_train_batch_size=8,
    max_steps=50,
    learning_rate=1e-5,
    n_few_shot=1,
)

if __name__ == "__main__":
    trainer = StepwiseReinforceTrainer(model="smollm2-135m-instruct", args=args, train_dataset="arithmetic:level=1")
    trainer.train()
'''


def test_readme_custom_algorithm_example(tiny_model, tokenizer, arithmetic_problems, tmp_path):
    Path("/tmp/readme_algorithm_example.py").write_text(README_EXAMPLE)
    namespace: dict = {"__name__": "readme_example"}  # not "__main__": the example's training block is skipped
    exec(compile(README_EXAMPLE, "readme_algorithm_example.py", "exec"), namespace)
    sign_cls = namespace["SignReinforce"]
    assert ALGORITHMS["sign_reinforce"] is sign_cls and sign_cls.name == "sign_reinforce"
    args = namespace["args"]
    assert args.algorithm == "sign_reinforce" and args.baseline == "batch_mean"  # the subclass's default applies

    # it changes the advantages. gamma 1: returns A [1.0, 1.0], B [0.25, 0.0]; batch mean per step 0.625 and 0.5
    # -> plain advantages A [0.375, 0.5], B [-0.375, -0.5]; the custom algorithm keeps only their signs
    custom = sign_cls(args.algorithm_settings())
    assert Algorithm(args.algorithm_settings()).advantages(EPISODES) == [[0.375, 0.5], [-0.375, -0.5]]
    assert custom.advantages(EPISODES) == [[1.0, 1.0], [-1.0, -1.0]]

    # and the trainer picks it by name: the advantages of a real rollout are all -1, 0 or +1
    from trl_stepwise.trainer import StepwiseReinforceConfig, StepwiseReinforceTrainer

    config = StepwiseReinforceConfig(
        output_dir=str(tmp_path),
        algorithm="sign_reinforce",
        num_generations=2,
        per_device_train_batch_size=4,
        max_step_tokens=6,
        max_episode_steps=2,
        n_few_shot=1,
        env_flavour="arithmetic",
        use_cpu=True,
        report_to=[],
        log_rollouts=False,
        kl_coef=0.0,
    )

    def length_reward(completions, **kwargs):
        return [len(c) / 10 for c in completions]

    trainer = StepwiseReinforceTrainer(
        model=tiny_model,
        args=config,
        train_dataset=arithmetic_problems,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    assert type(trainer.algorithm) is sign_cls
    (batch,) = trainer._generate_and_score([dict(r) for r in arithmetic_problems.select(range(2))], 1)
    values = batch["advantages"][batch["completion_mask"]]
    assert set(values.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (values != 0).any()
