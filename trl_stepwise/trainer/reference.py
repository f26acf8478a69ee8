"""The frozen reference of a PEFT policy: a second adapter, copied from the policy's without re-initialising it.

Adding an adapter normally runs its initialisation; PiSSA, OLoRA, CorDA and LoftQ rewrite the base weights in place
while doing so, which would silently change the policy. The reference adapter is therefore added with
initialisation off and filled by copying the policy adapter's tensors. For those initialisations the initial adapter
is not zero either, so the adapter-disabled model is not the initial policy: the reference is snapshotted at the
start instead of being "the model without its adapter".
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from trl_stepwise.models import REFERENCE_ADAPTER
from trl_stepwise.trainer.sharded_state import load_tensors, save_tensors
from trl_stepwise.trainer.sharding import is_sharded, sharded_copy

logger = logging.getLogger(__name__)
T = TypeVar("T")

# LoRA initialisations after which the adapter-disabled model is the initial policy (B = 0, base untouched)
_ZERO_DELTA_INITS = (True, False, "gaussian", "eva")


def policy_adapter(model: Any) -> str:
    """The name of the adapter being trained (any name, not only peft's "default")."""
    active = model.active_adapter
    return active[0] if isinstance(active, list | tuple) else active


def needs_initial_snapshot(model: Any, adapter: str) -> bool:
    """Whether the initial adapter changes the model, so the reference must be a copy of it from the start."""
    init = getattr(model.peft_config[adapter], "init_lora_weights", True)
    return init not in _ZERO_DELTA_INITS


def _without_initialisation(config: Any) -> Any:
    config = copy.deepcopy(config)
    for name in ("init_lora_weights", "init_weights", "init_ia3_weights"):
        if hasattr(config, name):
            setattr(config, name, False)
    return config


def add_reference_adapter(model: Any, policy: str) -> None:
    """Add the frozen reference adapter, shaped like ``policy``'s, without running any initialisation."""
    if REFERENCE_ADAPTER not in model.peft_config:
        model.add_adapter(REFERENCE_ADAPTER, _without_initialisation(model.peft_config[policy]))
    model.set_adapter(policy)
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)


@torch.no_grad()
def copy_policy_to_reference(model: Any, policy: str) -> None:
    """Copy every tensor of the policy adapter into the reference adapter (adds it when missing)."""
    add_reference_adapter(model, policy)
    params = dict(model.named_parameters())
    copied = 0
    for name, param in params.items():
        if f".{REFERENCE_ADAPTER}." in name:
            param.copy_(params[name.replace(f".{REFERENCE_ADAPTER}.", f".{policy}.")])
            copied += 1
    if copied == 0:
        raise RuntimeError(f"The reference adapter has no parameters to copy from adapter {policy!r}.")


@torch.no_grad()
def load_reference_adapter(model: Any, state: dict[str, torch.Tensor], checkpoint: Any) -> None:
    """Restore the reference adapter from a checkpoint, refusing any key mismatch: a tensor left out would leave part
    of the reference at its initial (random) values, silently."""
    expected = {name for name in model.state_dict() if f".{REFERENCE_ADAPTER}." in name}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ValueError(
            f"{checkpoint}: its reference adapter does not match this model's ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, e.g. {example}); resume with the peft settings the run was started with."
        )
    model.load_state_dict(state, strict=False)


REFERENCE_FILE = "reference_model.pt"


class ReferencePolicy:
    """The KL reference of a policy, owned in one place: created at start, refreshed every ``ref_sync_steps``,
    scored against, saved into checkpoints and restored on resume.

    Full weights: a frozen copy of the model (under FSDP2 a copy sharded like it, made once the policy is sharded).
    PEFT: the model with its adapter disabled (the base) until the first
    refresh, then a frozen second adapter (adapter-sized, no second copy of the base). ``kl_coef == 0``: nothing.
    """

    def __init__(
        self, model: Any, *, kl_coef: float, sync_steps: int, mixup_alpha: float, sharded: bool = False
    ) -> None:
        from peft import PeftModel

        self.enabled = kl_coef > 0
        self.sync_steps = sync_steps
        self.mixup_alpha = mixup_alpha
        self.is_peft = isinstance(model, PeftModel)
        if self.enabled and self.is_peft and mixup_alpha < 1.0:
            raise ValueError(
                f"ref_model_mixup_alpha={mixup_alpha} cannot soft-refresh a peft reference (mixing LoRA factors does "
                "not mix the adapters' weight updates); use --ref_model_mixup_alpha 1.0 with peft."
            )
        if self.enabled and sync_steps == 1 and mixup_alpha == 1.0:
            logger.warning(
                "ref_sync_steps=1 copies the policy into the reference after every step, so each rollout is scored "
                "against itself: the KL is 0 except on later iterations of a batch (num_iterations > 1). Use "
                "--ref_sync_steps >= 2 or a soft refresh (--ref_model_mixup_alpha < 1)."
            )
        self.model: Any = None  # the frozen full copy (full-weight policies only)
        self.has_adapter = False  # peft: the reference lives in its own adapter (else: the adapter-disabled base)
        self.policy_adapter = policy_adapter(model) if self.is_peft else None
        self.last_sync = 0  # global step of the last refresh
        # the reference's weights are the policy's (a copy just made, or just refreshed): its log-probs need no pass
        self.equals_policy = False
        # a sharded policy's copy is sharded like it; accelerate shards the policy later, in prepare
        self.copy_when_sharded = self.enabled and not self.is_peft and sharded
        if self.enabled and not self.is_peft and not sharded:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            self.equals_policy = True
        elif self.copy_when_sharded:  # copied from the initial weights, now or once sharded (``_copy_sharded``)
            self.model = sharded_copy(model) if is_sharded(model) else None
            self.equals_policy = True
        elif self.enabled and needs_initial_snapshot(model, self.policy_adapter):
            copy_policy_to_reference(model, self.policy_adapter)  # PiSSA/OLoRA: the base alone is not it
            self.has_adapter = True
            self.equals_policy = True

    def score(self, policy: Any, logps: Callable[[Any], T]) -> T:
        """``logps(model)`` run on the reference: the frozen copy, the reference adapter or the adapter-less base."""
        self._copy_sharded(policy)
        if self.model is not None:
            return logps(self.model)
        if self.has_adapter:
            policy.set_adapter(REFERENCE_ADAPTER)
            try:
                return logps(policy)
            finally:
                policy.set_adapter(self.policy_adapter)
        with policy.disable_adapter():
            return logps(policy)

    def score_unless_policy(self, policy: Any, logps: Callable[[Any], T], policy_logps: T | None) -> T | None:
        """The reference's log-probs for a rollout: ``score``'s, or while the reference is the policy (the start, the
        step after a full refresh) the policy's own ``policy_logps`` without a pass; None without a reference, or
        when the policy's are not computed before the loss (its pass then serves, ``serves_from_loss``)."""
        if not self.enabled:
            return None
        if self.equals_policy:
            self._copy_sharded(policy)  # the sharded copy is still made from the initial weights
            return policy_logps
        return self.score(policy, logps)

    def serves_from_loss(self, ref_logps: Any) -> bool:
        """Whether the loss pass's own log-probs (detached) stand for the reference's (see ``score_unless_policy``)."""
        return self.enabled and self.equals_policy and ref_logps is None

    def policy_changed(self) -> None:
        """After an optimizer step: the policy has moved away from the reference."""
        self.equals_policy = False

    def _copy_sharded(self, policy: Any) -> None:
        """Make the sharded copy once the policy is sharded (its weights are still the initial ones then: the first
        rollout is scored before the first update, a resume restores the saved reference right after)."""
        if self.copy_when_sharded and self.model is None:
            self.model = sharded_copy(policy)

    def due(self, step: int) -> bool:
        """After the optimizer step of every ``ref_sync_steps``-th step (TRL's ``SyncRefModelCallback`` timing)."""
        steps = self.sync_steps
        return self.enabled and steps > 0 and step > 0 and step % steps == 0 and step != self.last_sync

    @torch.no_grad()
    def refresh(self, policy: Any, step: int | None = None) -> None:
        """Move the reference to the policy: a copy, or with ``ref_model_mixup_alpha`` < 1 the soft update
        ``ref = alpha * policy + (1 - alpha) * ref`` (full weights only)."""
        self._copy_sharded(policy)
        if self.model is not None:
            if self.mixup_alpha >= 1.0:
                self.model.load_state_dict(policy.state_dict())
            else:
                for ref, param in zip(self.model.parameters(), policy.parameters(), strict=True):
                    ref.lerp_(param.to(ref.dtype), self.mixup_alpha)
        else:
            copy_policy_to_reference(policy, self.policy_adapter)
            self.has_adapter = True
        self.equals_policy = self.mixup_alpha >= 1.0
        if step is not None:
            self.last_sync = step

    def state(self) -> dict[str, Any]:
        """What a checkpoint records besides the weights (``save``)."""
        return {"ref_syncs": self.last_sync, "has_ref_adapter": self.has_adapter, "ref_is_policy": self.equals_policy}

    def tensors(self, policy: Any) -> dict[str, torch.Tensor] | None:
        """The reference weights: the full copy's or the reference adapter's; None when it is the base."""
        if self.model is not None:
            return self.model.state_dict()
        if self.has_adapter:
            return {k: v for k, v in policy.state_dict().items() if f".{REFERENCE_ADAPTER}." in k}
        return None

    def save(self, policy: Any, output_dir: Path, sharded: bool = False) -> None:
        """The reference weights, atomically (main process); ``sharded``: every process writes its shards."""
        tensors = self.tensors(policy)
        if tensors is not None and sharded:
            save_tensors(tensors, output_dir)
        elif tensors is not None:
            atomic_torch_save(tensors, Path(output_dir) / REFERENCE_FILE)

    def restore(self, policy: Any, checkpoint: str | Path, state: dict[str, Any]) -> None:
        """Undo ``save`` and ``state`` on resume; a reference adapter must match this run's peft settings."""
        self.last_sync = state.get("ref_syncs", 0)
        self.equals_policy = bool(state.get("ref_is_policy", False))  # saved right after a refresh: still the policy
        self._copy_sharded(policy)
        if self.model is None and state.get("has_ref_adapter"):
            add_reference_adapter(policy, self.policy_adapter)
            self.has_adapter = True
        expected = self.tensors(policy)
        if expected is None:
            return
        tensors = load_tensors(expected, checkpoint)  # every process its shards, when saved sharded
        if tensors is None:
            path = Path(checkpoint) / REFERENCE_FILE
            if not path.is_file():
                return
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        if self.model is not None:
            self.model.load_state_dict(tensors)
        else:
            load_reference_adapter(policy, tensors, checkpoint)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file under ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
