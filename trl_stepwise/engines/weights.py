"""The policy's weights as an engine loads them: checkpoint names, any PEFT adapter folded in out of place.

An engine that loads plain weights (vLLM) samples from the trained policy only if the pushed tensors are what peft's
own ``merge_and_unload()`` gives for the trained model. Each adapted layer is therefore merged by peft's own code on
a copy of that one layer: the live weights never change (an in-place merge/unmerge would drift them by rounding at
every push), and nothing is re-derived here that a new peft method could get wrong. What cannot be folded is refused
in one line: by ``check_servable_peft`` before the model loads, by ``check_servable_model`` for what only the loaded
model tells (e.g. a LoRA bias on a layer without one).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from trl_stepwise.models import REFERENCE_ADAPTER, is_quantized

# peft methods that train weights yet cannot be folded into fixed ones (peft cannot merge them either)
_UNMERGEABLE = {
    "POLY": "it routes between its LoRA modules by task id",
    "XLORA": "it mixes its LoRA experts per token",
    "SHADOW": "it adds an input-dependent shadow network",
    "LILY": "peft has no merge for it",
}
_FIX = "use --use_vllm false (the transformers engine generates with the adapter as trained)"


def check_servable_peft(peft_config: Any, *, load_in_4bit: bool = False, load_in_8bit: bool = False) -> None:
    """Refuse, before any model loads, a peft set-up that an engine loading merged weights cannot serve.

    ``peft_config``: any peft ``PeftConfig`` (TRL's ``get_peft_config(model_args)``) or ``None`` (no peft);
    ``load_in_4bit`` / ``load_in_8bit``: ModelConfig's flags. Raises a one-line ``ValueError`` naming the flag, its
    value and the fix. What only the loaded model tells (a LoRA bias on layers without one, tied embeddings) is
    checked by ``check_servable_model``.
    """
    if load_in_4bit or load_in_8bit:
        flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
        raise ValueError(
            f"{flag} true cannot be served with --use_vllm true: vLLM loads the adapter merged into the base "
            f"weights, which a 4/8-bit base cannot hold; use --use_vllm false to train on the quantized base, or "
            f"{flag} false to generate with vLLM."
        )
    if peft_config is not None and (reason := _unfoldable(peft_config)) is not None:
        raise ValueError(reason)


def check_servable_model(model: torch.nn.Module) -> None:
    """Refuse a loaded model whose policy cannot be pushed as merged weights, before any engine loads: the checks
    of ``check_servable_peft``, the loaded layers', and one trial merge per layer type (peft's own merge)."""
    _refuse_quantized(model)
    if not hasattr(model, "get_base_model"):
        return
    units, adapters = _checked(model)
    tried: set[type] = set()
    for name, unit in units.items():
        if type(unit) not in tried:
            tried.add(type(unit))
            _merged_state(name, unit, adapters)


@contextlib.contextmanager
def policy_weights(model: torch.nn.Module) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """``(name, tensor)`` pairs of the full policy under the base model's checkpoint names, one tensor at a time.

    With peft they equal ``merge_and_unload().state_dict()`` for the pushed adapters (the active ones, less the
    trainer's frozen reference): each adapted layer is merged by peft on a copy of that layer, a ``modules_to_save``
    module is sent as its trained copy under the original name. A set-up that cannot be folded raises a one-line
    ``ValueError`` before the first tensor. A sharded model sends each tensor whole (FSDP2 / tensor-parallel DTensors
    gathered one at a time, ZeRO-3 partitions one module at a time): every process must walk the pairs in step, as
    each gathering is a collective.
    """
    if not hasattr(model, "get_base_model"):
        yield _whole_items(model)
        return
    units, adapters = _checked(model)
    with torch.no_grad():
        yield _merged_weights(model.get_base_model(), units, adapters)


def _checked(model: Any) -> tuple[dict[str, torch.nn.Module], list[str]]:
    """The peft layers to fold and the adapters to push, after the checks that need no merging."""
    base = model.get_base_model()
    _refuse_quantized(model)
    adapters = _pushed_adapters(model)
    for adapter in adapters:
        if (reason := _unfoldable(model.peft_config[adapter], adapter)) is not None:
            raise ValueError(reason)
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "_check_merge_allowed"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tuner._check_merge_allowed()
        except (ValueError, NotImplementedError) as err:
            raise ValueError(f"peft cannot merge this model's adapter for vLLM ({_one_line(err)}); {_FIX}.") from err
    units = dict(_units(base))
    for name, unit in units.items():
        bias = getattr(unit, "lora_bias", {})
        if any(bias.get(a) for a in adapters) and getattr(_base_layer(unit), "bias", None) is None:
            raise ValueError(
                f"lora_bias=True on {name} (a layer without a bias) cannot be served with --use_vllm true: the "
                f"trained LoRA bias has no base bias to merge into (peft cannot merge it either); use "
                f"lora_bias=False, or {_FIX}."
            )
    _tied_embedding_units(base, units)
    return units, adapters


def _refuse_quantized(model: Any) -> None:
    if is_quantized(model):
        raise ValueError(
            "A 4/8-bit base cannot be served with --use_vllm true: vLLM loads the adapter merged into the base "
            "weights, which quantized weights cannot hold; use --use_vllm false to train on the quantized base, or "
            "--load_in_4bit false / --load_in_8bit false to generate with vLLM."
        )


def _merged_weights(
    base: torch.nn.Module, units: dict[str, torch.nn.Module], adapters: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base state dict in its own order, each peft layer replaced by its merged state when first reached: only
    one merged layer exists at a time, never a second model."""
    tied = _tied_embedding_units(base, units)
    done: set[str] = set()
    first_tied: torch.Tensor | None = None
    for key, tensor in _whole_items(base):
        unit = _unit_of(key, units)
        if unit is None:
            yield key, tensor
            continue
        if unit in done:
            continue
        done.add(unit)
        with _zero3_gathered(units[unit].parameters()):
            merged = _merged_state(unit, units[unit], adapters)
        if unit in tied:  # vLLM loads one matrix for both: the two trained ones must still be one
            if first_tied is None:
                first_tied = merged["weight"]
            elif not torch.equal(first_tied, merged["weight"]):
                raise ValueError(_tied_refusal(tied, "the trained input and output embeddings differ"))
        yield from ((f"{unit}.{name}", _full(value)) for name, value in merged.items())


def _merged_state(name: str, unit: torch.nn.Module, adapters: list[str]) -> dict[str, torch.Tensor]:
    """The state of ``unit`` as ``merge_and_unload`` leaves it, computed on a copy (the live layer is untouched)."""
    from peft.utils.other import ModulesToSaveWrapper

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "already merged": the copy merges what is not merged yet
            if isinstance(unit, ModulesToSaveWrapper):  # the trained copy as it is: nothing to merge
                active = [a for a in unit.active_adapters if a in adapters and a in unit.modules_to_save]
                module = unit.modules_to_save[active[0]] if active else unit.original_module
                if not hasattr(module, "base_layer"):
                    return module.state_dict()
                unit = module
            layer = _layer_copy(unit)
            if hasattr(layer, "unload_and_optionally_merge_module"):
                merged = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=adapters)
            else:
                layer.merge(adapter_names=[a for a in layer.active_adapters if a in adapters])
                merged = layer.get_base_layer()
    except Exception as err:
        raise ValueError(f"peft cannot merge the adapter of {name} for vLLM ({_one_line(err)}); {_FIX}.") from err
    return merged.state_dict()


def _layer_copy(unit: torch.nn.Module) -> torch.nn.Module:
    """A copy of one peft layer to merge into: its base layer's tensors are cloned, the adapters' are shared (a merge
    only reads them), so a push copies one base weight at a time and never the adapters or the reference. Sharded
    tensors (FSDP2 DTensors) enter the copy gathered whole; the live layer keeps its shards."""
    cloned = {id(tensor) for tensor in _base_layer(unit).state_dict(keep_vars=True).values()}
    memo: dict[int, Any] = {}
    for module in unit.modules():
        for tensor in _tensors(vars(module)):
            if _is_shard(tensor) and id(tensor) not in memo:
                whole = _full(tensor).detach()
                memo[id(tensor)] = (
                    torch.nn.Parameter(whole, False) if isinstance(tensor, torch.nn.Parameter) else whole
                )
            elif id(tensor) not in cloned:
                memo[id(tensor)] = tensor
    return copy.deepcopy(unit, memo)


def _whole_items(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``module.state_dict()`` pairs, each tensor whole: FSDP2 shards gathered one tensor at a time; ZeRO-3 partitions
    one module at a time, each tensor copied out while its module is gathered."""
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        yield from ((key, _full(tensor)) for key, tensor in module.state_dict().items())
        return
    for prefix, sub in module.named_modules():
        own = {k: v for k, v in sub._parameters.items() if v is not None}
        own.update(
            {k: v for k, v in sub._buffers.items() if v is not None and k not in sub._non_persistent_buffers_set}
        )
        with _zero3_gathered(sub.parameters(recurse=False)):
            for key, tensor in own.items():
                yield (f"{prefix}.{key}" if prefix else key), tensor.detach().clone()


def _zero3_gathered(parameters: Iterator[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """ZeRO-3's gathering of ``parameters`` (every process enters it), or nothing when none is partitioned."""
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def _is_shard(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard, gathered from every process (which all call this in the same order)."""
    return tensor.full_tensor() if _is_shard(tensor) else tensor


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item, depth + 1)


def _units(base: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The outermost peft layers and wrappers, as ``merge_and_unload`` visits them."""
    skip: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if hasattr(module, "unload_and_optionally_merge_module") or hasattr(module, "base_layer"):
            skip.append(f"{name}.")
            yield name, module


def _tied_embedding_units(base: torch.nn.Module, units: dict[str, torch.nn.Module]) -> tuple[str, ...]:
    """The adapted input and output embeddings of a base whose config ties them (vLLM then loads one matrix for
    both); refuses when only one of them is adapted, as the trained policy then uses two different matrices."""
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    if not any(getattr(c, "tie_word_embeddings", False) for c in (config, text_config)):
        return ()
    try:
        ends = (base.get_input_embeddings(), base.get_output_embeddings())
    except (AttributeError, NotImplementedError):
        return ()
    names = {id(module): name for name, module in base.named_modules()}
    if any(end is None or id(end) not in names for end in ends):
        return ()
    adapted = tuple(_unit_of(f"{names[id(end)]}.weight", units) for end in ends)
    if all(unit is None for unit in adapted):
        return ()
    if any(unit is None for unit in adapted):
        raise ValueError(_tied_refusal([names[id(end)] for end in ends], "only one of them is adapted"))
    if not set.intersection(*(_trained_storages(units[unit]) for unit in adapted)):
        raise ValueError(_tied_refusal(adapted, "their adapters are trained apart"))
    return adapted


def _trained_storages(unit: torch.nn.Module) -> set[int]:
    """Where the adapter tensors of ``unit`` live: tied adapters (peft's ``ensure_weight_tying``) share storage."""
    base = {id(tensor) for tensor in _base_layer(unit).parameters()}
    return {p.untyped_storage().data_ptr() for p in unit.parameters() if id(p) not in base}


def _tied_refusal(names: Any, why: str) -> str:
    first, second = names
    return (
        f"Adapting {first} / {second} cannot be served with --use_vllm true: the base ties them "
        f"(tie_word_embeddings=True), so vLLM loads one matrix for both, but {why}; drop them from "
        f"--lora_target_modules / --lora_modules_to_save (or tie the adapters: peft's ensure_weight_tying=True), "
        f"or {_FIX}."
    )


def _base_layer(unit: torch.nn.Module) -> torch.nn.Module:
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(unit, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
        return unit.original_module
    return unit.get_base_layer() if hasattr(unit, "get_base_layer") else unit


def _unit_of(key: str, units: dict[str, torch.nn.Module]) -> str | None:
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if (prefix := ".".join(parts[:end])) in units:
            return prefix
    return None


def _pushed_adapters(model: Any) -> list[str]:
    """The adapters the policy trains: the active ones, less the frozen reference the trainer adds next to them."""
    active = model.active_adapters if isinstance(model.active_adapters, list) else [model.active_adapters]
    adapters = [a for a in active if a != REFERENCE_ADAPTER]
    if not adapters:
        raise ValueError(
            f"Only the frozen reference adapter {REFERENCE_ADAPTER!r} is active, so there is no policy to push to "
            "the engine; set the policy adapter active again (model.set_adapter) before syncing weights."
        )
    return adapters


def _unfoldable(config: Any, adapter: str | None = None) -> str | None:
    """Why this peft config's policy cannot be pushed as merged weights, as a one-line refusal; None if it can."""
    kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
    name = f" (adapter {adapter!r})" if adapter else ""
    if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
        return (
            f"peft_type={kind}{name} cannot be served with --use_vllm true: it learns virtual tokens or prompts, "
            f"not weights, so nothing can be folded into the weights vLLM loads; train a weight adapter instead "
            f"(--use_peft with --lora_r), or {_FIX}."
        )
    if kind in _UNMERGEABLE:
        return (
            f"peft_type={kind}{name} cannot be served with --use_vllm true: {_UNMERGEABLE[kind]}, so no merged "
            f"weights reproduce it; train a LoRA adapter instead (--use_peft), or {_FIX}."
        )
    for field, why in (
        ("layer_replication", "replicated layers share base weights, so peft cannot merge them"),
        ("alora_invocation_tokens", "aLoRA acts only after its invocation tokens, merged weights act everywhere"),
        ("arrow_config", "Arrow routes between LoRA experts per token"),
    ):
        if getattr(config, field, None):
            return (
                f"{field}={getattr(config, field)!r}{name} cannot be served with --use_vllm true: {why}; drop "
                f"{field}, or {_FIX}."
            )
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
