"""Sharded policies (FSDP2, DeepSpeed ZeRO-3): the rules that keep every process in step, and a sharded reference.

Under sharding every forward call of the policy is a collective: each layer gathers its parameters from all
processes before it runs, so a process that calls the model once more than another waits for ever. Scoring is
data-dependent (micro-batches and log-prob chunks cut by length, length buckets, a shared-prefix pass), so under
sharding the processes agree at each level on the largest count any of them wants: a process short of micro-batches
or chunks scores copies of its last one (out of the loss, results dropped), and one short of forward calls within a
batch calls the model on one token, at zero weight in the loss so that their backward runs too. The shared prefix's
call also enters the loss at zero weight, since FSDP2 gathers a layer's weights for backward only when the gradient
of the layer's output arrives (through the prefix's key/value cache alone it never would).

A sharded model is recognised by its parameters (FSDP2's DTensors, ZeRO-3's partitioned ``ds_id`` tensors: a model
sharded by ``accelerate launch``, by ``from_pretrained(distributed_config=...)`` or by the user's own
``fully_shard``), or by accelerate's plugin before ``accelerator.prepare`` shards it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate.utils import gather_object


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a shard: an FSDP2 / tensor-parallel DTensor or a ZeRO-3 partition."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def shards_on_prepare(state: Any) -> bool:
    """Whether ``accelerator.prepare`` will shard the model: accelerate's FSDP2 plugin or DeepSpeed ZeRO-3."""
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None and getattr(fsdp, "fsdp_version", 1) == 2:
        return True
    deepspeed = getattr(state, "deepspeed_plugin", None)
    return deepspeed is not None and getattr(deepspeed, "zero_stage", None) == 3


def agreed_count(count: int, num_processes: int) -> int:
    """The largest ``count`` over all processes: how many forward calls each process makes."""
    if num_processes <= 1:
        return count
    return max(gather_object([count]))


def padding_call(model: torch.nn.Module) -> torch.Tensor:
    """One forward call on a single token, to take part in the parameter gathering of a call another process makes;
    returns the sum of its logits (scaled by 0 and added to a loss, its backward takes part too)."""
    ids = torch.tensor([[0]], device=_device_of(model))
    return model(input_ids=ids, logits_to_keep=1, use_cache=False).logits.sum()


def masked_out(batch: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch for a process that has none left while others train on theirs: ``batch`` with every token out
    of the loss and the metrics, so its forward and backward take part in the gathering and add nothing."""
    return {
        **batch,
        "completion_mask": torch.zeros_like(batch["completion_mask"]),
        "sampled_mask": torch.zeros_like(batch["sampled_mask"]),
    }


def sharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of an FSDP2 model, sharded like it (the reference of a full-weight policy): built on the meta
    device, each module ``fully_shard``-ed on the mesh of the module it copies, then filled shard by shard from the
    model's own state (no process ever holds the full weights). Tied embeddings are copied untied."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    if not isinstance(model, FSDPModule):
        raise ValueError(
            "A sharded full-weight policy needs a sharded reference, which is built for FSDP2 models only; use "
            "--use_peft (the reference is the adapter-free base) or kl_coef 0 (TRL's beta=0) with this set-up."
        )
    plain = next(base for base in type(model).__mro__ if not issubclass(base, FSDPModule))
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        frozen = plain(_untied(model.config)).to(dtype)
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    for name, module in reversed(wrapped):  # innermost first, the root last, as FSDP2 wants
        mesh = next(p.device_mesh for p in module.parameters() if isinstance(p, DTensor))
        # frozen: gathered for each forward and freed after it (a root keeps its gathered weights otherwise)
        fully_shard(frozen.get_submodule(name) if name else frozen, mesh=mesh, reshard_after_forward=True)
    frozen.to_empty(device=_device_of(model))
    with torch.no_grad():
        frozen.load_state_dict(model.state_dict())
        for name, buffer in model.named_buffers():  # also the non-persistent ones (rotary frequencies)
            frozen.get_buffer(name).copy_(buffer)
    return frozen.eval().requires_grad_(False)


def _untied(config: Any) -> Any:
    """The config with the output embeddings untied from the input ones: two FSDP groups cannot share one parameter,
    and a frozen copy needs no tie (both matrices are filled with the same values, and refreshed together)."""
    config = copy.deepcopy(config)
    for part in {
        id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None
    }.values():
        part.tie_word_embeddings = False
    return config


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters())
    local = getattr(parameter, "_local_tensor", parameter)
    return local.device
