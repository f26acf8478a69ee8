"""Which distributed set-ups the trainer runs, and a one-line refusal of those it cannot, before any model loads.

DDP and ZeRO-2 keep whole weights on every process. FSDP2 and ZeRO-3 shard them: every forward call of the policy
is then a collective, so every process must call it the same number of times. With a vLLM engine the sharded model
only scores and trains, which ``sharding.py`` keeps in step, and the engine receives gathered weights. The
transformers engine generates with the sharded model itself, a data-dependent number of calls per process, so it
stays refused there, as does FSDP1 (its wrapper, not parameters, owns the shards).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENGINE_FIX = "add --use_vllm true (generation then runs on gathered weights)"
FSDP1_FIX = "use fsdp_version 2 (accelerate_configs/fsdp2.yaml)"


def _zero_stage(config: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed config given as a dict or a JSON file path (None when unknown)."""
    if isinstance(config, str | os.PathLike) and Path(config).is_file():
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError):
            return None
    if isinstance(config, Mapping):
        stage = (config.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else None
    return None


def sharded_setup(
    environ: Mapping[str, str], deepspeed: Any = None, fsdp: Any = None, model_init_kwargs: Any = None
) -> str | None:
    """A description of the sharded set-up asked for by ``accelerate launch`` (its environment variables), by the
    training arguments (``deepspeed``, ``fsdp``) or by ``model_init_kwargs["distributed_config"]`` (transformers'
    own sharding at load time), or None when there is none."""
    if str(environ.get("ACCELERATE_USE_FSDP", "")).lower() in ("1", "true") or fsdp:
        version = environ.get("FSDP_VERSION", "1")
        return f"FSDP (fsdp_version {version}, e.g. accelerate_configs/fsdp2.yaml)"
    stage = None
    if str(environ.get("ACCELERATE_USE_DEEPSPEED", "")).lower() in ("1", "true"):
        named = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        stage = int(named) if named.isdigit() else _zero_stage(environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    if stage is None and deepspeed:
        stage = _zero_stage(deepspeed)
    if stage == 3:
        return "DeepSpeed ZeRO-3 (e.g. accelerate_configs/deepspeed_zero3.yaml)"
    if isinstance(model_init_kwargs, Mapping) and model_init_kwargs.get("distributed_config") is not None:
        return "a model sharded at load time (model_init_kwargs distributed_config)"
    return None


def check_launch(
    environ: Mapping[str, str],
    deepspeed: Any = None,
    fsdp: Any = None,
    *,
    use_vllm: bool = True,
    model_init_kwargs: Any = None,
) -> None:
    """Refuse, while the config is parsed, FSDP1 and any sharded set-up without an engine on gathered weights."""
    setup = sharded_setup(environ, deepspeed, fsdp, model_init_kwargs)
    if setup is None:
        return
    if setup.startswith("FSDP (fsdp_version 1"):
        raise ValueError(f"{setup} is not supported by StepwiseReinforceTrainer: {FSDP1_FIX}.")
    if not use_vllm:
        raise ValueError(_engine_refusal(setup))


def check_accelerator(state: Any, use_vllm: bool, sharded_model: bool = False) -> None:
    """The same from the accelerator's own state (catches set-ups made without ``accelerate launch``), and from the
    model itself: one passed already sharded (DTensor or ZeRO-3 parameters) needs the same engine."""
    fsdp = getattr(state, "fsdp_plugin", None)
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if fsdp is not None and getattr(fsdp, "fsdp_version", 1) != 2:
        raise ValueError(f"FSDP (fsdp_version 1) is not supported by StepwiseReinforceTrainer: {FSDP1_FIX}.")
    if use_vllm:
        return
    if fsdp is not None:
        raise ValueError(_engine_refusal("FSDP (fsdp_version 2)"))
    if deepspeed is not None and getattr(deepspeed, "zero_stage", None) == 3:
        raise ValueError(_engine_refusal("DeepSpeed ZeRO-3"))
    if sharded_model:
        raise ValueError(_engine_refusal("A sharded model (FSDP2 / tensor-parallel / ZeRO-3 parameters)"))


def check_sharded_reference(
    environ: Mapping[str, str], deepspeed: Any, peft_config: Any, kl_coef: float, ref_sync_steps: int = 0
) -> None:
    """Under ZeRO-3 the reference must be the adapter-free base: a full copy, or a reference adapter copied from the
    policy's (a refresh, or an initialisation that changes the base), would copy partitions, which is built for FSDP2
    only (``sharding.sharded_copy``, DTensor copies)."""
    setup = sharded_setup(environ, deepspeed)
    if setup is None or "ZeRO-3" not in setup or kl_coef <= 0:
        return
    fix = "use accelerate_configs/fsdp2.yaml, or --kl_coef 0 (TRL's beta=0 default)"
    if peft_config is None:
        raise ValueError(
            f"kl_coef={kl_coef} with full weights under {setup} needs a sharded reference copy, which is built for "
            f"FSDP2 only; {fix}, or --use_peft (the reference is then the adapter-free base)."
        )
    init = getattr(peft_config, "init_lora_weights", True)
    if ref_sync_steps > 0 or init not in (True, False, "gaussian", "eva"):
        why = f"ref_sync_steps={ref_sync_steps}" if ref_sync_steps > 0 else f"init_lora_weights={init!r}"
        raise ValueError(
            f"{why} with kl_coef={kl_coef} under {setup} needs a reference adapter copied from the policy's "
            f"partitions, which is built for FSDP2 only; {fix}, or --ref_sync_steps 0 with LoRA's default "
            "initialisation (the reference is then the adapter-free base)."
        )


def _engine_refusal(setup: str) -> str:
    return (
        f"{setup} with --use_vllm false is not supported by StepwiseReinforceTrainer: the transformers engine "
        f"generates with the sharded model, a different number of calls on each process, which hangs parameter "
        f"gathering; {ENGINE_FIX}, or use accelerate_configs/multi_gpu.yaml (DDP) / deepspeed_zero2.yaml."
    )
