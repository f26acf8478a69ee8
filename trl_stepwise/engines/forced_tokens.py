"""Tokens appended to a running vLLM request without restarting it: a logits processor that forces them.

A stepwise episode pauses where the environment answers (a calculator result, a reply after a step). Restarting the
request re-encodes the tail of its last key/value block (vLLM reuses cached keys and values in whole blocks only), up
to 31 tokens per pause on the CPU backend. Instead, the colocated engine keeps the request running and this processor
makes its next samples the appended tokens: the request goes on decoding with everything it has cached.

The plan of each request lives in ``vllm_engine.FORCED_TOKENS`` (engine request key -> output position of the first
appended token, the tokens), which the engine writes between its steps; vLLM's model runner runs in the same process
(the in-process engine the trainer uses), so the processor reads it directly. Import this module only once vLLM is
known to be installed (``vllm_engine.import_vllm``).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from trl_stepwise.engines.vllm_engine import FORCED_TOKENS, REQUEST_KEY


class ForcedTokens(LogitsProcessor):
    """Rows whose request has a plan covering the position being sampled keep only the planned token."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[str, list[int]]] = {}  # batch row -> (request key, its live output ids)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy decoding picks

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, _row_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not FORCED_TOKENS:
            return logits
        for row, (key, output_ids) in self.rows.items():
            plan = FORCED_TOKENS.get(key)
            if plan is None:
                continue
            start, tokens = plan
            offset = len(output_ids) - start
            if 0 <= offset < len(tokens):
                logits[row] = float("-inf")
                logits[row, tokens[offset]] = 0.0
        return logits


def _row_state(params: Any, prompt_ids: Any, output_ids: list[int]) -> tuple[str, list[int]] | None:
    key = (params.extra_args or {}).get(REQUEST_KEY) if params is not None else None
    return None if key is None else (key, output_ids)
