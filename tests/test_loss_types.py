"""Loss types (TRL's dapo, grpo, bnpo, dr_grpo, cispo), clip-higher, sequence-level ratios (GSPO) and
mask_truncated_completions, pinned by hand-computed numbers on 2 rows x 3 tokens (row 1's last token is padding)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from trl_stepwise.algorithms import Algorithm, AlgorithmSettings
from trl_stepwise.envs import Episode
from trl_stepwise.envs.base import EndReason
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer import StepwiseReinforceConfig
from trl_stepwise.trainer.batching import micro_batches, pad_trajectories
from trl_stepwise.trainer.scoring import global_normalisers

D = torch.float64
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


def algorithm(**settings) -> Algorithm:
    return Algorithm(AlgorithmSettings(**settings))


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D, requires_grad=True)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def make_config(tmp_path, **overrides) -> StepwiseReinforceConfig:
    return StepwiseReinforceConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


# ---------------------------------------------------------------------------------------------- 1. reduce
@pytest.mark.parametrize(
    "loss_type, extra, expected",
    [
        ("dapo", {}, 15 / 12),  # (1 + 2 + 3 + 4 + 5) / num_tokens = 15 / 12 = 1.25
        ("cispo", {}, 15 / 12),  # dapo's normalisation: 1.25
        ("grpo", {}, (6 / 3 + 9 / 2) / 4),  # row means 2 and 4.5, summed, / num_sequences: 6.5 / 4 = 1.625
        ("bnpo", {}, 15 / 5 / 2),  # this micro-batch's token mean 15 / 5 = 3, / num_micro_batches 2 = 1.5
        ("dr_grpo", {"max_completion_length": 4}, 15 / (4 * 4)),  # 15 / (num_sequences 4 x 4) = 0.9375
    ],
)
def test_reduce_of_each_loss_type(loss_type, extra, expected):
    # the padded token holds 100: any leak of it into a sum would show
    losses = t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    # num_tokens / num_sequences count the whole generation batch (12 tokens, 4 episodes), not this micro-batch
    value = algorithm(loss_type=loss_type, **extra).reduce(losses, MASK, 12, 4, num_micro_batches=2)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_grpo_counts_an_episode_with_no_tokens_in_loss():
    losses = t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)  # row 1 out of the loss: mean 0 (no 0 / 0)
    value = algorithm(loss_type="grpo").reduce(losses, mask, num_tokens=3, num_sequences=2)
    assert value.item() == pytest.approx((6 / 3 + 0.0) / 2)  # 1.0


# ---------------------------------------------------------------------------------------------- 2. clip-higher
def test_asymmetric_clipping_values_and_gradients():
    ratios = [[1.25, 1.3, 0.75], [0.85, 1.3, 0.75]]
    advantages = t([[2.0, 3.0, -1.0], [-1.0, -1.0, 0.5]])  # per-step advantages, different within each row
    logps = leaf([[math.log(r) for r in row] for row in ratios])
    old = torch.zeros(2, 3, dtype=D)  # ratio = exp(logps - 0)
    loss = algorithm(epsilon=0.2, epsilon_high=0.28).token_loss(logps, old, None, advantages)
    # clip range [0.8, 1.28]; loss = -min(r A, clip(r) A)
    expected = [
        [-1.25 * 2.0, -1.28 * 3.0, 0.8],  # 1.25 < 1.28 kept; 1.3 A>0 clipped to 1.28; 0.75 A<0: -min(-0.75, -0.8)
        [0.85, 1.3, -0.75 * 0.5],  # in range; A<0 at 1.3: min keeps r A (not clipped); A>0 at 0.75: r A kept
    ]
    assert torch.allclose(loss, t(expected), atol=1e-12)
    loss.sum().backward()
    # d(-r A)/d logp = -r A where unclipped, 0 where the clipped branch is taken
    grad = [[-1.25 * 2.0, 0.0, 0.0], [0.85, 1.3, -0.375]]
    assert torch.allclose(logps.grad, t(grad), atol=1e-12)
    assert logps.grad[0, 0] != 0 and logps.grad[0, 1] == 0 and logps.grad[0, 2] == 0

    # symmetric epsilon_high (the default = epsilon) clips ratio 1.25 at 1.2: no gradient there
    logps2 = leaf([[math.log(1.25)]])
    symmetric = algorithm(epsilon=0.2).token_loss(logps2, torch.zeros(1, 1, dtype=D), None, t([[2.0]]))
    assert symmetric.item() == pytest.approx(-1.2 * 2.0)
    symmetric.sum().backward()
    assert logps2.grad.item() == 0.0


# ---------------------------------------------------------------------------------------------- 3. GSPO
def test_sequence_level_ratio_is_shared_by_the_row():
    # log-ratios; row 1's padded token holds 5.0, which must not enter the row's mean
    logps = leaf([[0.1, -0.05, 0.04], [0.2, 0.0, 5.0]])
    old = torch.zeros(2, 3, dtype=D)
    advantages = t([[1.0, 2.0, -0.5], [0.5, -1.0, 3.0]])
    seq = algorithm(importance_sampling_level="sequence")
    log_ratio = seq.log_ratio(logps, old, MASK)
    assert log_ratio.shape == (2, 1)
    r0, r1 = math.exp(0.03), math.exp(0.1)  # (0.1 - 0.05 + 0.04) / 3 = 0.03; (0.2 + 0.0) / 2 = 0.1
    assert torch.allclose(log_ratio, t([[0.03], [0.1]]), atol=1e-12)
    loss = seq.token_loss(logps, old, None, advantages, mask=MASK)
    # both ratios inside [0.8, 1.2]: loss = -r_row x each token's own advantage
    assert torch.allclose(loss, t([[-r0, -2 * r0, 0.5 * r0], [-0.5 * r1, r1, -3 * r1]]), atol=1e-12)
    seq.reduce(loss, MASK, num_tokens=5, num_sequences=2).backward()
    # d/d logp_k of sum_j -r A_j / 5 = -(sum_j A_j) r / n_row / 5 for each unpadded token k
    g0 = -(1.0 + 2.0 - 0.5) * r0 / 3 / 5  # -2.5 r0 / 15
    g1 = -(0.5 - 1.0) * r1 / 2 / 5  # 0.05 r1
    assert torch.allclose(logps.grad, t([[g0, g0, g0], [g1, g1, 0.0]]), atol=1e-12)

    # token level on the same input: its own ratio per token (exp(0.1) for token (0, 0), not exp(0.03))
    token_loss = algorithm().token_loss(logps.detach(), old, None, advantages, mask=MASK)
    assert token_loss[0, 0].item() == pytest.approx(-math.exp(0.1))
    assert not torch.allclose(token_loss * MASK, loss.detach() * MASK)


def test_sequence_level_clips_the_row_as_a_whole():
    logps = leaf([[0.5, 0.3, 0.4]])  # mean 0.4: r = e^0.4 = 1.4918 > 1.2 for every token, even the 0.3 one
    r = math.exp(0.4)
    loss = algorithm(importance_sampling_level="sequence").token_loss(
        logps, torch.zeros(1, 3, dtype=D), None, t([[1.0, -1.0, 2.0]]), mask=torch.ones(1, 3, dtype=torch.bool)
    )
    # A>0: clipped at 1.2 (no gradient); A<0: -min(-r, -1.2) = r (keeps its gradient)
    assert torch.allclose(loss, t([[-1.2, r, -2.4]]), atol=1e-12)
    loss.sum().backward()
    # only token 1's term depends on logps, through the row's mean: d(r)/d logp_k = r / 3 for every k
    assert torch.allclose(logps.grad, t([[r / 3] * 3]), atol=1e-12)


# ---------------------------------------------------------------------------------------------- 4. cispo
def test_cispo_weight_is_clamped_and_not_differentiated():
    old = t([[-1.0, -2.0, -0.5]])
    ratios = [0.5, 1.1, 3.0]
    logps = leaf([[o + math.log(r) for o, r in zip(old[0].tolist(), ratios, strict=True)]])
    advantages = t([[1.0, -2.0, 1.5]])
    loss = algorithm(loss_type="cispo", epsilon_high=2.0).token_loss(logps, old, None, advantages)
    weights = [0.5, 1.1, 2.0]  # clamp(r, max=2.0): no lower clip; 3.0 -> 2.0
    expected = [-w * a.item() * lp.item() for w, a, lp in zip(weights, advantages[0], logps[0], strict=True)]
    assert torch.allclose(loss, t([expected]), atol=1e-12)
    loss.sum().backward()
    # -w A exactly (a differentiated weight would add -r A logp for the unclamped tokens)
    assert torch.allclose(logps.grad, t([[-0.5 * 1.0, 1.1 * 2.0, -2.0 * 1.5]]), atol=1e-12)
    assert logps.grad[0, 2] != 0  # r = 3 > epsilon_high still has a gradient ...

    # ... where the clipped PPO loss (dapo, clip-higher 0.28) gives that token none
    logps_ppo = leaf(logps.detach().tolist())
    ppo = algorithm(loss_type="dapo", epsilon_high=0.28).token_loss(logps_ppo, old, None, advantages)
    ppo.sum().backward()
    assert logps_ppo.grad[0, 2] == 0.0


# ---------------------------------------------------------------------------------------------- 5. flags
def test_algorithm_settings_aliases_and_epsilon_high():
    assert AlgorithmSettings(loss_normalization="sequence").loss_type == "grpo"
    assert AlgorithmSettings(loss_normalization="token").loss_type == "dapo"
    assert AlgorithmSettings(epsilon=0.3).epsilon_high == 0.3
    assert AlgorithmSettings(epsilon=0.3, epsilon_high=0.28).epsilon_high == 0.28


def test_config_resolves_loss_type(tmp_path):
    config = make_config(tmp_path, loss_normalization="token")
    assert config.loss_type == "dapo" and config.algorithm_settings().loss_type == "dapo"
    assert make_config(tmp_path, loss_normalization="sequence").loss_type == "grpo"
    assert make_config(tmp_path).loss_type == "dapo"
    assert make_config(tmp_path, loss_normalization="sequence", loss_type="grpo").loss_type == "grpo"
    dr = make_config(tmp_path, loss_type="dr_grpo", max_completion_length=77).algorithm_settings()
    assert (dr.loss_type, dr.max_completion_length) == ("dr_grpo", 77)


def test_config_epsilon_high_defaults(tmp_path):
    cispo = make_config(tmp_path, loss_type="cispo")
    assert cispo.epsilon_high == 5.0 and cispo.algorithm_settings().epsilon_high == 5.0
    assert make_config(tmp_path, loss_type="cispo", epsilon_high=2.0).epsilon_high == 2.0
    assert make_config(tmp_path, loss_type="dapo", epsilon=0.3).epsilon_high == 0.3
    settings = make_config(tmp_path, epsilon=0.2, epsilon_high=0.28, num_iterations=2).algorithm_settings()
    assert (settings.epsilon, settings.epsilon_high) == (0.2, 0.28)
    seq = make_config(tmp_path, importance_sampling_level="sequence", num_iterations=2).algorithm_settings()
    assert seq.importance_sampling_level == "sequence"


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"loss_normalization": "token", "loss_type": "grpo"}, r"loss_normalization=token.*loss_type=grpo"),
        ({"loss_type": "ppo"}, r"loss_type='ppo'.*dapo, grpo, bnpo, dr_grpo, cispo"),
        ({"loss_normalization": "episode"}, r"loss_normalization='episode'"),
        ({"importance_sampling_level": "word"}, r"importance_sampling_level='word'"),
        ({"dynamic_sampling_max_rounds": -1}, r"dynamic_sampling_max_rounds=-1"),
        ({"epsilon_high": 0.0}, r"epsilon_high=0.0"),
    ],
)
def test_config_refuses_bad_objective_flags(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_config(tmp_path, **overrides)


def test_resolved_epsilon_high_is_not_reported_as_inert(tmp_path):
    def inert(**overrides):
        return [line for line in make_config(tmp_path, **overrides).inert_flags() if "epsilon" in line]

    assert inert() == []  # epsilon_high resolved to epsilon: the user did not set it
    assert [line.split()[:2] for line in inert(epsilon=0.3)] == [["--epsilon", "0.3"]]  # not epsilon_high 0.3
    assert [line.split()[0] for line in inert(epsilon_high=0.28)] == ["--epsilon_high"]
    assert inert(loss_type="cispo") == []  # cispo's weight acts even at num_iterations 1


# ---------------------------------------------------------------------------------------------- 6. truncation
@pytest.mark.parametrize(
    "reason, truncated",
    [
        (EndReason.ANSWER, False),
        (EndReason.EOS, False),
        (EndReason.MAX_STEPS, False),
        (EndReason.TOKEN_BUDGET, True),
        (EndReason.CONTEXT_LIMIT, True),
        (None, False),
    ],
)
def test_episode_truncated(reason, truncated):
    assert Episode(episode_id=0, group_id=0, row={}, end_reason=reason).truncated is truncated


def trajectories() -> list[Trajectory]:
    """Row 0: 3 tokens, the middle one a tool result; row 1: 2 policy tokens (the padded one is added)."""
    episode = Episode(episode_id=0, group_id=0, row={})
    return [
        Trajectory(episode, [1, 5, 6], [7, 8, 9], policy_mask=[True, False, True], step_index=[0, 0, 1]),
        Trajectory(episode, [1, 5], [10, 11], policy_mask=[True, True], step_index=[0, 1]),
    ]


def test_pad_trajectories_out_of_loss_zeroes_that_row_only():
    kept = pad_trajectories(trajectories(), pad_id=0)
    dropped = pad_trajectories(trajectories(), pad_id=0, out_of_loss=[False, True])
    assert kept["completion_mask"].tolist() == [[True, False, True], [True, True, False]]
    assert dropped["completion_mask"].tolist() == [[True, False, True], [False, False, False]]
    assert dropped["sampled_mask"].tolist() == [[True, False, True], [False, False, False]]
    assert torch.equal(dropped["input_ids"], kept["input_ids"])  # the tokens stay
    assert torch.equal(dropped["attention_mask"], kept["attention_mask"])


def test_micro_batches_out_of_loss_follows_the_row():
    batches = micro_batches(trajectories(), [[1.0, 1.0, 2.0], [-1.0, 0.5]], 2, pad_id=0, out_of_loss=[True, False])
    # one row per micro-batch (no padding): tell the rows apart by their last completion token
    by_last_token = {b["input_ids"][0, -1].item(): b["completion_mask"][0].tolist() for b in batches}
    assert by_last_token == {9: [False, False, False], 11: [True, True]}


def test_global_normalisers_drop_tokens_but_keep_episodes():
    accelerator = types.SimpleNamespace(num_processes=1, device="cpu")
    assert global_normalisers(trajectories(), accelerator) == (4.0, 2.0)  # 2 + 2 policy tokens, 2 episodes
    assert global_normalisers(trajectories(), accelerator, [False, True]) == (2.0, 2.0)
    assert global_normalisers(trajectories(), accelerator, [True, False]) == (2.0, 2.0)
    assert global_normalisers(trajectories(), accelerator, [True, True]) == (0.0, 2.0)
