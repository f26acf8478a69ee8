"""Which distributed set-ups the trainer can run, and a clear refusal of those it cannot.

Rollout, scoring and evaluation call the policy a data-dependent number of times on each process (episodes end at
different steps). Under ZeRO-3 or FSDP every forward call is a collective that gathers sharded parameters, so the
processes fall out of step and hang; and the reference refresh would copy partitioned parameters. Data parallelism
(DDP) and ZeRO-2 keep whole weights on every process and work. These set-ups stay refused until generation moves to an
engine that runs on gathered weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

USE_INSTEAD = (
    "use accelerate_configs/multi_gpu.yaml (DDP) or accelerate_configs/deepspeed_zero2.yaml (ZeRO-2), with LoRA or "
    "QLoRA (--use_peft) if the full weights do not fit one device"
)


def _why(setup: str) -> str:
    return (
        f"{setup} is not supported by StepwiseReinforceTrainer: rollout, scoring and evaluation call the sharded "
        f"model a different number of times on each process, which hangs parameter gathering; {USE_INSTEAD}."
    )


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


def sharded_setup(environ: Mapping[str, str], deepspeed: Any = None, fsdp: Any = None) -> str | None:
    """A description of the ZeRO-3 / FSDP set-up asked for by ``accelerate launch`` (its environment variables) or
    by the training arguments (``deepspeed``, ``fsdp``), or None when there is none."""
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
    return None


def check_launch(environ: Mapping[str, str], deepspeed: Any = None, fsdp: Any = None) -> None:
    """Refuse ZeRO-3 and FSDP before any model loads (called while the config is parsed)."""
    setup = sharded_setup(environ, deepspeed, fsdp)
    if setup is not None:
        raise ValueError(_why(setup))


def check_accelerator(state: Any) -> None:
    """Refuse ZeRO-3 and FSDP from the accelerator's own state (catches set-ups made without ``accelerate launch``)."""
    if getattr(state, "fsdp_plugin", None) is not None:
        version = getattr(state.fsdp_plugin, "fsdp_version", 1)
        raise ValueError(_why(f"FSDP (fsdp_version {version})"))
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        raise ValueError(_why("DeepSpeed ZeRO-3"))
