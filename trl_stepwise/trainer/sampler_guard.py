"""The runtime check that the generation engine samples the policy being trained.

Every loss call adds the gathered ``|log pi_trainer - log pi_engine|`` of the sampled tokens; after each optimizer
step the mean is compared with ``sampler_logprob_tolerance``, and ``sampler_logprob_patience`` steps in a row above
it stop the run with the likely causes.
"""

from __future__ import annotations


class SamplerMismatchError(RuntimeError):
    """The generation engine no longer samples the policy being trained (the runtime guard tripped)."""


class SamplerGuard:
    """Sums the sampler-trainer gap over an optimizer step; ``check`` raises after too many bad steps in a row."""

    def __init__(self, tolerance: float, patience: int) -> None:
        self.tolerance = tolerance
        self.patience = patience
        self.total = 0.0
        self.count = 0.0
        self.strikes = 0  # steps in a row above the tolerance

    def add(self, total: float, count: float) -> None:
        self.total += total
        self.count += count

    def check(self, step: int) -> None:
        """Close the step: raise ``SamplerMismatchError`` when the gap stayed above the tolerance too long."""
        total, count = self.total, self.count
        self.total = self.count = 0.0
        if self.tolerance <= 0 or count == 0:
            return
        gap = total / count
        self.strikes = self.strikes + 1 if gap > self.tolerance else 0
        if self.strikes >= self.patience:
            raise SamplerMismatchError(
                f"step {step}: the generation engine's log-probs of its sampled tokens differ from the trainer's by "
                f"{gap:.3f} per token (> --sampler_logprob_tolerance {self.tolerance:g}) for {self.strikes} steps "
                "in a row, so it no longer samples the policy being trained. Likely causes: a part of the adapter "
                "not pushed to the engine, a dtype or kernel mismatch (--vllm_dtype, --bf16, --rollout_bf16), or a "
                "sampling filter the engine applies differently (--top_p, --top_k). Raise the tolerance or set it "
                "to 0 to train anyway."
            )
