"""Attention in the scoring passes on a CPU: in float32, with grouped-query keys and values never copied per query
head.

transformers' SDPA attention hands grouped-query keys and values to torch as they are (``enable_gqa``) only where no
attention mask is given, because CUDA's fast kernels take no mask with it. The scoring passes always have a mask
(padding, the shared prefix's cache), so on a CPU every layer copied its keys and values once per query head
(``repeat_kv``) and summed the copies' gradients back. torch's CPU kernel takes masked grouped-query attention
itself, with the same results: 6.05 s against 7.08 s for a main-job bfloat16 loss pass (benchmarks/README.md).

Under bfloat16 autocast, attention ran in bfloat16 too; torch's CPU flash kernel is slower there than in float32 at
the passes' shapes (a few dozen completion tokens per row against a few hundred keys), its backward most of all. So
on a CPU every scoring pass, with gradients or without, computes attention in float32: a main-job loss pass in 4.53 s
instead of 5.05, its log-probs nearer to a float32 pass's (benchmarks/README.md, "Scoring passes").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import transformers.integrations.sdpa_attention as sdpa_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.import_utils import is_torch_greater_or_equal

# enable_gqa in torch.nn.functional.scaled_dot_product_attention
TORCH_HAS_GQA = is_torch_greater_or_equal("2.5", accept_dev=True)


@contextlib.contextmanager
def cpu_scoring_attention() -> Iterator[None]:
    """Within the block (a scoring pass), transformers' SDPA attention on a CPU runs in float32, autocast or not, with
    grouped-query keys and values unrepeated (``masked_gqa_on_cpu``); on other devices it runs as it does."""
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(original, "cpu_scoring_attention", False):  # nested: the outer block decides
        yield
        return

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kw):
        if query.device.type != "cpu":
            return original(module, query, key, value, *args, **kw)
        with torch.autocast("cpu", enabled=False):
            out, weights = original(module, query.float(), key.float(), value.float(), *args, **kw)
        return out.to(query.dtype), weights

    attention.cpu_scoring_attention = True  # type: ignore[attr-defined]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        with masked_gqa_on_cpu():
            yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original


@contextlib.contextmanager
def masked_gqa_on_cpu() -> Iterator[None]:
    """Within the block, transformers' SDPA attention passes grouped-query keys and values on a CPU to torch
    unrepeated, mask or not; elsewhere (other devices, equal head dims not given) it decides as it does."""
    original = sdpa_attention.use_gqa_in_sdpa
    if not TORCH_HAS_GQA or getattr(original, "masked_gqa_on_cpu", False):  # nested: the outer block decides
        yield
        return

    def use_gqa(attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
        on_cpu = key.device.type == "cpu" and key.shape[-1] == value.shape[-1]
        return on_cpu or original(attention_mask, key, value)

    use_gqa.masked_gqa_on_cpu = True  # type: ignore[attr-defined]
    sdpa_attention.use_gqa_in_sdpa = use_gqa
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original
