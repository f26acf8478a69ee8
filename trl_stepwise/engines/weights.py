"""The policy's weights as an engine loads them: checkpoint names, LoRA merged into the base for the push only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

ADAPTER_MARKERS = ("lora_", "modules_to_save", "original_module")


@contextlib.contextmanager
def policy_weights(model: torch.nn.Module) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """``(name, tensor)`` pairs of the full policy under the base model's checkpoint names.

    With peft, the active adapter is merged into the base weights while the pairs are read, then unmerged, so the
    adapter the trainer optimises is left exactly as it was. Quantized (4/8-bit) bases cannot be merged: refused.
    """
    if not hasattr(model, "merge_adapter"):
        yield iter(model.state_dict().items())
        return
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(
            "use_vllm cannot take a 4/8-bit base with a LoRA adapter: the adapter would have to be merged into "
            "quantized weights. Train in 4-bit with the transformers engine (--use_vllm false), or load the base "
            "in bfloat16 (--load_in_4bit false) to generate with vLLM."
        )
    model.merge_adapter()
    try:
        base = model.get_base_model()
        yield (
            (name.replace(".base_layer", ""), tensor)
            for name, tensor in base.state_dict().items()
            if not any(marker in name for marker in ADAPTER_MARKERS)
        )
    finally:
        model.unmerge_adapter()
