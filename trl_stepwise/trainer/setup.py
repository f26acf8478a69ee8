"""Checks of a training set-up that need no model: run before any model loads, by the recipes and the trainer.

The engine must sample the policy being trained; a combination where it cannot is refused here, in one line.
"""

from __future__ import annotations

import os
from typing import Any

from trl_stepwise.trainer.config import StepwiseReinforceConfig
from trl_stepwise.trainer.parallelism import check_sharded_reference


def check_engine_setup(
    args: StepwiseReinforceConfig, peft_config: Any = None, load_in_4bit: bool = False, load_in_8bit: bool = False
) -> None:
    """Raise ``ValueError`` (one line: the flag, the value, the fix) when the engine could not sample the policy:
    a quantized base or an adapter that cannot be folded into the weights vLLM loads, or a vLLM server that cannot
    take weight updates; a full-weight ZeRO-3 policy with a KL term (no sharded reference for it)."""
    check_sharded_reference(os.environ, args.deepspeed, peft_config, args.kl_coef, args.ref_sync_steps)
    if not args.use_vllm:
        return
    from trl_stepwise.engines.weights import check_servable_peft

    check_servable_peft(peft_config, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    if args.vllm_mode == "server":
        from trl_stepwise.engines.vllm_server import VLLMServerError, check_trainable_server

        try:
            check_trainable_server(args.vllm_server_url, args.vllm_server_timeout)
        except VLLMServerError as err:
            raise ValueError(f"--vllm_mode server: {err}") from err
