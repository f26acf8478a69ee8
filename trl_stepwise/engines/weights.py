"""The policy's weights as an engine loads them: checkpoint names, LoRA folded into the base out of place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

ADAPTER_MARKERS = ("lora_", "modules_to_save", "original_module")


@contextlib.contextmanager
def policy_weights(model: torch.nn.Module) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """``(name, tensor)`` pairs of the full policy under the base model's checkpoint names.

    With peft, each adapted weight is sent as ``W + delta`` (the active adapters' ``get_delta_weight``), computed out
    of place: peft's ``merge_adapter`` / ``unmerge_adapter`` would add and subtract the delta in the frozen base
    weights, which drift by rounding at every push. Quantized (4/8-bit) bases are refused: no ``W`` to add to.
    """
    if not hasattr(model, "get_base_model"):
        yield iter(model.state_dict().items())
        return
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(
            "use_vllm cannot take a 4/8-bit base with a LoRA adapter: the adapter would have to be merged into "
            "quantized weights. Train in 4-bit with the transformers engine (--use_vllm false), or load the base "
            "in bfloat16 (--load_in_4bit false) to generate with vLLM."
        )
    base = model.get_base_model()
    with torch.no_grad():
        deltas = _adapter_deltas(base)
        yield (
            (clean, tensor + deltas[clean].to(tensor.dtype) if clean in deltas else tensor)
            for name, tensor in base.state_dict().items()
            if not any(marker in name for marker in ADAPTER_MARKERS)
            for clean in (name.replace(".base_layer", ""),)
        )


def _adapter_deltas(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{checkpoint weight name: summed delta of the active adapters}`` for every adapted layer."""
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {}):
                key = f"{name}.weight"
                delta = module.get_delta_weight(adapter)
                deltas[key] = delta if key not in deltas else deltas[key] + delta
    return deltas
