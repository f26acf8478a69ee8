"""The frozen reference of a PEFT policy: a second adapter, copied from the policy's without re-initialising it.

Adding an adapter normally runs its initialisation; PiSSA, OLoRA, CorDA and LoftQ rewrite the base weights in place
while doing so, which would silently change the policy. The reference adapter is therefore added with
initialisation off and filled by copying the policy adapter's tensors. For those initialisations the initial adapter
is not zero either, so the adapter-disabled model is not the initial policy: the reference is snapshotted at the
start instead of being "the model without its adapter".
"""

from __future__ import annotations

import copy
from typing import Any

import torch

REFERENCE_ADAPTER = "reference"
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
