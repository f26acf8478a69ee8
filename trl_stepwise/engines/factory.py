"""Build the generation engine a configuration asks for, around a policy model and its tokenizer."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from trl_stepwise.engines.base import GenerationEngine
from trl_stepwise.engines.config import GenerationEngineArguments
from trl_stepwise.engines.transformers_engine import TransformersEngine

logger = logging.getLogger(__name__)


def build_engine(
    args: GenerationEngineArguments, model: torch.nn.Module, tokenizer: Any, seed: int = 0
) -> GenerationEngine:
    """The transformers engine, colocated vLLM or a vLLM server, as ``args.use_vllm`` / ``vllm_mode`` say."""
    if not args.use_vllm:
        return TransformersEngine(model, tokenizer)
    from trl_stepwise.engines.weights import check_servable_model

    check_servable_model(model)  # before vLLM loads: the pushed weights must be the trained policy, or refused
    generation_config = getattr(model, "generation_config", None)
    if args.vllm_mode == "server":
        from trl_stepwise.engines.vllm_server import VLLMServerEngine

        return VLLMServerEngine(
            args.vllm_server_url, tokenizer, timeout=args.vllm_server_timeout, generation_config=generation_config
        )
    from trl_stepwise.engines.vllm_engine import VLLMEngine

    return VLLMEngine(
        vllm_model_path(model, tokenizer),
        tokenizer,
        dtype=engine_dtype(args, model),
        max_model_len=args.vllm_max_model_length,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        kv_cache_space_gb=args.vllm_kv_cache_space_gb,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        enforce_eager=args.vllm_enforce_eager,
        seed=seed,
        generation_config=generation_config,
        third_party_logs=args.third_party_logs,
    )


def vllm_model_path(model: torch.nn.Module, tokenizer: Any) -> str:
    """A folder or hub id vLLM can start from; its weights are replaced by the policy's at the first sync.

    The policy's own name when it resolves (a local folder, a hub id, the embedded model); otherwise the policy is
    saved once to a temporary folder (a model built in memory, e.g. a test's random model).
    """
    from trl_stepwise.models import EMBEDDED_MODEL_ALIAS, embedded_model_dir

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(base.config, "_name_or_path", "") or ""
    if name.lower() == EMBEDDED_MODEL_ALIAS:
        return str(embedded_model_dir())
    if name and (Path(name) / "config.json").is_file():
        return name
    if name and not Path(name).exists() and name.count("/") == 1:  # a hub id: vLLM reads it from the HF cache
        return name
    folder = Path(tempfile.mkdtemp(prefix="trl-stepwise-vllm-"))
    logger.info("Saving the policy to %s for vLLM to start from", folder)
    from trl_stepwise.engines.weights import policy_weights

    with policy_weights(model) as weights:
        state = {k: v.detach().clone() for k, v in weights}
    base.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    return str(folder)


def engine_dtype(args: Any, model: torch.nn.Module) -> str:
    """The dtype of vLLM's weights: ``vllm_dtype``, or for "auto" the precision the trainer computes in, so that the
    engine samples the policy the loss sees: bfloat16 under ``bf16`` autocast (the trainer's matrix products round
    the float32 weights to bfloat16 too; faster than float32 on a CPU with bfloat16 hardware: vllm_block_size.py),
    else the policy's own dtype."""
    if args.vllm_dtype != "auto":
        return args.vllm_dtype
    if getattr(args, "bf16", False):
        return "bfloat16"
    return str(next(model.parameters()).dtype).removeprefix("torch.")
