"""``ObjectiveArguments``: what the trainer optimises (algorithm, baseline, KL, loss type, clipping, dynamic
sampling), a part of ``StepwiseReinforceConfig`` with TRL's names where TRL has them."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl_stepwise.algorithms import AlgorithmSettings, default_epsilon_high


@dataclass
class ObjectiveArguments:
    """The objective's flags; ``resolve_objective`` settles aliases and checks them."""

    algorithm: str = field(
        default="reinforce_stable",
        metadata={"help": "Registered algorithm: reinforce_stable, reinforce, rloo, or one you register."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount of per-step returns."})
    baseline: str | None = field(
        default=None,
        metadata={"help": "leave_one_out, batch_mean, moving_average or none (default: the algorithm's)."},
    )
    baseline_per_step: bool = field(
        default=True,
        metadata={
            "help": "Baseline per step index: step t of an episode is compared with step t of the others (episodes "
            "that ended earlier count with their last step's return). Without step rewards and with gamma 1 it "
            "equals the per-episode baseline; with step rewards (judge, kl_in_reward, step_penalty, gamma < 1) a "
            "tied group gets zero advantages. False: every step uses the baseline of the episode returns."
        },
    )
    scale_rewards: str | None = field(
        default=None,
        metadata={
            "help": "Divide advantages by a return std, like GRPO's scale_rewards: group, batch or none (default "
            "none here; GRPO's default is group). With baseline_per_step the std is taken per step index."
        },
    )
    scale_advantages: bool = field(
        default=False, metadata={"help": "Older spelling of scale_rewards=batch: divide by the batch return std."}
    )
    kl_coef: float | None = field(
        default=None, metadata={"help": "Weight of the KL to the reference model (0 = no reference; default 0.05)."}
    )
    beta: float | None = field(default=None, metadata={"help": "Alias of kl_coef (TRL's GRPO name)."})
    kl_estimator: str | None = field(default=None, metadata={"help": "k1 or k3 (default: the algorithm's, else k3)."})
    kl_in_reward: bool | None = field(
        default=None, metadata={"help": "Apply the KL as a per-step reward penalty instead of a loss term."}
    )
    ref_sync_steps: int | None = field(
        default=None,
        metadata={
            "help": "Refresh the reference from the policy after every N-th optimizer step (default 0 = never)."
        },
    )
    ref_model_sync_steps: int | None = field(
        default=None, metadata={"help": "Alias of ref_sync_steps (TRL's GRPO name)."}
    )
    ref_model_mixup_alpha: float = field(
        default=1.0,
        metadata={
            "help": "Soft refresh (TRL's name, from TR-DPO): pi_ref = alpha * pi + (1 - alpha) * pi_ref at each "
            "refresh. 1.0 (default here; GRPO's is 0.6) copies the policy."
        },
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer steps per batch of rollouts (> 1 uses the clipped importance ratio)."}
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Lower clip range of the importance ratio: it is kept >= 1 - epsilon."}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clip range (TRL's name; DAPO's clip-higher, e.g. 0.28): the ratio is kept <= 1 + "
            "epsilon_high (default: epsilon). With loss_type cispo it is the largest importance weight itself "
            "(default 5.0, as ScaleRL recommends)."
        },
    )
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "How token losses are summed and normalised (TRL's names): dapo (default): over all policy "
            "tokens of the generation batch; grpo: mean over episodes of each episode's token mean; bnpo: token "
            "mean of each micro-batch, averaged over micro-batches; dr_grpo: sum over the batch divided by episodes "
            "x max_episode_tokens (a constant); cispo: dapo's normalisation, with the policy gradient weighted by "
            "the importance weight clipped at epsilon_high and not differentiated (every token keeps a gradient)."
        },
    )
    loss_normalization: str | None = field(
        default=None, metadata={"help": "Older spelling of loss_type: token = dapo, sequence = grpo."}
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={
            "help": "token: a ratio per token; sequence: one ratio per episode, the geometric mean of its tokens' "
            "(GSPO), clipped as a whole; each token keeps its own step's advantage."
        },
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={
            "help": "Leave episodes cut by the token budget or the model's context limit out of the loss (DAPO's "
            "overlong filtering): they did not fail, they ran out of room."
        },
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO's dynamic sampling: drop problem groups whose episodes all earned the same at every step "
            "(no learning signal) and play more problems until the batch is full of groups that differ, for at most "
            "dynamic_sampling_max_rounds extra rounds per step (then groups without signal fill it up)."
        },
    )
    dynamic_sampling_max_rounds: int = field(
        default=3, metadata={"help": "Most extra generation rounds per optimizer step with dynamic_sampling."}
    )
    moving_average_decay: float = field(default=0.9, metadata={"help": "Decay of the moving-average baseline."})
    logprob_batch_tokens: int = field(
        default=4096, metadata={"help": "Tokens per forward pass when scoring rollouts (bounds memory)."}
    )

    def default_epsilon_high(self) -> float:
        """``epsilon`` (symmetric clipping), or for cispo the largest importance weight ScaleRL recommends."""
        return default_epsilon_high(self.loss_type, self.epsilon)

    def resolve_objective(self) -> None:
        """Settle ``loss_type`` (``loss_normalization`` is its older spelling) and ``epsilon_high`` as the
        algorithm's settings do (their errors name the flags); check the rest of the objective's flags."""
        settings = AlgorithmSettings(
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            loss_normalization=self.loss_normalization,
        )
        self.loss_type, self.epsilon_high = settings.loss_type, settings.epsilon_high
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r}; choose token or sequence."
            )
        if self.dynamic_sampling_max_rounds < 0:
            raise ValueError(
                f"dynamic_sampling_max_rounds={self.dynamic_sampling_max_rounds}; use >= 0 extra rounds (e.g. 3)."
            )
