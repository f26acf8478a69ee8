"""Generation engines: token ids in, sampled token ids (and log-probs) out; the rollout loop runs on any of them.

* ``TransformersEngine``: the policy model's own batched decoding loop (needs nothing extra; the fallback).
* ``VLLMEngine``: vLLM in the trainer's process (``vllm_mode="colocate"``) or ``VLLMServerEngine``: a running
  ``trl vllm-serve`` server (``vllm_mode="server"``). Both receive new policy weights after every optimizer step.
"""

from trl_stepwise.engines.base import (
    KEEP_SAMPLING,
    Continuation,
    Deferred,
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    OnStop,
    SamplingConfig,
    StopPolicy,
    eos_token_ids,
)
from trl_stepwise.engines.transformers_engine import TransformersEngine

__all__ = [
    "KEEP_SAMPLING",
    "Continuation",
    "Deferred",
    "GenerationEngine",
    "GenerationOutput",
    "GenerationRequest",
    "OnStop",
    "SamplingConfig",
    "StopPolicy",
    "TransformersEngine",
    "eos_token_ids",
]
